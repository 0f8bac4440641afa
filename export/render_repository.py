#!/usr/bin/env python3
"""Step 4: render a runnable Triton model repository for a target (cpu | gpu) and runtime.

Every ``config.pbtxt`` comes from the component contract and ``ensemble_configs/*.json``; the
Python-backend sources are copied from ``model_repository/``. Runtimes: ``onnx`` (cpu, needs
``--onnx-dir``), ``tensorrt`` (gpu, ``--engine-dir`` from step 2, ``--onnx-dir`` for the
checkpoint sizes) or ``torch`` (either target, ``--checkpoint``; no export at all). Same command
as ``acestep-triton render``; the code is :mod:`acestep_triton.export.render_cli` (the writer:
:mod:`acestep_triton.export.repository`), and with the same inputs the result is the repository
``acestep-triton build`` writes::

    python export/render_repository.py --target cpu --onnx-dir artifacts/steps/onnx \\
        --assets artifacts/steps/assets --out artifacts/steps/repository
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run the package's ``render`` command with this script's arguments."""
    from acestep_triton.export.render_cli import main as render_main

    return render_main(["render", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
