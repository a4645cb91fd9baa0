"""What a task recipe must say: its data, model head, preprocessing, prediction step and metrics.

The engine (`orthora.train.engine`) owns everything else: accelerate, the optimisation loop, checkpoints,
evaluation scheduling, logging and saving.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from ..config import ConfigError, TrainConfig
from ..data import check_columns


@dataclass
class EvalSet:
    """One evaluation split: raw rows (references), tokenized features, and the columns the model consumes."""

    name: str
    examples: datasets.Dataset
    features: datasets.Dataset
    model_inputs: datasets.Dataset


class TaskRecipe(ABC):
    """A task family. Subclasses fill the class attributes and implement the abstract hooks."""

    name: ClassVar[str]
    #: PEFT `TaskType` value, so PEFT wraps the right model class and saves the head.
    peft_task_type: ClassVar[str]
    #: `TrainConfig` fields filled in when the user left them `None`.
    defaults: ClassVar[dict[str, Any]] = {}
    #: Model types (transformers `model_type`) that have the head this task needs, and a human name for errors.
    model_mapping_names: ClassVar[dict[str, str]]
    model_kind: ClassVar[str]

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        for key, value in self.defaults.items():
            if getattr(config, key) is None:
                setattr(config, key, value)
        self.check_config()

    # --- configuration and data -------------------------------------------------------------------------------
    def check_config(self) -> None:
        """Task-specific checks of the config alone (default: none)."""
        return None

    @abstractmethod
    def hub_dataset(self) -> tuple[str, str | None]:
        """The Hub data set (name, configuration) used when no local files are given."""

    def hub_eval_splits(self) -> list[str]:
        return ["validation"]

    @abstractmethod
    def required_columns(self) -> list[str]:
        """Columns every split must have."""

    def check_split(self, dataset: datasets.Dataset, where: str) -> None:
        """Raise naming the problem if a loaded split lacks what this task reads."""
        check_columns(dataset, self.required_columns(), where)

    def metric_to_track(self) -> tuple[str, bool]:
        """(metric name, greater is better) for best-checkpoint tracking."""
        return self.primary_metric(), True

    @abstractmethod
    def primary_metric(self) -> str: ...

    @abstractmethod
    def metric_names(self) -> list[str]:
        """Metrics that can be tracked for the best adapter (all higher-is-better); checked before training."""

    # --- model ---------------------------------------------------------------------------------------------
    def model_config_overrides(self) -> dict[str, Any]:
        """Extra keyword arguments for `AutoConfig.from_pretrained` (e.g. num_labels)."""
        return {}

    def check_model_config(self, model_config: PretrainedConfig) -> None:
        if model_config.model_type not in self.model_mapping_names:
            raise ConfigError(
                f"task {self.config.task!r} needs {self.model_kind}; model {self.config.model_name_or_path!r} "
                f"(model_type {model_config.model_type!r}) has no such head"
            )

    @abstractmethod
    def load_model(self, model_config: PretrainedConfig) -> PreTrainedModel: ...

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Task-specific tokenizer requirements, e.g. offsets for QA (default: none)."""
        return None

    # --- preprocessing ---------------------------------------------------------------------------------------
    @abstractmethod
    def preprocess_train(
        self, dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase
    ) -> datasets.Dataset: ...

    @abstractmethod
    def preprocess_eval(
        self, name: str, dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase
    ) -> EvalSet: ...

    @abstractmethod
    def collator(
        self, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, pad_to_multiple_of: int | None
    ) -> Any: ...

    # --- evaluation -------------------------------------------------------------------------------------------
    @abstractmethod
    def predict(
        self, model: Any, batch: dict[str, torch.Tensor], accelerator: Accelerator
    ) -> dict[str, tuple[torch.Tensor, float]]:
        """Outputs of one evaluation batch, as {name: (tensor, padding value)}; the engine gathers them.

        ``model`` is the prepared (possibly wrapped) model; use ``accelerator.unwrap_model(model)`` to generate.
        """

    @abstractmethod
    def compute_metrics(self, eval_set: EvalSet, outputs: dict[str, np.ndarray]) -> dict[str, float]: ...

    def map_kwargs(self, dataset: datasets.Dataset, description: str) -> dict[str, Any]:
        return {
            "batched": True,
            "num_proc": self.config.preprocessing_num_workers,
            "remove_columns": dataset.column_names,
            "desc": description,
        }
