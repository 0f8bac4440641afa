"""Command line of the engine builder: ``acestep-triton trt`` (and ``export/build_engines.py``)::

    python -m acestep_triton.export.engine_cli --onnx-dir D --out E --precision fp16|bf16 \\
        [--max-batch N] [--max-frames 2583]
    python -m acestep_triton.export.engine_cli --check E   # do the engines in E fit this machine?

Builds with :func:`acestep_triton.export.engine_build.build_engines`; ``--check`` runs
:func:`acestep_triton.export.engine_meta.check_engine_dir` on the serving machine, since an engine
only loads in the TensorRT version and on the GPU model that built it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from . import specs
from .engine_build import BuildOptions, build_engines
from .engine_meta import EngineBuildError, EngineMismatchError, check_engine_dir
from .engine_profiles import DEFAULT_MAX_FRAMES, DEFAULT_MAX_ITEMS
from .mixed_precision import KEEP_FP32_PATTERNS, PRECISIONS


def main(argv: Sequence[str] | None = None) -> int:
    """``--onnx-dir D --out E --precision fp16|bf16 [--max-batch N] [--max-frames F]`` or ``--check E``."""
    parser = argparse.ArgumentParser(
        prog="acestep-triton trt",
        description="Build TensorRT engines (mixed precision, dynamic batch/length profile, timing cache, "
                    "JSON sidecar) for the served components, or check built engines against this machine.")
    parser.add_argument("--onnx-dir", type=Path, help="exported <component>.onnx files (acestep-triton onnx)")
    parser.add_argument("--out", type=Path, help="folder for <component>.plan (+ .plan.json, timing.cache)")
    parser.add_argument("--check", type=Path, metavar="ENGINE_DIR",
                        help="only check the engines in ENGINE_DIR against this TensorRT and GPU")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16")
    parser.add_argument("--max-batch", "--max-items", dest="max_items", type=int, default=DEFAULT_MAX_ITEMS,
                        help="songs per request the engines serve; each profile goes up to this times the "
                             "component's rows per song (DiT: 3 CFG branches). Render the repository with "
                             "the same --max-items")
    parser.add_argument("--max-frames", type=int, default=DEFAULT_MAX_FRAMES,
                        help="longest song in latent frames (2583 = 240 s)")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {', '.join(specs.COMPONENTS)}")
    parser.add_argument("--timing-cache", type=Path, default=None, help="default: OUT/timing.cache")
    parser.add_argument("--workspace-gib", type=float, default=None, help="builder workspace limit")
    parser.add_argument("--opt-level", type=int, default=None, help="builder optimisation level (0-5)")
    parser.add_argument("--keep-fp32", action="append", default=None, metavar="REGEX",
                        help="heavy ONNX nodes to keep in fp32 (default: the linear-attention products)")
    parser.add_argument("--any-gpu-model", action="store_true",
                        help="--check: accept another GPU model of the same compute capability")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)

    try:
        if args.check is not None:
            metas = check_engine_dir(args.check, strict_gpu_name=not args.any_gpu_model)
            for name, meta in metas.items():
                print(f"{name}: ok ({meta.precision}, TensorRT {meta.tensorrt}, {meta.gpu})")
            return 0
        if args.onnx_dir is None or args.out is None:
            parser.error("give --onnx-dir and --out (or --check ENGINE_DIR)")
        names = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
        options = BuildOptions(precision=args.precision, max_items=args.max_items, max_frames=args.max_frames,
                               workspace_gib=args.workspace_gib, timing_cache=args.timing_cache,
                               keep_fp32=tuple(args.keep_fp32) if args.keep_fp32 else KEEP_FP32_PATTERNS,
                               optimization_level=args.opt_level, verbose=args.verbose)
        metas = build_engines(args.onnx_dir, args.out, options, names=names)
    except (EngineBuildError, EngineMismatchError, ValueError, KeyError, FileNotFoundError) as exc:
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 1
    for name in metas:
        print(args.out / f"{name}.plan")
    return 0


if __name__ == "__main__":
    sys.exit(main())
