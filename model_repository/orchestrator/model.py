"""Triton Python-backend entry point of every task endpoint (text2music, ...).

The behaviour lives in the installed package, so this file only re-exports it; the endpoint's
task and assets folder come from its rendered config.pbtxt parameters.
"""

from acestep_triton.serving.orchestrator import TritonPythonModel

__all__ = ["TritonPythonModel"]
