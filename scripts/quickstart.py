"""Offline quickstart: python scripts/quickstart.py [--model ID_OR_PATH] [--method lora] (see docs/training.md)."""

import sys

from orthora.train.quickstart import main

if __name__ == "__main__":
    sys.exit(main())
