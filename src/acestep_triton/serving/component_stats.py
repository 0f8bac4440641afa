"""What a served torch component holds on its device, exported as Prometheus gauges.

A component model is its own process (one per instance), so the figures that size a deployment
are per process: the bytes of the weights it keeps (after it dropped what it does not run and
cast to its precision) and ``torch.cuda.max_memory_allocated`` (weights + the largest
activations, CUDA-graph pools and LoRA adapters it has needed so far). ``nvidia-smi`` cannot say
this: it sees whole processes, CUDA context and allocator cache included, and a sandboxed machine
often lists no processes at all. The gauges go through the Python backend's custom-metrics API,
so they appear on Triton's own ``:8002/metrics`` beside the ``nv_*`` metrics (Prometheus scrapes
them in production; the GPU check reads them after its runs):

* ``acestep_component_weights_bytes{model,instance}``: parameters and buffers of the module;
* ``acestep_component_cuda_allocated_at_load_bytes{model,instance}``: ``memory_allocated`` right
  after loading (weights + whatever loading left allocated; 0 on the CPU);
* ``acestep_component_cuda_max_allocated_bytes{model,instance}``: ``max_memory_allocated`` since
  the process started, updated after every execution in which it grew (0 on the CPU).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

FAMILIES = {
    "acestep_component_weights_bytes": "Bytes of the parameters and buffers a component instance holds",
    "acestep_component_cuda_allocated_at_load_bytes":
        "torch.cuda.memory_allocated of a component instance right after loading (0 on the CPU)",
    "acestep_component_cuda_max_allocated_bytes":
        "torch.cuda.max_memory_allocated of a component instance since it started (0 on the CPU)",
}


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of ``tensors``, each storage counted once (tied weights share one)."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if key in seen and storage.data_ptr() != 0:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def module_bytes(module: Any) -> int:
    """Bytes of a module's parameters and buffers (0 for something that is not a module)."""
    if not isinstance(module, torch.nn.Module):
        return 0
    return tensor_bytes([*module.parameters(), *module.buffers()])


class ComponentMemoryMetrics:
    """The three gauges of one component instance (``pb_utils`` passed in: it only exists in the stub).

    :meth:`update` is called after every execution; it reads one allocator counter (no device
    synchronisation) and sets the gauge only when the peak grew, so the per-call cost is nil.
    """

    def __init__(self, pb_utils: Any, model: str, instance: str, device: torch.device, weights: int) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        labels = {"model": model, "instance": instance}
        gauge = pb_utils.MetricFamily.GAUGE
        # the families must outlive their metrics (the backend refuses a metric whose family is gone)
        self._families = {name: pb_utils.MetricFamily(name=name, description=text, kind=gauge)
                          for name, text in FAMILIES.items()}
        self._gauges = {name: family.Metric(labels=labels) for name, family in self._families.items()}
        self._gauges["acestep_component_weights_bytes"].set(float(weights))
        at_load = torch.cuda.memory_allocated(device) if self.cuda else 0
        self._gauges["acestep_component_cuda_allocated_at_load_bytes"].set(float(at_load))
        self.peak = -1
        self.update()

    def update(self) -> None:
        peak = int(torch.cuda.max_memory_allocated(self.device)) if self.cuda else 0
        if peak > self.peak:
            self.peak = peak
            self._gauges["acestep_component_cuda_max_allocated_bytes"].set(float(peak))
