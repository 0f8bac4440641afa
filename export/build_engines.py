#!/usr/bin/env python3
"""Step 2 (GPU only): build TensorRT engines from the ONNX files of step 1.

An engine only loads in the TensorRT version and on the GPU model that built it, so build them on
the serving machine (or its image); ``--check ENGINE_DIR`` tells whether existing engines fit this
one. Same command as ``acestep-triton trt``; the code is :mod:`acestep_triton.export.engine_cli`
(building: :mod:`acestep_triton.export.engine_build`)::

    python export/build_engines.py --onnx-dir artifacts/steps/onnx --out artifacts/steps/engines --precision bf16

Skip this step for the ``onnx`` (CPU) and ``torch`` runtimes: they need no engines.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run the package's ``trt`` command with this script's arguments."""
    from acestep_triton.export.engine_cli import main as trt_main

    return trt_main(sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
