"""``python -m acestep_triton.lora``: write the tiny adapter, inspect one."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..command_line import add_checkpoint_arguments
from ..synthetic.tiny_lora import write_tiny_lora
from ..weights import CheckpointError
from .files import SCALING_MODES, LoraError, load_lora


def main(argv: Sequence[str] | None = None) -> int:
    """``tiny --checkpoint C --out D [--seed N] [--rank R]``; ``inspect PATH [--scaling peft]``."""
    parser = argparse.ArgumentParser(prog="python -m acestep_triton.lora",
                                     description="LoRA adapters for the ACE-Step transformer.")
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("tiny", help="write the deterministic tiny adapter for a (tiny) checkpoint")
    add_checkpoint_arguments(tiny, vocab=False)
    tiny.add_argument("--out", type=Path, required=True, help="adapter folder to write")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--rank", type=int, default=4)
    inspect = sub.add_parser("inspect", help="summarise an adapter (layers, ranks, scaling, components)")
    inspect.add_argument("path", type=Path)
    inspect.add_argument("--scaling", choices=SCALING_MODES, default="upstream")
    args = parser.parse_args(argv)
    try:
        if args.command == "tiny":
            print(write_tiny_lora(args.checkpoint, args.out, seed=args.seed, rank=args.rank))
        else:
            print(load_lora(args.path, scaling=args.scaling).summary())
    except (LoraError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
