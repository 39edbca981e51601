"""``python -m bench``: see bench.core."""

import sys

from .core import main

sys.exit(main())
