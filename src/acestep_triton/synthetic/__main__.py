"""``python -m acestep_triton.synthetic``: see :mod:`acestep_triton.synthetic.cli`."""

import sys

from .cli import main

sys.exit(main())
