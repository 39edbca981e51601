"""``python -m parity``: run the parity matrix on both backends (see parity.cli)."""

import sys

from .cli import main

sys.exit(main())
