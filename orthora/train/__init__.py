"""Fine-tuning with orthora (or any PEFT method) on GLUE, translation, extractive QA and summarization.

Python API::

    from orthora.train import TrainConfig, run
    results = run(TrainConfig(task="glue", task_name="sst2", model_name_or_path="bert-base-uncased"))

Command line: ``orthora-finetune configs/glue/sst2.yaml --learning_rate 3e-4`` (or through ``accelerate launch
scripts/finetune.py ...``). See docs/training.md.
"""

from __future__ import annotations

from .checkpoints import find_latest_checkpoint
from .config import ConfigError, TrainConfig, load_yaml
from .engine import run
from .optim import parameter_groups

__all__ = [
    "ConfigError",
    "TrainConfig",
    "find_latest_checkpoint",
    "load_config",
    "load_yaml",
    "parameter_groups",
    "run",
]


def load_config(path: str | None = None, **overrides) -> TrainConfig:
    """A `TrainConfig` from a YAML file (optional) with keyword overrides, validated like the command line."""
    from .config import apply_overrides

    values = load_yaml(path) if path else {}
    return TrainConfig.from_dict(apply_overrides(values, overrides))
