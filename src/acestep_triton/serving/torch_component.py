"""Python-backend model body that serves one component with its torch modules (``torch`` runtime).

Generic like the ONNX one: the config's tensors say what the component takes, the config
parameter ``component`` says which of the six it is (a LoRA variant such as ``dit_decoder__rap``
names its base component there, plus ``lora_path``/``lora_weight``), and ``checkpoint_dir`` where
its weights are (loaded strictly, only the files this component needs). The model runs on the
instance's device: ``KIND_GPU`` instances get their GPU from Triton (``model_instance_device_id``).

Tensors cross by DLPack both ways, on the device: a BLS caller that asked for GPU outputs gets
the very tensor the module produced, and its GPU inputs are read where they lie. Kernels are
queued on torch's stream, so outputs are synchronised before they are handed to Triton.

Config parameters: ``component``, ``checkpoint_dir`` (required); ``precision`` (``fp32``,
``bf16``, ``fp16``, or ``auto``: see :mod:`.torch_runtime`), ``compile`` and ``cuda_graphs``
(``auto`` = on for the DiT decoder on a GPU), ``max_graphs``, ``compile_backend``, ``warmup``
(shapes run in ``initialize``, so before the model reports ready: ``batch:frames:tokens,...``,
``default``, ``none``, ``auto``), ``torch_threads`` (CPU), ``lora_fast_path`` and
``lora_slots`` (live adapters on the compiled DiT), and for
LoRA variants ``lora_path``, ``lora_weight``, ``lora_scaling``. Live adapters
(:mod:`acestep_triton.lora.live`, condition encoder and DiT decoder): ``lora_state`` (the
state file listing the loaded adapters) and ``lora_memory_mb`` (budget of the resident A/B
tensors per instance, least recently used evicted); the config then has the optional per-row
inputs ``lora_index`` / ``lora_scale``.

On a GPU the renderer sets the Python backend's ``FORCE_CPU_ONLY_INPUT_TENSORS: no``, so a
GPU tensor from an endpoint arrives as it is instead of through the host. ``require_device_inputs``
(config parameter, or the environment variable ``ACESTEP_REQUIRE_DEVICE_INPUTS=1`` for every
component of a server, as the GPU check sets it) turns a host tensor arriving at a GPU instance
into an error naming the input: a check mode proving that no DiT call copies through the host.
Each instance exports what it holds on its device as gauges (:mod:`.component_stats`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.dlpack import to_dlpack

from ..export.specs import component
from . import component_model
from .component_model import BatchedComponentModel
from .component_stats import ComponentMemoryMetrics, module_bytes
from .torch_runtime import ComponentRunner, LiveAdapterOptions, RuntimeOptions, load_component_module

REQUIRE_DEVICE_INPUTS_ENV = "ACESTEP_REQUIRE_DEVICE_INPUTS"
_TRUE = ("1", "true", "yes", "on")


class InputOnHostError(ValueError):
    """An input reached a GPU instance through the host (check mode, see the module docstring)."""


def requires_device_inputs(parameters: Mapping[str, str], environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the check mode is on: the config parameter ``require_device_inputs`` or, for a
    whole server without re-rendering, the environment variable ``ACESTEP_REQUIRE_DEVICE_INPUTS``."""
    return (parameters.get("require_device_inputs", "").strip().lower() in _TRUE
            or environ.get(REQUIRE_DEVICE_INPUTS_ENV, "").strip().lower() in _TRUE)


def check_input_device(name: str, tensor: torch.Tensor, device: torch.device) -> None:
    """Refuse a host tensor at a GPU instance (the check mode's one rule); CPU instances take any."""
    if device.type == "cuda" and tensor.device.type != "cuda":
        raise InputOnHostError(
            f"input {name!r} arrived on the host ({tensor.device}) at an instance on {device} "
            f"(require_device_inputs): the caller sent it from the host, or the config lacks "
            f"FORCE_CPU_ONLY_INPUT_TENSORS: no, so every call copies it device→host→device")


def instance_device(kind: str | None, device_id: str | int | None) -> torch.device:
    """The torch device of an instance: its GPU for ``KIND_GPU``, else the CPU."""
    if (kind or "").upper() == "GPU":
        if not torch.cuda.is_available():
            raise RuntimeError("a KIND_GPU instance, but torch sees no CUDA device")
        return torch.device("cuda", int(device_id or 0))
    return torch.device("cpu")


class TorchComponentModel(BatchedComponentModel):
    """``TritonPythonModel`` for one component run by torch (see the module docstring)."""

    def load(self, args: dict[str, str]) -> None:
        params = self.parameters
        name = params.get("component", "")
        spec = component(name)
        ckpt = params.get("checkpoint_dir")
        if not ckpt:
            raise ValueError(f"{self.name}: config parameter 'checkpoint_dir' is required")
        threads = int(params.get("torch_threads") or 0)
        if threads > 0:  # 0: torch's default (all cores)
            torch.set_num_threads(threads)
        self.device = instance_device(args.get("model_instance_kind"), args.get("model_instance_device_id"))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        options = RuntimeOptions.for_component(spec.name, self.device, params)
        lora = {}
        if params.get("lora_path"):
            lora = {"lora_path": params["lora_path"], "lora_weight": float(params.get("lora_weight", "1")),
                    "lora_scaling": params.get("lora_scaling", "upstream")}
        started = time.perf_counter()
        module = load_component_module(spec.name, ckpt, dtype=options.dtype, **lora)
        loras = LiveAdapterOptions.from_parameters(self.name, params)
        self.runner = ComponentRunner(spec, module, options, loras)
        self.require_device_inputs = requires_device_inputs(params)
        self.memory_metrics: ComponentMemoryMetrics | None = None
        if component_model.pb_utils is not None:
            self.memory_metrics = ComponentMemoryMetrics(
                component_model.pb_utils, self.name, str(args.get("model_instance_name", self.name)), self.device,
                module_bytes(getattr(self.runner, "graph", None)))
            component_model.pb_utils.Logger.log_info(
                f"{self.name}: {self.runner.description}, loaded in {time.perf_counter() - started:.1f} s"
                + (", refusing inputs that arrive on the host" if self.require_device_inputs else ""))

    def read_input(self, tensor: Any) -> torch.Tensor:
        value = torch.from_dlpack(tensor.to_dlpack())
        if getattr(self, "require_device_inputs", False):
            check_input_device(tensor.name(), value, self.device)
        return value

    def concat(self, arrays: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(arrays))

    def run(self, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        outputs = self.runner(feeds)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        if getattr(self, "memory_metrics", None) is not None:
            self.memory_metrics.update()
        return outputs

    def output_tensor(self, name: str, array: torch.Tensor) -> Any:
        return component_model.pb_utils.Tensor.from_dlpack(name, to_dlpack(array.contiguous()))

    def finalize(self) -> None:
        self.runner = None
