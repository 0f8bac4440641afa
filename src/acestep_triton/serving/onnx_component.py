"""Python-backend model body that serves one ONNX component with onnxruntime (the ``cpu`` target).

A pip-installed CPU tritonserver has no onnxruntime backend, so each exported component runs
inside this small Python model instead, under the same name and with the same tensors as the
GPU (TensorRT) model. It is generic: the tensors come from the model's own config, the ONNX
file's graph is checked against them at load time, and nothing here knows a component by name.

Inputs are read through DLPack (``np.from_dlpack``), which does not depend on the numpy ABI the
stub was built with. Outputs are handed over as numpy arrays (``pb_utils.Tensor(name, array)``):
``pb_utils.Tensor.from_dlpack`` with a *numpy* array crashes the 2.51 stub (it renames the
capsule to ``used_dlpack``, which numpy's destructor rejects) and going through torch instead
would cost every component process a torch import (seconds of start-up, ~220 MB RSS each). The
numpy path needs numpy 1 in the stub's environment (with numpy 2, ``as_numpy()`` silently reads
zeros), which the project pins anyway and :meth:`OnnxComponentModel.load` checks.
Batching and error handling are shared with the torch runtime (:mod:`.component_model`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import component_model
from .component_model import BatchedComponentModel

_ORT_TYPES = {  # onnxruntime type strings -> Triton dtypes
    "tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(double)": "TYPE_FP64",
    "tensor(bfloat16)": "TYPE_BF16", "tensor(int64)": "TYPE_INT64", "tensor(int32)": "TYPE_INT32",
    "tensor(int16)": "TYPE_INT16", "tensor(int8)": "TYPE_INT8", "tensor(uint8)": "TYPE_UINT8",
    "tensor(bool)": "TYPE_BOOL", "tensor(string)": "TYPE_STRING",
}


class OnnxComponentModel(BatchedComponentModel):
    """``TritonPythonModel`` for one ONNX component (see the module docstring)."""

    def load(self, args: dict[str, str]) -> None:
        import onnxruntime as ort  # optional heavy dependency (the serve extra): only onnx-runtime instances

        if int(np.__version__.split(".")[0]) >= 2:
            raise RuntimeError(f"numpy {np.__version__} in the Python-backend stub's environment: the "
                               "Triton 2.51 stub reads zeros from numpy 2 arrays; install numpy<2")
        params = self.parameters
        path = Path(args["model_repository"]) / args["model_version"] / params.get("onnx_file", "model.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "0") or 0)
        options.inter_op_num_threads = int(params.get("inter_op_threads", "0") or 0)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._check_graph(path)

    def _check_graph(self, path: Path) -> None:
        """Fail the load (not the first request) when config and ONNX graph disagree."""
        graph = {t.name: t for t in list(self.session.get_inputs()) + list(self.session.get_outputs())}
        leading = 1 if self.batching else 0
        for tensor in self.inputs + self.outputs:
            name = tensor["name"]
            if name not in graph:
                raise ValueError(f"{self.name}: {path.name} has no tensor {name!r} (graph: {sorted(graph)})")
            want, got = tensor["data_type"], _ORT_TYPES.get(graph[name].type, graph[name].type)
            if want != got:
                raise ValueError(f"{self.name}: {name} is {got} in {path.name} but {want} in the config")
            reshape = tensor.get("reshape")  # the model sees the reshaped shape, if any
            rank = leading + len(reshape.get("shape", []) if isinstance(reshape, dict) else tensor["dims"])
            if len(graph[name].shape) != rank:
                raise ValueError(f"{self.name}: {name} has rank {len(graph[name].shape)} in {path.name} "
                                 f"but {rank} in the config")

    def read_input(self, tensor: Any) -> np.ndarray:
        return np.from_dlpack(tensor)

    def concat(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate(arrays)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, feeds)

    def output_tensor(self, name: str, array: np.ndarray) -> Any:
        return component_model.pb_utils.Tensor(name, np.ascontiguousarray(array))

    def finalize(self) -> None:
        self.session = None
