#!/usr/bin/env python
"""Cost and quality benchmark of orthora against PEFT's LoRA, OFT, BOFT and HRA: see `orthora.bench.cli`.

``python scripts/benchmark.py --profile cpu-small`` is ``python -m orthora.bench --profile cpu-small``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from orthora.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="python scripts/benchmark.py"))
