"""Python-backend shim: serves ``1/model.onnx`` with onnxruntime (cpu-target components).

The body lives in :mod:`acestep_triton.serving.onnx_component` so it is versioned, linted and
tested with the package; the renderer copies this file into every component's ``1/`` folder.
"""

from acestep_triton.serving.onnx_component import OnnxComponentModel


class TritonPythonModel(OnnxComponentModel):
    """The class name the Python backend looks for."""
