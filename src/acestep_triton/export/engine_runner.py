"""Running a TensorRT plan in process, on torch tensors: benchmarks and tests, not serving.

Triton serves plans itself (``tensorrt_plan`` models, the ``tensorrt`` runtime), and the in-process
pipeline (``--local``) runs torch modules; this runner measures and checks an engine without a
server (``benchmarks/gpu_eager_vs_optimized.py --trt on``, ``tests/test_tensorrt_unit.py``).
:class:`TensorRTEngine` runs any plan; :class:`TensorRTDecoder` gives a ``dit_decoder`` engine
``transformer.decode``'s signature so the sampling code can call it. The plan's sidecar is checked
against this machine first (:func:`check_engine`), because a plan of another TensorRT or GPU
otherwise fails with an opaque deserialisation error.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .engine_meta import EngineMismatchError, RuntimeInfo, check_engine, import_tensorrt


def _torch_dtypes(trt: Any) -> dict[Any, Any]:
    """TensorRT data type → torch dtype, for the types this TensorRT has."""
    pairs = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
             "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}
    return {getattr(trt.DataType, k): v for k, v in pairs.items() if hasattr(trt.DataType, k)}


class TensorRTEngine:
    """Runs a plan on torch tensors, in process (benchmarks, tests).

    Inputs are moved to the engine's device and dtype; outputs are allocated by torch on the
    current CUDA stream, so the call composes with torch code without extra synchronisation.
    """

    def __init__(self, plan: str | Path, *, device: Any = "cuda", check: bool = True, trt: Any = None,
                 runtime: RuntimeInfo | None = None) -> None:
        self.trt = trt or import_tensorrt()
        self.device = torch.device(device)
        self.plan = Path(plan)
        self.meta = check_engine(self.plan, runtime) if check else None
        self._logger = self.trt.Logger(self.trt.Logger.WARNING)
        self._runtime = self.trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.plan.read_bytes())
        if self.engine is None:
            raise EngineMismatchError(f"{self.plan}: TensorRT could not deserialise the plan (built by another "
                                      f"TensorRT version or for another GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        dtypes = _torch_dtypes(self.trt)
        self.dtypes = {n: dtypes[self.engine.get_tensor_dtype(n)] for n in names}

    def _stream(self) -> int:
        """The current CUDA stream of the engine's device (0, the default stream, off CUDA)."""
        if self.device.type != "cuda":
            return 0
        return int(torch.cuda.current_stream(self.device).cuda_stream)

    def __call__(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Run on ``{input name: tensor}``; return ``{output name: tensor}``."""
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise KeyError(f"{self.plan.name}: missing inputs {missing}")
        feeds = []
        for name in self.input_names:
            tensor = inputs[name].to(device=self.device, dtype=self.dtypes[name]).contiguous()
            feeds.append(tensor)  # keep alive until the launch is queued
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise ValueError(f"{self.plan.name}: input {name} shape {tuple(tensor.shape)} is outside the "
                                 f"engine's profile {self.meta.profile.get(name) if self.meta else ''}")
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.output_names:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            outputs[name] = out
        if not self.context.execute_async_v3(self._stream()):
            raise RuntimeError(f"{self.plan.name}: TensorRT execution failed")
        return outputs


class TensorRTDecoder:
    """``transformer.decode``'s signature over a ``dit_decoder`` engine (per-row query scales)."""

    def __init__(self, engine: TensorRTEngine) -> None:
        self.engine = engine

    def __call__(self, latents: Any, latent_mask: Any, encoder_states: Any, encoder_mask: Any, timestep: Any,
                 query_scale: Any) -> Any:
        rows = latents.shape[0]
        if query_scale.dim() == 1:
            query_scale = query_scale.unsqueeze(0).expand(rows, -1)
        out = self.engine({"latents": latents, "latent_mask": latent_mask, "encoder_states": encoder_states,
                           "encoder_mask": encoder_mask, "timestep": timestep.reshape(-1).expand(rows),
                           "query_scale": query_scale})
        return out["velocity"]
