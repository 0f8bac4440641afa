"""What several commands share: their checkpoint arguments, and how a command that writes a
folder reports it, so each reads and answers the same way.

Torch-free (argparse only): the top-level ``acestep-triton`` parser imports it, and ``--help``
stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


def add_checkpoint_arguments(parser: argparse.ArgumentParser, *, vocab: bool = True) -> None:
    """``--checkpoint`` (required) and, with ``vocab``, ``--vocab``: how every command that reads
    a checkpoint names it, with ``checkpoint.load_components``' default for the vocabulary."""
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint folder (official layout)")
    if vocab:
        parser.add_argument("--vocab", type=Path, default=None,
                            help="lyric vocabulary (default: lyrics_vocab.json / vocab.json in the checkpoint)")


def print_written(write: Callable[[], Path], errors: tuple[type[Exception], ...]) -> int:
    """Run a command's one action: print the path it wrote (exit 0), or, for ``errors`` (those a
    user can fix: a bad folder, a bad argument), ``error: ...`` on stderr (exit 1)."""
    try:
        path = write()
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0
