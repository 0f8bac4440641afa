#!/usr/bin/env python3
"""Step 1: export the six served components of a checkpoint to ONNX, each parity-checked.

Every ``<component>.onnx`` is traced at one batch and length and then compared with the torch
module (fp32, onnxruntime CPU) at another, so a graph that baked in a shape fails here rather
than in the server. Same command as ``acestep-triton onnx``; the code is
:mod:`acestep_triton.export.onnx_export` (this file only forwards the arguments, so the two
cannot drift apart)::

    python export/export_onnx.py --checkpoint artifacts/tiny/checkpoint --out artifacts/steps/onnx
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run the package's ``onnx`` command with this script's arguments."""
    from acestep_triton.export.onnx_export import main as onnx_main

    return onnx_main(sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
