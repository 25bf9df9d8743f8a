"""``python -m kdtrain``: the ``kdtrain`` command (kdtrain/cli.py)."""

import sys

from .cli import main

sys.exit(main())
