"""Triton Python-backend entry point of ``lora_registry``: load, unload and list live LoRA adapters.

The body lives in :mod:`acestep_triton.serving.lora_registry_model`; ``serving.deploy`` copies this file into
the repository of a ``torch``-runtime deployment built with a LoRA registry folder.
"""

from acestep_triton.serving.lora_registry_model import TritonPythonModel

__all__ = ["TritonPythonModel"]
