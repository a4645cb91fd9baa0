"""Offline quickstart: python scripts/quickstart.py [--model ID_OR_PATH] [--method lora] (see docs/training.md)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a fresh clone works without `pip install`

from orthora.train.quickstart import main

if __name__ == "__main__":
    sys.exit(main())
