"""``python -m acestep_triton.frontend``: start the Gradio front end (see ``app.main``)."""

import sys

from .app import main

sys.exit(main())
