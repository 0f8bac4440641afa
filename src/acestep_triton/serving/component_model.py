"""The part of every Python-backend component model that does not depend on its runtime.

A component model (``onnx`` runtime: onnxruntime; ``torch`` runtime: the checkpoint's torch
modules) reads its tensors from its own ``config.pbtxt``, and with dynamic batching it receives
several requests per ``execute``. Requests whose tensors agree on every non-batch dim (the same
shape bucket) are concatenated along the batch and run as ONE call, then split back per request:
that is what makes Triton's ``inference_count`` > ``execution_count`` mean real shared work.
Every failure becomes an error response for its own requests; nothing raises out of
``execute``, so a bad request never takes the model (or its batch-mates' answers) down.

Subclasses implement :meth:`load`, :meth:`read_input`, :meth:`concat`, :meth:`run` and
:meth:`output_tensor` for their array type (numpy for onnxruntime, torch for torch).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from .config_params import read_model_config
from .memory import MemoryReleaser

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # outside the Python-backend stub: importable for docs and linters, unusable
    pb_utils = None


class BatchedComponentModel:
    """``TritonPythonModel`` skeleton for one component (see the module docstring)."""

    def initialize(self, args: dict[str, str]) -> None:
        self.name, self.config, self.parameters = read_model_config(args)
        self.inputs = self.config["input"]
        self.outputs = self.config["output"]
        self.output_names = [o["name"] for o in self.outputs]
        self.batching = int(self.config.get("max_batch_size", 0)) > 0
        self.load(args)
        # After loading: the size an execution must come back to. Host memory only: a GPU
        # component keeps its CUDA caching allocator (emptying it every DiT step would cost a
        # cudaMalloc per step), while activations freed on the host go back to the system, so a
        # large request does not leave its peak resident in every component it passed through.
        self.memory = MemoryReleaser("cpu")

    # ------------------------------------------------------------------ runtime hooks
    def load(self, args: dict[str, str]) -> None:
        """Load the runtime (called at the end of :meth:`initialize`)."""
        raise NotImplementedError

    def read_input(self, tensor: Any) -> Any:
        """A request's input tensor as this runtime's array (without copying where possible)."""
        raise NotImplementedError

    def concat(self, arrays: Sequence[Any]) -> Any:
        """Concatenate arrays along the batch dim."""
        raise NotImplementedError

    def run(self, feeds: dict[str, Any]) -> list[Any]:
        """One call of the component: outputs in :attr:`output_names` order."""
        raise NotImplementedError

    def output_tensor(self, name: str, array: Any) -> Any:
        """A ``pb_utils.Tensor`` for an output array."""
        raise NotImplementedError

    # ------------------------------------------------------------------ serving
    def execute(self, requests: Sequence[Any]) -> list[Any]:
        """One response per request, in order. With dynamic batching, requests whose tensors
        agree on every non-batch dim are concatenated into one run."""
        responses: list[Any] = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
        for i, request in enumerate(requests):
            try:
                feeds = self._feeds(request)
            except Exception as exc:
                responses[i] = error_response(f"{self.name}: {exc}")
                continue
            if self.batching:
                key = tuple((k, tuple(v.shape[1:]), str(v.dtype)) for k, v in sorted(feeds.items()))
            else:
                key = ("request", i)
            groups[key].append((i, feeds))
        for members in groups.values():
            try:
                for i, outputs in self._run_group(members):
                    responses[i] = pb_utils.InferenceResponse(output_tensors=outputs)
            except Exception as exc:
                for i, _ in members:
                    responses[i] = error_response(f"{self.name}: {type(exc).__name__}: {exc}")
        self.memory.after_request()
        return responses

    def _feeds(self, request: Any) -> dict[str, Any]:
        feeds: dict[str, Any] = {}
        for spec in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, spec["name"])
            if tensor is None:
                if spec.get("optional", False):
                    continue
                raise ValueError(f"input {spec['name']!r} is missing")
            if spec["data_type"] == "TYPE_STRING":  # DLPack has no string type
                feeds[spec["name"]] = tensor.as_numpy()
            else:
                feeds[spec["name"]] = self.read_input(tensor)
        return feeds

    def _run_group(self, members: list[tuple[int, dict[str, Any]]]) -> list[tuple[int, list[Any]]]:
        if len(members) == 1:
            i, feeds = members[0]
            return [(i, self._tensors(self.run(feeds)))]
        sizes = [int(next(iter(feeds.values())).shape[0]) for _, feeds in members]
        merged = {name: self.concat([feeds[name] for _, feeds in members]) for name in members[0][1]}
        results = self.run(merged)
        bounds = [0]
        for size in sizes:
            bounds.append(bounds[-1] + size)
        return [(i, self._tensors([r[bounds[k]:bounds[k + 1]] for r in results]))
                for k, (i, _) in enumerate(members)]

    def _tensors(self, arrays: Sequence[Any]) -> list[Any]:
        return [self.output_tensor(name, array) for name, array in zip(self.output_names, arrays, strict=True)]


def error_response(message: str) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))
