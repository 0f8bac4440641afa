"""Triton Python-backend entry point of ``lora_registry``: load, unload and list runtime LoRA adapters.

The body lives in :mod:`acestep_triton.lora.control`; ``serving.deploy`` copies this file into
the repository of a ``torch``-runtime deployment built with a LoRA registry folder.
"""

from acestep_triton.lora.control import TritonPythonModel

__all__ = ["TritonPythonModel"]
