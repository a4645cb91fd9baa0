"""Worked example of adapter arithmetic (docs/arithmetic.md): two GLUE task adapters on all-MiniLM-L6-v2, then a
walk from t = -0.5 to 1.5 between them (orthora geodesic vs LoRA linear), scoring both tasks at every point.

    python scripts/arithmetic_walk.py                      # the documented run (~25 CPU-minutes, one thread)
    python scripts/arithmetic_walk.py --train-samples 32 --epochs 1 --eval-samples 64 --points 3   # smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from orthora.train.data import default_data_dir  # noqa: E402
from orthora.train.quickstart import local_minilm_path  # noqa: E402
from orthora.train.walk import WalkConfig, run_walk  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data-dir", default=str(default_data_dir() / "glue"), help="folder with <task>/*.jsonl"
    )
    parser.add_argument("--model", default=None, help="model path (default: the installed all-MiniLM-L6-v2)")
    parser.add_argument("--tasks", default="sst2,stsb")
    parser.add_argument("--train-samples", type=int, default=1500)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--eval-samples", type=int, default=None)
    parser.add_argument("--points", type=int, default=9, help="weights t evenly spaced in [-0.5, 1.5]")
    parser.add_argument("--output-dir", default="outputs/arithmetic_walk")
    parser.add_argument("--results-prefix", default="benchmarks/results/arithmetic-walk")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tasks = tuple(args.tasks.split(","))
    if len(tasks) != 2:
        parser.error(f"--tasks needs exactly two GLUE tasks, got {args.tasks!r}")
    config = WalkConfig(
        model_name_or_path=args.model or local_minilm_path(),
        data_dir=args.data_dir,
        output_dir=args.output_dir,
        results_prefix=args.results_prefix,
        tasks=tasks,
        weights=tuple(float(t) for t in np.round(np.linspace(-0.5, 1.5, args.points), 4)),
        max_train_samples=args.train_samples,
        num_train_epochs=args.epochs,
        max_eval_samples=args.eval_samples,
    )
    run_walk(config)
    print(f"wrote {config.results_prefix}.json, .md and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
