"""Fine-tune from a YAML config: accelerate launch scripts/finetune.py configs/glue/sst2.yaml [--key value ...].

The same as the ``orthora-finetune`` console command; see docs/training.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a fresh clone works without `pip install`

from orthora.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
