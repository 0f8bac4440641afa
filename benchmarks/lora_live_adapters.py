"""Live LoRA adapters: what N adapters cost in memory, and what an adapter costs per DiT step.

Two tables:

1. **Memory of N adapters** for the real ACE-Step v1 3.5B shapes (the transformer built on the
   meta device from the published sizes: every shape, no weights) and upstream's adapter
   targets (``speaker_embedder``, the Conformer's ``linear_q/k/v``, the DiT's ``to_q/k/v/out.0``):
   live adapters cost the base transformer once plus each adapter's A/B tensors; fused
   variants cost a full copy of every touched component per adapter and strength. The runtime
   column is also *measured* on the benchmark model below: the bytes an ``AdapterBank`` holds
   for N resident adapters, next to the base weights' bytes.
2. **Extra time per DiT step** at rank r = 16, 64, 256 against no adapter, on a DiT decoder at
   the real width (2560 = 20 heads x 128, FF 6400) with ``--blocks`` blocks (default 1; every
   block does the same work, so the relative cost is that of the 24-block model), random
   weights: every row with one adapter, and half the rows with an adapter and half without
   (rows without cost nothing; the adapter rows are gathered, computed and added back).

Usage: ``python benchmarks/lora_live_adapters.py [--device cpu|cuda] [--frames 128] [--rows 2]
[--blocks 1] [--repeats 5] [--threads 1] [--dtype fp32|bf16] [--width 2560]``
(``benchmarks/gpu_serving.py measure`` runs it on the GPU as section (e)). Timings on a shared CPU vary by
a few percent between runs; compare the columns of one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import acestep_bench as bench

bench.ensure_project_importable()

import torch  # noqa: E402
from torch import nn  # noqa: E402

from acestep_triton.lora import (  # noqa: E402
    LoraAdapter,
    LoraLayer,
    LoraSettings,
    component_of,
)
from acestep_triton.lora.files import target_shape  # noqa: E402
from acestep_triton.lora.live import RowGroup, live_adapter, lora_rows  # noqa: E402
from acestep_triton.models.transformer import ACEStepTransformer, unused_key  # noqa: E402
from acestep_triton.serving.torch_runtime import DECODE_ONLY, ENCODE_ONLY  # noqa: E402
from acestep_triton.synthetic.tiny_lora import target_module_paths  # noqa: E402

RANKS = (16, 64, 256)
ADAPTER_COUNTS = (1, 4, 16)
GIB = 2**30

REAL_CONFIG: dict[str, Any] = {
    "in_channels": 8, "out_channels": 8, "num_layers": 24, "num_attention_heads": 20, "attention_head_dim": 128,
    "inner_dim": 2560, "mlp_ratio": 2.5, "patch_size": [16, 1], "max_height": 16, "max_width": 32768,
    "max_position": 32768, "rope_theta": 1000000.0, "text_embedding_dim": 768, "speaker_embedding_dim": 512,
    "lyric_encoder_vocab_size": 6693, "lyric_hidden_size": 1024, "lyric_encoder_num_heads": 16,
    "lyric_encoder_linear_units": 4096, "lyric_encoder_num_blocks": 6, "ssl_encoder_depths": [8, 8],
    "ssl_latent_dims": [1024, 768], "ssl_names": ["mert", "m-hubert"],
}
"""ACE-Step v1 3.5B's transformer sizes (``../shared/ACE_STEP_FACTS.md``)."""


def transformer(config: dict[str, Any], device: str | torch.device = "meta") -> nn.Module:
    with torch.device(device):
        return ACEStepTransformer.from_config(config)


def synthetic_adapter(model: nn.Module, rank: int, seed: int = 0) -> Any:
    """A LoRA on upstream's targets with random A/B (shapes read from ``model``)."""
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for path in target_module_paths(model):
        out_features, in_features = target_shape(model.get_submodule(path))  # type: ignore[misc]
        down = torch.randn(rank, in_features, generator=generator) * in_features ** -0.5
        up = torch.randn(out_features, rank, generator=generator) * 0.02
        layers[path] = LoraLayer(module=path, down=down, up=up, scaling=1.0)
    return LoraAdapter(name=f"r{rank}_{seed}", path=Path(f"synthetic-r{rank}"), layers=layers,
                       settings=LoraSettings(source="default"))


def adapter_parameters(model: nn.Module, rank: int) -> dict[str, int]:
    """A/B elements per served component of a rank-``rank`` adapter on upstream's targets."""
    out: dict[str, int] = {"condition_encoder": 0, "dit_decoder": 0}
    for path in target_module_paths(model):
        out_features, in_features = target_shape(model.get_submodule(path))  # type: ignore[misc]
        out[component_of(path)] += rank * (in_features + out_features)
    return out


def half_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters each served transformer half keeps (``torch_runtime``'s ENCODE_ONLY/DECODE_ONLY)."""
    def count(names: tuple[str, ...]) -> int:
        return sum(p.numel() for n, p in model.named_parameters()
                   if n.split(".", 1)[0] in names and not unused_key(n))

    return {"condition_encoder": count((*ENCODE_ONLY, "speaker_embedder")),
            "dit_decoder": count((*DECODE_ONLY, "speaker_embedder"))}


def memory_table(bytes_per: int) -> str:
    model = transformer(REAL_CONFIG)
    base = half_parameters(model)
    base_total = sum(base.values())
    rows = []
    for rank in RANKS:
        lora = sum(adapter_parameters(model, rank).values())
        for n in ADAPTER_COUNTS:
            runtime = base_total + n * lora
            fused = base_total + n * base_total  # every touched half once more per variant
            rows.append((rank, n, lora / 1e6, runtime * bytes_per / GIB, fused * bytes_per / GIB,
                         fused / runtime))
    header = (f"3.5B transformer halves: condition_encoder {base['condition_encoder'] / 1e9:.3f} G + dit_decoder "
              f"{base['dit_decoder'] / 1e9:.3f} G parameters; {bytes_per} bytes each")
    table = bench.format_table(("rank", "adapters", "A/B per adapter (M params)", "runtime: base + A/B (GiB)",
                                "fused variants (GiB)", "fused / runtime"), rows,
                               "Memory of N adapters, ACE-Step v1 3.5B shapes in bf16 (computed from the shapes)")
    return header + "\n\n" + table


def bench_model(args: argparse.Namespace) -> nn.Module:
    heads = max(1, args.width // 128)
    config = {**REAL_CONFIG, "num_layers": args.blocks, "lyric_encoder_num_blocks": 1, "inner_dim": args.width,
              "num_attention_heads": heads, "attention_head_dim": args.width // heads}
    torch.manual_seed(0)
    model = transformer(config, "cpu")
    for p in model.parameters():  # checkpoint-like magnitudes: keeps activations finite over the blocks
        nn.init.normal_(p, std=0.02)
    for name in ENCODE_ONLY:
        setattr(model, name, None)
    return model.to(device=args.device, dtype=args.torch_dtype).eval().requires_grad_(False)


def measured_memory(model: nn.Module, args: argparse.Namespace, rank: int = 64) -> str:
    base = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = []
    resident = []
    for n in range(1, max(ADAPTER_COUNTS) + 1):
        adapter = synthetic_adapter(model, rank, seed=n)
        resident.append(live_adapter(adapter, "dit_decoder", model, index=n, device=args.device,
                                     dtype=args.torch_dtype))
        if n in ADAPTER_COUNTS:
            held = sum(a.nbytes for a in resident)
            rows.append((n, base / 2**20, held / 2**20, (base + held) / 2**20, (n + 1) * base / 2**20))
    return bench.format_table(("adapters", "base weights (MiB)", "resident A/B (MiB)", "runtime total (MiB)",
                               "fused: base + N copies (MiB)"), rows,
                              f"Measured: bytes held by the benchmark DiT ({args.blocks} block(s), width {args.width}) "
                              f"with N rank-{rank} live adapters")


def time_steps(model: nn.Module, args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    rows, frames, tokens = args.rows, args.frames, args.tokens
    generator = torch.Generator().manual_seed(1)
    inputs = (torch.randn(rows, 8, 16, frames, generator=generator), torch.ones(rows, frames),
              torch.randn(rows, tokens, args.width, generator=generator), torch.ones(rows, tokens),
              torch.full((rows,), 500.0), torch.ones(rows, args.blocks))
    inputs = tuple(t.to(device=device, dtype=args.torch_dtype if t.is_floating_point() else t.dtype) for t in inputs)

    def step() -> None:
        with torch.inference_mode():
            model.decode(*inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def once(groups: list[RowGroup] | None) -> float:
        started = time.perf_counter()
        if groups:
            with lora_rows(model, groups):
                step()
        else:
            step()
        return time.perf_counter() - started

    half = torch.arange(0, rows, 2, device=device)
    weights = torch.ones(rows, device=device)
    cases: dict[tuple[str, str], list[RowGroup] | None] = {("none", "-"): None}
    for rank in RANKS:
        adapter = live_adapter(synthetic_adapter(model, rank), "dit_decoder", model, device=device,
                               dtype=args.torch_dtype)
        cases[(f"r={rank}", "all rows")] = [RowGroup(adapter=adapter, rows=None, weights=weights)]
        cases[(f"r={rank}", f"{len(half)} of {rows} rows")] = [
            RowGroup(adapter=adapter, rows=half, weights=weights[: len(half)])]
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in cases}
    for groups in cases.values():  # warm-up
        once(groups)
    for _ in range(args.repeats):  # interleaved rounds: drift of a shared machine hits every case alike
        for key, groups in cases.items():
            samples[key].append(once(groups))
    base = statistics.median(samples[("none", "-")])
    table = [(*key, statistics.median(s) * 1e3, (statistics.median(s) / base - 1) * 100)
             for key, s in samples.items()]
    return bench.format_table(("adapter", "rows with it", "ms per DiT step", "extra vs none (%)"), table,
                              f"Time per DiT step on {args.device} ({args.dtype}, {torch.get_num_threads()} "
                              f"thread(s)): {args.blocks} block(s) at width {args.width}, {rows} rows x {frames} "
                              f"frames, {tokens} encoder tokens, median of {args.repeats}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--frames", type=int, default=128, help="latent frames per row")
    parser.add_argument("--tokens", type=int, default=64, help="encoder tokens per row")
    parser.add_argument("--rows", type=int, default=2, help="DiT rows (items x guidance branches)")
    parser.add_argument("--blocks", type=int, default=1, help="DiT blocks of the timed model")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (0: torch's default)")
    parser.add_argument("--width", type=int, default=2560, help="DiT width of the timed model (3.5B: 2560)")
    parser.add_argument("--skip-timing", action="store_true", help="memory tables only")
    args = parser.parse_args(argv)
    args.torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    return args


def tables(args: argparse.Namespace) -> list[str]:
    """The three tables (the GPU serving check adds them to its report)."""
    if args.threads > 0 and args.device == "cpu":
        torch.set_num_threads(args.threads)
    out = [memory_table(2)]  # bf16: what the GPU serves the transformer halves in
    model = bench_model(args)
    out.append(measured_memory(model, args))
    if not args.skip_timing:
        out.append(time_steps(model, args))
    return out


def main(argv: list[str] | None = None) -> int:
    print("\n\n".join(tables(parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
