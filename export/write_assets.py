#!/usr/bin/env python3
"""Step 3: write the serving assets, the weight-free files the endpoints load at start-up.

The orchestrators tokenise prompts and lyrics and compute log-mels themselves, so they need the
checkpoint's configs, tokenizer files, lyric vocabulary and mel buffers (no weights): the folder
step 4 takes as ``--assets``. Same command as ``acestep-triton assets``; the code is
:func:`acestep_triton.serving.assets.write_assets`::

    python export/write_assets.py --checkpoint artifacts/tiny/checkpoint --out artifacts/steps/assets
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run the package's ``assets`` command with this script's arguments."""
    from acestep_triton.cli import main as cli_main

    return cli_main(["assets", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
