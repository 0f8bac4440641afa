"""``python -m acestep_triton.lora``: see :mod:`acestep_triton.lora.cli`."""

import sys

from .cli import main

sys.exit(main())
