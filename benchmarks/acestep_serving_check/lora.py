"""(e) What live LoRA adapters cost per DiT step on this device (``benchmarks/lora_live_adapters.py``)."""

from __future__ import annotations

from .plan import Plan
from .report import Deadline, Report, SkipSectionError


def measure_lora(plan: Plan, report: Report, deadline: Deadline) -> None:
    """One DiT block at the real width, bf16 on a GPU, r = 16, 64, 256 against none, every row or
    half the rows with the adapter. In-process: it measures the adapter arithmetic, not Triton
    (the served path runs the same :class:`~acestep_triton.lora.live.AdapterBank`)."""
    import lora_live_adapters  # torch and the LoRA runtime: heavy (see __init__), imported where used

    if deadline.left() < 30:
        raise SkipSectionError("the time budget is spent")
    cuda = plan.device.startswith("cuda")
    argv = ["--device", plan.device, "--dtype", "bf16" if cuda else "fp32", "--threads", "0",
            "--repeats", "2" if plan.dry_run else "10"]
    argv += ["--width", "256", "--frames", "8"] if plan.dry_run else ["--frames", "645"]
    texts = lora_live_adapters.tables(lora_live_adapters.parse_args(argv))
    report.add("e_lora", {"argv": argv}, "\n\n".join(["(e) live LoRA adapters (in-process)", *texts]))
