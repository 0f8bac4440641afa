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
zeros), which the project pins anyway and :meth:`OnnxComponentModel.initialize` checks.
Every failure becomes an error response for its request; nothing raises out of ``execute``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # outside the Python-backend stub: importable for docs and linters, unusable
    pb_utils = None

_ORT_TYPES = {  # onnxruntime type strings -> Triton dtypes
    "tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(double)": "TYPE_FP64",
    "tensor(bfloat16)": "TYPE_BF16", "tensor(int64)": "TYPE_INT64", "tensor(int32)": "TYPE_INT32",
    "tensor(int16)": "TYPE_INT16", "tensor(int8)": "TYPE_INT8", "tensor(uint8)": "TYPE_UINT8",
    "tensor(bool)": "TYPE_BOOL", "tensor(string)": "TYPE_STRING",
}


def model_parameters(config: dict[str, Any]) -> dict[str, str]:
    """The config's ``parameters`` block as a plain ``{key: string_value}`` dict."""
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


class OnnxComponentModel:
    """``TritonPythonModel`` for one ONNX component (see the module docstring)."""

    def initialize(self, args: dict[str, str]) -> None:
        import onnxruntime as ort

        if int(np.__version__.split(".")[0]) >= 2:
            raise RuntimeError(f"numpy {np.__version__} in the Python-backend stub's environment: the "
                               "Triton 2.51 stub reads zeros from numpy 2 arrays; install numpy<2")

        self.config = json.loads(args["model_config"])
        self.name = self.config["name"]
        params = model_parameters(self.config)
        path = Path(args["model_repository"]) / args["model_version"] / params.get("onnx_file", "model.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "0") or 0)
        options.inter_op_num_threads = int(params.get("inter_op_threads", "0") or 0)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = self.config["input"]
        self.outputs = self.config["output"]
        self.output_names = [o["name"] for o in self.outputs]
        self.batching = int(self.config.get("max_batch_size", 0)) > 0
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

    # ------------------------------------------------------------------------- serving
    def execute(self, requests: Sequence[Any]) -> list[Any]:
        """One response per request, in order. With dynamic batching, requests whose tensors
        agree on every non-batch dim are concatenated into one onnxruntime run."""
        responses: list[Any] = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, dict[str, np.ndarray]]]] = defaultdict(list)
        for i, request in enumerate(requests):
            try:
                feeds = self._feeds(request)
            except Exception as exc:
                responses[i] = _error_response(f"{self.name}: {exc}")
                continue
            if self.batching:
                key = tuple((k, v.shape[1:], v.dtype.str) for k, v in sorted(feeds.items()))
            else:
                key = ("request", i)
            groups[key].append((i, feeds))
        for members in groups.values():
            try:
                for i, outputs in self._run(members):
                    responses[i] = pb_utils.InferenceResponse(output_tensors=outputs)
            except Exception as exc:
                for i, _ in members:
                    responses[i] = _error_response(f"{self.name}: {type(exc).__name__}: {exc}")
        return responses

    def _feeds(self, request: Any) -> dict[str, np.ndarray]:
        feeds: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, spec["name"])
            if tensor is None:
                if spec.get("optional", False):
                    continue
                raise ValueError(f"input {spec['name']!r} is missing")
            if spec["data_type"] == "TYPE_STRING":  # DLPack has no string type
                feeds[spec["name"]] = tensor.as_numpy()
            else:
                feeds[spec["name"]] = np.from_dlpack(tensor)
        return feeds

    def _run(self, members: list[tuple[int, dict[str, np.ndarray]]]) -> list[tuple[int, list[Any]]]:
        if len(members) == 1:
            i, feeds = members[0]
            return [(i, self._tensors(self.session.run(self.output_names, feeds)))]
        sizes = [next(iter(feeds.values())).shape[0] for _, feeds in members]
        merged = {name: np.concatenate([feeds[name] for _, feeds in members]) for name in members[0][1]}
        results = self.session.run(self.output_names, merged)
        bounds = np.cumsum([0, *sizes])
        return [(i, self._tensors([r[bounds[k]:bounds[k + 1]] for r in results]))
                for k, (i, _) in enumerate(members)]

    def _tensors(self, arrays: Sequence[np.ndarray]) -> list[Any]:
        return [_output_tensor(name, array) for name, array in zip(self.output_names, arrays, strict=True)]

    def finalize(self) -> None:
        self.session = None


def _output_tensor(name: str, array: np.ndarray) -> Any:
    return pb_utils.Tensor(name, np.ascontiguousarray(array))


def _error_response(message: str) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))
