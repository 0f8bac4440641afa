"""``acestep-triton``: every stage of the data path from one command.

```
acestep-triton checkpoint tiny OUT | download OUT     # checkpoints in the official layout
acestep-triton random-checkpoint OUT [--layers N]     # official sizes, random weights
acestep-triton onnx --checkpoint C --out D            # export + parity per component
acestep-triton trt --onnx-dir D --out E               # TensorRT engines (GPU)
acestep-triton assets --checkpoint C --out A          # weight-free serving assets (render --assets)
acestep-triton build --checkpoint C --workdir W       # assets + repository (--target, --runtime onnx|torch|tensorrt)
acestep-triton render --onnx-dir D --out R ...        # (re)render a repository (cpu | gpu)
acestep-triton serve --repository R                   # tritonserver in the foreground
acestep-triton generate --local --checkpoint C ...    # in-process reference pipeline
acestep-triton generate --url HOST:PORT ...           # through Triton (the thin client)
acestep-triton demo                                   # the embedded default, end to end
```
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from acestep_client.cli import ProgressPrinter, add_generate_arguments, params_from_args, run_generate
from acestep_client.params import GenerationParams, ParamError

from .command_line import add_checkpoint_arguments

DEFAULT_WORKDIR = Path("artifacts") / "tiny"
DEMO_PROMPT = "pop, upbeat, guitar, drums, 120 BPM"
DEMO_LYRICS = "[verse]\nfree as a bird in the morning light\n[chorus]\nsing it loud"


def _delegate(argv: Sequence[str]) -> int | None:
    """Sub-commands owned by other modules keep their own parsers."""
    if not argv:
        return None
    command, rest = argv[0], list(argv[1:])
    if command == "checkpoint" and rest[:1] == ["tiny"]:
        # a CLI subcommand imports only what it runs, so `--help` stays fast
        from .synthetic.cli import main

        return main(rest)
    if command == "checkpoint":
        # a CLI subcommand imports only what it runs, so `--help` stays fast
        from .checkpoint import main

        return main(rest)
    if command == "onnx":
        # a CLI subcommand imports only what it runs, so `--help` stays fast
        from .export.onnx_export import main

        return main(rest)
    if command == "trt":
        # a CLI subcommand imports only what it runs, so `--help` stays fast
        from .export.engine_cli import main

        return main(rest)
    if command == "random-checkpoint":
        # a CLI subcommand imports only what it runs, so `--help` stays fast
        from .synthetic.cli import main

        return main(["full-size", *rest])
    if command == "render":
        # a CLI subcommand imports only what it runs, so `--help` stays fast
        from .export.render_cli import main

        return main(["render", *rest])
    if command == "serve":
        # a CLI subcommand imports only what it runs, so `--help` stays fast
        from .serving.server import main

        return main(["serve", *rest])
    return None


def _build(args: argparse.Namespace) -> int:
    # a CLI subcommand imports only what it runs, so `--help` stays fast
    from .export.model_configs import check_runtime
    from .export.render_cli import parse_endpoint_instances
    from .serving.deploy import build_deployment

    try:
        runtime = check_runtime(args.target, args.runtime)
        instances = parse_endpoint_instances(args.endpoint_instances)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.lora_memory_mb is not None and (args.lora_dir is None or runtime != "torch"):
        print("error: --lora-memory-mb sizes the live adapters of the torch runtime: it needs --lora-dir "
              f"and --runtime torch (this build: runtime {runtime}"
              f"{', no --lora-dir' if args.lora_dir is None else ''})", file=sys.stderr)
        return 2
    if args.lora_memory_mb is not None and not args.lora_memory_mb > 0:
        print(f"error: --lora-memory-mb must be > 0, got {args.lora_memory_mb:g}", file=sys.stderr)
        return 2
    deployment = build_deployment(args.checkpoint, args.workdir, vocab_path=args.vocab, progress=True,
                                  lora_dir=args.lora_dir, target=args.target, precision=args.precision,
                                  runtime=runtime, lora_memory_mb=args.lora_memory_mb,
                                  endpoint_instances=instances)
    print(deployment.repository)
    return 0


def _assets(args: argparse.Namespace) -> int:
    """The assets folder on its own, so that ``render --assets`` can follow ``onnx``/``trt``
    without a full ``build`` (which writes the same folder as ``WORKDIR/assets``)."""
    # a CLI subcommand imports only what it runs, so `--help` stays fast
    from .checkpoint import CheckpointError
    from .serving.assets import write_assets

    try:
        print(write_assets(args.checkpoint, args.out, args.vocab))
    except (CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _generate_local(args: argparse.Namespace) -> int:
    """The in-process reference pipeline, writing files exactly as the client does."""
    # a CLI subcommand imports only what it runs, so `--help` stays fast (numpy, soundfile, torch)
    from acestep_client.result import GenerationResult

    # a CLI subcommand imports only what it runs, so `--help` stays fast (torch)
    from .pipeline import local_generator, torch_device

    if args.checkpoint is None:
        print("error: --local needs --checkpoint", file=sys.stderr)
        return 2
    try:
        torch_device(args.device)
    except ValueError as exc:
        print(f"error: --device: {exc}", file=sys.stderr)
        return 2
    try:
        params = params_from_args(args)
        generator = local_generator(args.checkpoint, args.vocab, device=args.device)
        progress = None if args.quiet else ProgressPrinter(sys.stderr)
        out = generator.generate(
            params, progress=progress,
            src_audio=args.src_audio.read_bytes() if args.src_audio else None,
            ref_audio=args.ref_audio.read_bytes() if args.ref_audio else None)
    except ParamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    record = {**out.record, "format": params.format}
    result = GenerationResult(audio=out.audio.cpu().numpy(), sample_rate=out.sample_rate, params=record,
                              params_json=json.dumps(record, ensure_ascii=False))
    stem = args.name or f"{params.task}_{time.strftime('%Y%m%d_%H%M%S')}"
    for path in result.save(args.out, params.format, stem=stem):
        print(path)
    return 0


def _generate(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="acestep-triton generate",
                                     description="Generate music through Triton (--url) "
                                                 "or in-process (--local).")
    add_generate_arguments(parser)
    parser.add_argument("--local", action="store_true", help="run in-process (no server)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="checkpoint folder for --local")
    parser.add_argument("--vocab", type=Path, default=None, help="lyric vocabulary for --local")
    parser.add_argument("--device", default="cpu", help="torch device for --local (cpu, cuda, cuda:1, ...)")
    args = parser.parse_args(argv)
    return _generate_local(args) if args.local else run_generate(args)


def _demo(args: argparse.Namespace) -> int:
    """Tiny checkpoint → ONNX → repository → real tritonserver → gRPC client → an audio file."""
    # a CLI subcommand imports only what it runs, so `--help` stays fast (tritonclient, torch)
    from acestep_client.client import AceStepClient

    # a CLI subcommand imports only what it runs, so `--help` stays fast (torch)
    from .serving.deploy import build_deployment
    from .serving.server import TritonServer
    from .synthetic.tiny_checkpoint import write_tiny_checkpoint

    workdir: Path = args.workdir
    ckpt = workdir / "checkpoint"
    if not (ckpt / "ace_step_transformer" / "config.json").is_file():
        print(f"writing the tiny random checkpoint to {ckpt}", file=sys.stderr)
        write_tiny_checkpoint(ckpt, seed=0)
    deployment = build_deployment(ckpt, workdir, progress=True)
    params = GenerationParams(prompt=args.prompt, lyrics=args.lyrics, audio_duration=args.duration,
                              infer_step=args.steps, manual_seeds=args.seeds, format=args.format)
    print(f"starting tritonserver on {deployment.repository}", file=sys.stderr)
    with TritonServer(deployment.repository, log_path=workdir / "tritonserver.log") as server:
        print(f"serving on {server.grpc_url}; generating {args.duration:g} s with "
              f"{args.steps} steps", file=sys.stderr)
        result = AceStepClient(server.grpc_url).generate(params, on_progress=ProgressPrinter(sys.stderr))
    for path in result.save(args.out, args.format, stem="demo"):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="acestep-triton", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("checkpoint", "tiny random or official checkpoint"),
                            ("random-checkpoint", "official sizes, random weights (no download)"),
                            ("onnx", "export the six components to ONNX"),
                            ("trt", "build TensorRT engines from the ONNX files (GPU)"),
                            ("render", "render a model repository"), ("serve", "run tritonserver"),
                            ("generate", "generate music (--local in-process, or --url through Triton)")):
        sub.add_parser(name, help=help_text, add_help=False)
    build = sub.add_parser("build", help="export + assets + cpu repository for a checkpoint")
    build.add_argument("--checkpoint", type=Path, required=True)
    build.add_argument("--vocab", type=Path, default=None)
    build.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    build.add_argument("--target", choices=("cpu", "gpu"), default="cpu",
                       help="cpu: CPU instances; gpu: GPU instances (see --runtime)")
    build.add_argument("--runtime", choices=("onnx", "torch", "tensorrt"), default=None,
                       help="component runtime: cpu onnx (default) or torch; gpu torch (default: "
                            "compiled PyTorch + CUDA graphs, the fastest measured) or tensorrt")
    build.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16",
                       help="engine precision for --runtime tensorrt")
    build.add_argument("--lora-dir", type=Path, default=None,
                       help="LoRA registry: one folder per adapter (+ serving.json with its lora_weight)")
    build.add_argument("--lora-memory-mb", type=float, default=None,
                       help="torch runtime with --lora-dir: MiB of live adapters each condition_encoder / "
                            "dit_decoder instance keeps resident (least recently used evicted; default 2048)")
    build.add_argument("--endpoint-instances", default=None,
                       help="instances per endpoint: one count for all (8) or per endpoint "
                            "(text2music=8,repaint=2); each serves one request at a time. "
                            "Default: ensemble_configs/*.json's instance_count")
    assets = sub.add_parser("assets", help="the weight-free serving assets a repository's endpoints read",
                            description="Write the orchestrators' assets (configs, tokenizers, lyric vocab, "
                                        "mel buffers; no weights): the folder `render --assets` takes.")
    add_checkpoint_arguments(assets)
    assets.add_argument("--out", type=Path, required=True, help="assets folder to write")
    demo = sub.add_parser("demo", help="the embedded default: tiny model served by a real tritonserver")
    demo.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    demo.add_argument("--out", type=Path, default=Path("demo_out"))
    demo.add_argument("--prompt", default=DEMO_PROMPT)
    demo.add_argument("--lyrics", default=DEMO_LYRICS)
    demo.add_argument("--duration", type=float, default=10.0)
    demo.add_argument("--steps", type=int, default=27)
    demo.add_argument("--seeds", default="42")
    demo.add_argument("--format", default="wav", choices=("wav", "flac", "ogg", "mp3"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    delegated = _delegate(argv)
    if delegated is not None:
        return delegated
    if argv and argv[0] == "generate":
        return _generate(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "build":
        return _build(args)
    if args.command == "assets":
        return _assets(args)
    if args.command == "demo":
        return _demo(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
