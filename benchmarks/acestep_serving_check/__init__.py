"""The GPU serving check, one module per section (``benchmarks/gpu_serving.py`` is its command line).

ACE-Step served by Triton (torch runtime) measured against the same code in-process, in ONE run
on ONE device, so the ratios printed side by side compare like with like:

* ``end_to_end`` — (a) Triton vs the same compiled components in-process, (b) vs eager PyTorch
  with one DiT call per CFG branch;
* ``throughput`` — (c) requests/s at concurrency 1/4/8, ``dit_decoder`` merging;
* ``memory`` — (d) peaks: per served component the weights' bytes next to its
  ``torch.cuda.max_memory_allocated`` (the components export both as gauges on Triton's
  ``/metrics``, :mod:`acestep_triton.serving.component_stats`), the in-process paths, ``nvidia-smi``
  and host RSS per served model (:mod:`acestep_triton.serving.health` finds the stubs,
  :mod:`acestep_triton.serving.memory` reads their RSS);
* ``lora`` — (e) what live LoRA adapters cost per DiT step;
* ``measure`` — the order, the server, and the guard that runs each section on its own: a section
  that fails is recorded (its error and traceback in ``sections``) and the others still run.

``plan`` holds what a run measures and its goals, ``report`` the report, the time box and the
section guard, ``figures`` the arithmetic of measured figures; ``paths`` the three ways a request
is served; ``placeholders`` the stand-ins for packages a bare GPU image lacks. The modules import
torch, tritonclient and the project modules built on them only inside the functions that use
them, so ``placeholders`` runs before the environment is complete.
"""
