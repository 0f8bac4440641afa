"""Same generation, two ways, on one GPU: upstream-style eager PyTorch vs our optimised path.

The full-size ACE-Step DiT (random weights, official shapes: 24 blocks × 2560) generates
``--seconds`` of audio with upstream's default sampling (APG guidance 15, ERG on text, lyrics
and diffusion, guidance interval 0.5, Euler, omega 10) at each ``--steps`` count, then the
latents are decoded to 48 kHz audio by the DCAE decoder and the vocoder (overlapped windows
past 48 s, as the pipeline does). Measured per run, with ``torch.cuda.synchronize()`` around it
and after warm-up: the sampling loop and the latents → audio decode. RTF = audio seconds / wall
seconds. Variants:

* ``eager-sequential``: bf16 PyTorch, one DiT call per guidance branch (upstream's way);
* ``optimized``: bf16 PyTorch, all branches of a step in one call, replayed from CUDA graphs;
* ``tensorrt``: the same batched loop with the DiT as a TensorRT engine (bf16 mixed precision,
  built here, profile fixed to this length) when ``import tensorrt`` works.

The text encoder is replaced by fixed random prompt states (token ids are fixed too): prompt
encoding is not part of what is timed, and this keeps transformers and the lyric stack out of
the GPU run. On a CPU (``--model tiny --device cpu``) the same code runs with the tiny model,
without CUDA graphs: that is what the test suite runs to check the logic.

Usage: ``python benchmarks/gpu_eager_vs_optimized.py [--seconds 60] [--steps 27,60] [--layers 24]
[--trt auto|on|off] [--json results.json] [--markdown results.md]``.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import acestep_bench as bench

bench.ensure_project_importable()
SOUNDFILE_STUBBED = bench.stub_soundfile_if_missing()

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from acestep_triton.codec import AudioCodec  # noqa: E402
from acestep_triton.gpu import CUDAGraphDecoder  # noqa: E402
from acestep_triton.sampling import (  # noqa: E402
    EncodedConditions,
    PromptTokens,
    SamplerConfig,
    SamplingHooks,
    build_conditions,
    latent_frames,
    sample_text2music,
)
from acestep_triton.sampling.erg import dit_query_scale  # noqa: E402
from acestep_triton.synthetic.full_size import FullSizeConfigs, build_random_models  # noqa: E402
from acestep_triton.synthetic.tiny_checkpoint import (  # noqa: E402
    tiny_dcae_config,
    tiny_transformer_config,
    tiny_vocoder_config,
)

OUTPUT_RATE = 48000
TEXT_LAYERS = 12
"""UMT5-base blocks: the length of the (stand-in) text encoder's query scale."""

DecodeFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


# ------------------------------------------------------------------------------- the backend
class CallCounter:
    """Counts DiT calls (one per decode invocation) around any decode function."""

    def __init__(self, fn: DecodeFn) -> None:
        self.fn = fn
        self.calls = 0

    def __call__(self, *args: Tensor) -> Tensor:
        self.calls += 1
        return self.fn(*args)


class SequentialBranches:
    """One DiT call per guidance branch, upstream's way: the rows the sampling loop stacks for a
    step (items × branches) are split into ``items``-row calls. With ERG diffusion the loop
    already calls per branch (different query scales); this keeps it so when the scales match."""

    def __init__(self, fn: DecodeFn, items: int) -> None:
        self.fn = fn
        self.items = items

    def __call__(self, latents: Tensor, latent_mask: Tensor, encoder_states: Tensor, encoder_mask: Tensor,
                 timestep: Tensor, query_scale: Tensor) -> Tensor:
        if latents.shape[0] <= self.items:
            return self.fn(latents, latent_mask, encoder_states, encoder_mask, timestep, query_scale)
        outs = []
        for start in range(0, latents.shape[0], self.items):
            rows = slice(start, start + self.items)
            scale = query_scale[rows] if query_scale.dim() == 2 else query_scale
            outs.append(self.fn(latents[rows], latent_mask[rows], encoder_states[rows], encoder_mask[rows],
                                timestep[rows], scale))
        return torch.cat(outs)


class BenchBackend:
    """The :class:`~acestep_triton.sampling.ComponentBackend` of the benchmark: random-weight modules in
    ``dtype`` on one device, a fixed stand-in for the text encoder, a pluggable DiT decode."""

    def __init__(self, transformer: nn.Module, dcae_decoder: nn.Module, vocoder: nn.Module, dtype: torch.dtype,
                 text_states: Tensor, decode: DecodeFn | None = None) -> None:
        self.transformer = transformer
        self.dcae_decoder = dcae_decoder
        self.vocoder = vocoder
        self.dtype = dtype
        self.text_states = text_states
        self.decode: DecodeFn = decode or transformer.decode

    @property
    def text_layers(self) -> int:
        return TEXT_LAYERS

    @property
    def lyric_layers(self) -> int:
        return int(self.transformer.lyric_layers)

    @property
    def dit_layers(self) -> int:
        return int(self.transformer.num_layers)

    def with_decode(self, decode: DecodeFn) -> BenchBackend:
        other = copy.copy(self)
        other.decode = decode
        return other

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor, query_scale: Tensor) -> Tensor:
        # Stand-in for UMT5: fixed states; the ERG-weakened pass gives different ones.
        weakened = bool((query_scale < 1).any())
        states = self.text_states * (0.5 if weakened else 1.0)
        return states.expand(input_ids.shape[0], -1, -1)

    def encode_conditions(self, text_states: Tensor, text_mask: Tensor, speaker: Tensor, lyric_ids: Tensor,
                          lyric_mask: Tensor, lyric_query_scale: Tensor) -> tuple[Tensor, Tensor]:
        return self.transformer.encode(text_states, text_mask, speaker, lyric_ids, lyric_mask, lyric_query_scale)

    def predict_velocity(self, latents: Tensor, latent_mask: Tensor, encoder_states: Tensor,
                         encoder_mask: Tensor, timestep: Tensor, query_scale: Tensor) -> Tensor:
        return self.decode(latents, latent_mask, encoder_states, encoder_mask, timestep, query_scale).float()

    def encode_mel(self, mel: Tensor) -> Tensor:
        raise NotImplementedError("the benchmark only decodes")

    def decode_latents(self, latents: Tensor) -> Tensor:
        return self.dcae_decoder(latents.to(self.dtype)).float()

    def vocode(self, mel: Tensor) -> Tensor:
        return self.vocoder(mel.to(self.dtype)).float()


# ------------------------------------------------------------------------------- measuring
@dataclass
class Variant:
    name: str
    backend: BenchBackend
    row_query_scale: bool
    counter: CallCounter
    note: str = ""


@dataclass
class Measurement:
    variant: str
    steps: int
    loop_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)
    dit_calls: int = 0
    max_rel_diff_vs_eager: float = float("nan")
    finite: bool = True

    @property
    def total_s(self) -> float:
        return statistics.median(a + b for a, b in zip(self.loop_s, self.decode_s, strict=True))

    def as_dict(self, seconds: float) -> dict[str, Any]:
        return {"variant": self.variant, "steps": self.steps, "loop_s": self.loop_s, "decode_s": self.decode_s,
                "total_s_median": self.total_s, "rtf": seconds / self.total_s, "dit_calls": self.dit_calls,
                "max_rel_diff_vs_eager": self.max_rel_diff_vs_eager, "finite": self.finite}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(variant: Variant, conditions: EncodedConditions, noise: Tensor, config: SamplerConfig,
             codec: AudioCodec, seconds: float) -> tuple[Tensor, Tensor, float, float]:
    """One timed generation: (latents, audio, loop seconds, decode seconds)."""
    device = noise.device
    with torch.inference_mode():
        synchronize(device)
        started = time.perf_counter()
        latents = sample_text2music(variant.backend, conditions, noise, config,
                                    hooks=SamplingHooks(row_query_scale=variant.row_query_scale))
        synchronize(device)
        looped = time.perf_counter()
        audio = codec.decode(latents, OUTPUT_RATE, codec.should_overlap(seconds))
        synchronize(device)
        done = time.perf_counter()
    return latents, audio, looped - started, done - looped


def graph_self_check(decoder: Any, transformer: nn.Module, conditions: EncodedConditions,
                     noise: Tensor) -> dict[str, Any]:
    """One guided step's DiT call (conditional + ERG-weakened unconditional row) through the CUDA
    graph and eagerly, at two timesteps: the replay must equal eager decode and follow its
    inputs (a stale static buffer would return the first result twice)."""
    device = noise.device
    layers = int(transformer.num_layers)
    latents = torch.cat([noise, noise * 0.5])
    frames = torch.ones(2, noise.shape[-1], device=device)
    states = torch.cat([conditions.cond, conditions.uncond if conditions.uncond is not None else conditions.cond])
    mask = torch.cat([conditions.mask, conditions.mask])
    scale = torch.stack([dit_query_scale(layers, False, device), dit_query_scale(layers, True, device)])
    diffs, results = [], []
    with torch.inference_mode():
        for t in (500.0, 250.0):
            timestep = torch.full((2,), t, device=device)
            graphed = decoder(latents, frames, states, mask, timestep, scale)
            eager = transformer.decode(latents, frames, states, mask, timestep, scale)
            diffs.append(float((graphed - eager).abs().max() / eager.abs().max().clamp_min(1e-12)))
            results.append(graphed)
    return {"max_rel_diff": max(diffs), "follows_inputs": not torch.equal(results[0], results[1])}


# ------------------------------------------------------------------------------- TensorRT
def compiled_graph_decoder(transformer: nn.Module, conditions: EncodedConditions, noise: Tensor,
                           no_graphs: bool) -> tuple[DecodeFn, str]:
    """A copy of the DiT whose blocks are compiled by TorchInductor (fused element-wise work),
    replayed as CUDA graphs. One compilation serves all 24 blocks (same code, weights as inputs);
    the copy keeps the other variants eager."""
    started = time.perf_counter()
    twin = copy.deepcopy(transformer)
    for block in twin.transformer_blocks:
        block.compile(dynamic=False)
    decode: DecodeFn = twin.decode
    if not no_graphs:
        decode = CUDAGraphDecoder(twin)
    # compile both shapes a step can have (guided rows, conditional-only) before timing
    rows = 2
    with torch.inference_mode():
        for batch in (rows, 1):
            frames = noise.shape[-1]
            decode(noise.expand(batch, -1, -1, -1).contiguous(),
                   torch.ones(batch, frames, device=noise.device),
                   conditions.cond.expand(batch, -1, -1).contiguous(),
                   conditions.mask.expand(batch, -1).contiguous(),
                   torch.full((batch,), 500.0, device=noise.device),
                   torch.ones(batch, twin.num_layers, device=noise.device))
    if noise.is_cuda:
        torch.cuda.synchronize()
    graphs = "" if no_graphs else " + CUDA graphs"
    return decode, (f"TorchInductor-compiled DiT blocks{graphs}, CFG branches batched "
                    f"(compiled in {time.perf_counter() - started:.0f} s)")


def tensorrt_available() -> bool:
    return bench.importable("tensorrt")


def _build_engine_subprocess(onnx_path: Path, plan: Path, precision: str, frames: int, tokens: int,
                             rows: int) -> None:
    """Entry of ``--_build-engine``: build a fixed-length dit_decoder engine (run in a child
    process so a build can be time-boxed and killed)."""
    # the TensorRT tooling (optional, heavy: tensorrt) only where an engine is built
    from acestep_triton.export import specs
    from acestep_triton.export.engine_build import BuildOptions, build_engine
    from acestep_triton.export.engine_profiles import fixed_profile
    from acestep_triton.export.specs import read_onnx_sizes

    spec = specs.component("dit_decoder")
    shapes = fixed_profile(spec, read_onnx_sizes(spec, onnx_path), batch=(1, rows, rows),
                           lengths={"W": frames, "S": tokens})
    build_engine(onnx_path, plan, spec, options=BuildOptions(precision=precision,
                                                             timing_cache=plan.parent / "timing.cache"),
                 shapes=shapes)


def tensorrt_decoder(transformer: nn.Module, workdir: Path, precision: str, frames: int, tokens: int,
                     rows: int, timeout_s: float) -> tuple[DecodeFn | None, str]:
    """Export the DiT decoder (fp32 copy, traced on its device) and build its engine in a child
    process with a time limit; return (decode function, note)."""
    # the TensorRT tooling (optional, heavy: tensorrt) only where an engine is built
    from acestep_triton.export.engine_build import export_modules
    from acestep_triton.export.engine_runner import TensorRTDecoder, TensorRTEngine

    started = time.monotonic()
    fp32 = copy.deepcopy(transformer).float() if transformer.dtype != torch.float32 else transformer
    onnx_path = export_modules({"dit_decoder": fp32}, workdir)["dit_decoder"]
    del fp32
    torch.cuda.empty_cache()
    exported = time.monotonic() - started
    plan = workdir / "dit_decoder.plan"
    command = [sys.executable, __file__, "--_build-engine", str(onnx_path), str(plan), precision, str(frames),
               str(tokens), str(rows)]
    try:
        subprocess.run(command, check=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None, f"engine build exceeded {timeout_s:.0f} s (export took {exported:.0f} s)"
    except subprocess.CalledProcessError as exc:
        return None, f"engine build failed (exit {exc.returncode}); see the log above"
    built = time.monotonic() - started - exported
    engine = TensorRTEngine(plan, device=next(transformer.parameters()).device)
    return TensorRTDecoder(engine), f"{precision} engine: export {exported:.0f} s, build {built:.0f} s"


# ------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("full", "tiny"), default="full",
                        help="full: official sizes (random weights); tiny: the test checkpoint's sizes")
    parser.add_argument("--layers", type=int, default=None, help="DiT blocks (default: 24)")
    parser.add_argument("--seconds", type=float, default=60.0, help="audio duration to generate")
    parser.add_argument("--steps", default="27,60", help="comma-separated step counts")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                        help="model dtype (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per variant and step count")
    parser.add_argument("--warmup-steps", type=int, default=3, help="steps of the warm-up generation")
    parser.add_argument("--no-graphs", action="store_true", help="optimized variant without CUDA graphs")
    parser.add_argument("--compile", action="store_true",
                        help="add a variant with TorchInductor-compiled DiT blocks (+ CUDA graphs)")
    parser.add_argument("--trt", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--trt-precision", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--trt-build-timeout", type=float, default=480.0)
    parser.add_argument("--text-tokens", type=int, default=32, help="prompt tokens (fixed ids)")
    parser.add_argument("--lyric-tokens", type=int, default=200, help="lyric tokens (fixed ids)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the results table here")
    return parser.parse_args(argv)


def tiny_configs() -> FullSizeConfigs:
    return FullSizeConfigs(tiny_transformer_config(), tiny_dcae_config(), tiny_vocoder_config())


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def fixed_inputs(transformer: nn.Module, text_tokens: int, lyric_tokens: int, device: torch.device,
                 seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fixed token ids and stand-in prompt states (no tokenizer, no text encoder)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 200, (1, text_tokens), generator=generator)
    vocab = int(transformer.config.lyric_encoder_vocab_size)
    lyric_ids = torch.randint(3, vocab, (1, lyric_tokens), generator=generator)
    text_states = torch.randn(1, text_tokens, int(transformer.config.text_embedding_dim), generator=generator)
    ones = torch.ones(1, text_tokens, dtype=torch.int64)
    return (input_ids.to(device), ones.to(device), lyric_ids.to(device),
            torch.ones(1, lyric_tokens, dtype=torch.int64, device=device), text_states.to(device) * 0.2)


@dataclass
class Workload:
    """What every variant runs: the random models behind one backend, the fixed inputs and their
    conditions, the noise."""

    device: torch.device
    transformer: nn.Module
    base: BenchBackend
    codec: AudioCodec
    conditions: EncodedConditions
    noise: Tensor
    frames: int
    tokens: int


def run_info(args: argparse.Namespace) -> tuple[torch.device, torch.dtype, list[int], dict[str, Any]]:
    """The device, dtype and step counts ``args`` ask for, and the results' header."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no GPU (use --device cpu --model tiny)")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    steps_list = [int(s) for s in str(args.steps).split(",") if s.strip()]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    info: dict[str, Any] = {
        "device": describe_device(device), "torch": torch.__version__,
        "cuda": torch.version.cuda, "dtype": str(dtype).replace("torch.", ""), "model": args.model,
        "seconds": args.seconds, "frames": latent_frames(args.seconds), "steps": steps_list,
        "soundfile_stubbed": SOUNDFILE_STUBBED,
    }
    print(f"device: {info['device']}; torch {torch.__version__} (CUDA {torch.version.cuda}); {info['dtype']}",
          flush=True)
    return device, dtype, steps_list, info


def build_workload(args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
                   info: dict[str, Any]) -> Workload:
    """Random models at the requested size, fixed token ids, their conditions and the noise."""
    started = time.monotonic()
    configs = tiny_configs() if args.model == "tiny" else None
    models = build_random_models(device, dtype, layers=args.layers, seed=args.seed, configs=configs,
                                 parts=("transformer", "dcae_decoder", "vocoder"))
    transformer = models.transformer
    info.update(layers=transformer.num_layers, width=int(transformer.config.inner_dim),
                parameters=models.parameter_count(), build_s=round(time.monotonic() - started, 1))
    print(f"models: DiT {transformer.num_layers} blocks × {info['width']}, "
          f"{info['parameters'] / 1e9:.2f} B parameters (with DCAE decoder + vocoder), built in "
          f"{info['build_s']} s", flush=True)

    input_ids, text_mask, lyric_ids, lyric_mask, text_states = fixed_inputs(
        transformer, args.text_tokens, args.lyric_tokens, device, args.seed)
    base = BenchBackend(transformer, models.dcae_decoder, models.vocoder, dtype, text_states)
    codec = AudioCodec(base.encode_mel, base.decode_latents, base.vocode, models.vocoder.mel_transform,
                       overlapped_decode=True)
    frames = latent_frames(args.seconds)
    noise = torch.randn(1, 8, 16, frames, generator=torch.Generator().manual_seed(args.seed)).to(device)

    with torch.inference_mode():
        conditions = build_conditions(base, PromptTokens(input_ids, text_mask, lyric_ids, lyric_mask), SamplerConfig())
    return Workload(device, transformer, base, codec, conditions, noise, frames, int(conditions.cond.shape[1]))


def torch_variants(args: argparse.Namespace, work: Workload, info: dict[str, Any]) -> tuple[list[Variant], bool]:
    """Eager sequential CFG, the optimised path (batched CFG, CUDA graphs on a GPU, checked
    against eager first) and with ``--compile`` the compiled one; and whether graphs are used."""
    device, transformer, base = work.device, work.transformer, work.base
    variants = []
    eager = CallCounter(transformer.decode)  # counts real DiT calls, inside the branch splitter
    variants.append(Variant("eager-sequential", base.with_decode(SequentialBranches(eager, items=1)), False,
                            eager, "PyTorch, one DiT call per CFG branch"))
    uses_graphs = device.type == "cuda" and not args.no_graphs
    if uses_graphs:
        graphs = CUDAGraphDecoder(transformer)
        check = graph_self_check(graphs, transformer, work.conditions, work.noise)
        info["graph_self_check"] = check
        print(f"CUDA graph self-check: replay vs eager decode, max rel diff {check['max_rel_diff']:.3g}; "
              f"replay follows new inputs: {check['follows_inputs']}", flush=True)
        optimized = CallCounter(graphs)
        note = "PyTorch, CFG branches batched, CUDA graphs"
    else:
        optimized = CallCounter(transformer.decode)
        note = "PyTorch, CFG branches batched" + (" (no CUDA graphs on CPU)" if device.type != "cuda" else "")
    variants.append(Variant("optimized", base.with_decode(optimized), True, optimized, note))
    if args.compile:
        compiled_decode, compile_note = compiled_graph_decoder(transformer, work.conditions, work.noise,
                                                               args.no_graphs or device.type != "cuda")
        print(f"compiled: {compile_note}", flush=True)
        compiled = CallCounter(compiled_decode)
        variants.append(Variant("compiled", base.with_decode(compiled), True, compiled, compile_note))
    return variants, uses_graphs


def tensorrt_variant(args: argparse.Namespace, work: Workload, info: dict[str, Any]) -> Variant | None:
    """The TensorRT variant when asked for (``--trt on``) or possible (``auto``); its note either way."""
    device = work.device
    want_trt = args.trt == "on" or (args.trt == "auto" and device.type == "cuda" and tensorrt_available())
    info["tensorrt"] = {"requested": args.trt, "available": tensorrt_available()}
    if not want_trt:
        reason = ("not installed (`import tensorrt` failed)" if not tensorrt_available()
                  else "off" if args.trt == "off" else "needs CUDA")
        info["tensorrt"]["note"] = f"TensorRT variant skipped: {reason}"
        print(f"TensorRT: {info['tensorrt']['note']}", flush=True)
        return None
    if device.type != "cuda" or not tensorrt_available():
        raise SystemExit("error: --trt on needs a CUDA device and `import tensorrt`")
    workdir = Path(tempfile.mkdtemp(prefix="acestep_trt_"))
    decode, trt_note = tensorrt_decoder(work.transformer, workdir, args.trt_precision, work.frames, work.tokens,
                                        rows=2, timeout_s=args.trt_build_timeout)
    info["tensorrt"]["note"] = trt_note
    print(f"TensorRT: {trt_note}", flush=True)
    if decode is None:
        return None
    counter = CallCounter(decode)
    return Variant("tensorrt", work.base.with_decode(counter), True, counter,
                   f"TensorRT DiT ({args.trt_precision}), CFG branches batched")


def measure_steps(steps: int, variants: list[Variant], work: Workload, args: argparse.Namespace,
                  uses_graphs: bool) -> list[Measurement]:
    """Every variant at ``steps``: a warm-up, then ``repeats`` interleaved timed runs, each final
    latent compared with eager sequential CFG's."""
    config = SamplerConfig(infer_step=steps)
    # >= 3 warm-up steps when graphs are captured: then the warm-up has both a guided
    # (2-row) and a conditional-only (1-row) step, so no capture happens while timing.
    warm = SamplerConfig(infer_step=max(args.warmup_steps, 3 if uses_graphs else 1))
    for variant in variants:  # warm-up: allocations, cuDNN autotuning, CUDA-graph capture
        generate(variant, work.conditions, work.noise, warm, work.codec, args.seconds)
    measured = {v.name: Measurement(v.name, steps) for v in variants}
    finals: dict[str, Tensor] = {}
    for _ in range(args.repeats):  # interleaved, so clocks and heat affect every variant alike
        for variant in variants:
            variant.counter.calls = 0
            latents, audio, loop_s, decode_s = generate(variant, work.conditions, work.noise, config, work.codec,
                                                        args.seconds)
            measured[variant.name].finite = bool(torch.isfinite(latents).all() and torch.isfinite(audio).all())
            measured[variant.name].loop_s.append(loop_s)
            measured[variant.name].decode_s.append(decode_s)
            measured[variant.name].dit_calls = variant.counter.calls
            finals[variant.name] = latents.float()
    reference = finals["eager-sequential"]
    scale = float(reference.abs().max())
    for name, m in measured.items():
        m.max_rel_diff_vs_eager = float((finals[name] - reference).abs().max()) / max(scale, 1e-12)
    return list(measured.values())


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every variant at every step count; the results go to stdout, ``--json`` (after each step
    count, so a run cut short keeps them) and ``--markdown``."""
    device, dtype, steps_list, info = run_info(args)
    work = build_workload(args, device, dtype, info)
    variants, uses_graphs = torch_variants(args, work, info)
    trt = tensorrt_variant(args, work, info)
    if trt is not None:
        variants.append(trt)

    results: list[Measurement] = []
    for steps in steps_list:
        results.extend(measure_steps(steps, variants, work, args, uses_graphs))
        print(table(results, args.seconds, variants), flush=True)
        info["results"] = [r.as_dict(args.seconds) for r in results]
        bench.write_json(args.json, info)

    info["variants"] = {v.name: v.note for v in variants}
    info["summary"] = summary(results, args.seconds)
    text = table(results, args.seconds, variants, final=True) + "\n\n" + info["summary"]
    print("\n" + text, flush=True)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(f"Device: {info['device']}, torch {info['torch']}, {info['dtype']}, DiT "
                                 f"{info['layers']} blocks, {args.seconds:g} s of audio ({work.frames} frames)\n\n"
                                 + text + "\n")
    bench.write_json(args.json, info)
    return info


HEADERS = ("variant", "steps", "DiT calls", "loop s", "decode s", "total s", "RTF", "speed-up", "max rel diff",
           "finite")


def table(results: list[Measurement], seconds: float, variants: list[Variant], final: bool = False) -> str:
    eager = {m.steps: m.total_s for m in results if m.variant == "eager-sequential"}
    rows = [(m.variant, m.steps, m.dit_calls, statistics.median(m.loop_s), statistics.median(m.decode_s),
             m.total_s, seconds / m.total_s, eager[m.steps] / m.total_s, m.max_rel_diff_vs_eager,
             "yes" if m.finite else "NO")
            for m in results]
    title = "eager vs optimized" + (" (medians)" if final else "")
    notes = "\n".join(f"- {v.name}: {v.note}" for v in variants)
    return bench.format_table(HEADERS, rows, title) + "\n\n" + notes


def summary(results: list[Measurement], seconds: float) -> str:
    lines = []
    by = {(m.variant, m.steps): m for m in results}
    for steps in sorted({m.steps for m in results}):
        eager = by[("eager-sequential", steps)]
        for name in ("optimized", "compiled", "tensorrt"):
            other = by.get((name, steps))
            if other is None:
                continue
            lines.append(f"{steps} steps: eager RTF {seconds / eager.total_s:.2f}x, {name} RTF "
                         f"{seconds / other.total_s:.2f}x, ratio {eager.total_s / other.total_s:.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_build-engine"]:
        onnx_path, plan, precision, frames, tokens, rows = argv[1:7]
        _build_engine_subprocess(Path(onnx_path), Path(plan), precision, int(frames), int(tokens), int(rows))
        return 0
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
