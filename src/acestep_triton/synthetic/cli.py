"""``python -m acestep_triton.synthetic``: write a random checkpoint in the official layout.

``tiny OUT [--seed N]`` is also ``acestep-triton checkpoint tiny``; ``full-size OUT [--layers N]
[--seed S] [--device D]`` is also ``acestep-triton random-checkpoint``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..command_line import print_written
from ..weights import CheckpointError
from .full_size import MIN_ERG_LAYERS, write_full_random_checkpoint
from .tiny_checkpoint import write_tiny_checkpoint


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m acestep_triton.synthetic",
                                     description="ACE-Step checkpoints with random weights, in the official layout.")
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("tiny", help="write a tiny random checkpoint (seconds, a few MB)")
    tiny.add_argument("out", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    full = sub.add_parser("full-size", help="the official configs with random weights (no download)",
                          description="Write an ACE-Step checkpoint with the official configs and "
                                      "random weights (no download), in the official layout.")
    full.add_argument("out", type=Path)
    full.add_argument("--layers", type=int, default=None,
                      help=f"DiT blocks (default: the official 24; at least {MIN_ERG_LAYERS} for ERG)")
    full.add_argument("--seed", type=int, default=0)
    full.add_argument("--device", default="cpu", help="where to initialise the weights (cuda is faster)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``tiny OUT [--seed N]``; ``full-size OUT [--layers N] [--seed S] [--device cuda]``."""
    args = _parser().parse_args(argv)
    if args.command == "tiny":
        return print_written(lambda: write_tiny_checkpoint(args.out, seed=args.seed), (CheckpointError,))
    if args.layers is not None and args.layers < MIN_ERG_LAYERS:
        print(f"note: {args.layers} DiT blocks: ERG-diffusion (blocks 15-19) is only partly there; "
              f"use this checkpoint for speed and memory measurements", file=sys.stderr)
    return print_written(lambda: write_full_random_checkpoint(args.out, seed=args.seed, layers=args.layers,
                                                              device=args.device, progress=True),
                         (ValueError, OSError))

if __name__ == "__main__":
    sys.exit(main())
