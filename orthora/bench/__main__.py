"""``python -m orthora.bench --profile NAME``: see `orthora.bench.cli`."""

import sys

from .cli import main

sys.exit(main())
