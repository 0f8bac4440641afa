"""Python-backend shim: serves one component with the checkpoint's torch modules (``torch`` runtime).

The body lives in :mod:`acestep_triton.serving.torch_component`; the renderer copies this file
into every component's ``1/`` folder when a repository is rendered with ``--runtime torch``.
"""

from acestep_triton.serving.torch_component import TorchComponentModel


class TritonPythonModel(TorchComponentModel):
    """The class name the Python backend looks for."""
