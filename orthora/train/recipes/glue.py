"""GLUE: sentence(-pair) classification and regression with the official metrics."""

from __future__ import annotations

from typing import Any

import datasets
import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

from ..config import ConfigError
from .base import EvalSet, TaskRecipe

#: task -> (first text column, second text column or None, number of labels; 1 = regression)
GLUE_TASKS: dict[str, tuple[str, str | None, int]] = {
    "cola": ("sentence", None, 2),
    "sst2": ("sentence", None, 2),
    "mrpc": ("sentence1", "sentence2", 2),
    "stsb": ("sentence1", "sentence2", 1),
    "qqp": ("question1", "question2", 2),
    "mnli": ("premise", "hypothesis", 3),
    "qnli": ("question", "sentence", 2),
    "rte": ("sentence1", "sentence2", 2),
    "wnli": ("sentence1", "sentence2", 2),
}
#: the metric(s) each task reports (official GLUE definitions), in the order GLUE's score averages them
GLUE_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("matthews_correlation",),
    "sst2": ("accuracy",),
    "mrpc": ("f1", "accuracy"),
    "stsb": ("pearson", "spearmanr"),
    "qqp": ("f1", "accuracy"),
    "mnli": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
}
PRIMARY_METRIC = {task: names[0] for task, names in GLUE_METRICS.items() if names[0] != "accuracy"}


def glue_metrics(task_name: str, predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    """The official GLUE metric(s) of ``task_name`` (same definitions as the Hub's ``glue`` metric)."""
    if task_name == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
    if task_name == "stsb":
        return {
            "pearson": float(pearsonr(predictions, references)[0]),
            "spearmanr": float(spearmanr(predictions, references)[0]),
        }
    metrics = {"accuracy": float(accuracy_score(references, predictions))}
    if task_name in ("mrpc", "qqp"):
        metrics["f1"] = float(f1_score(references, predictions))
    return metrics


class GlueRecipe(TaskRecipe):
    name = "glue"
    peft_task_type = "SEQ_CLS"
    defaults = {"max_seq_length": 128}
    model_mapping_names = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    model_kind = "a model with a sequence-classification head (e.g. BERT, RoBERTa, DeBERTa)"

    def check_config(self) -> None:
        if self.config.task_name not in GLUE_TASKS:
            raise ConfigError(
                f"task_name={self.config.task_name!r} is not a GLUE task; choose one of {', '.join(GLUE_TASKS)}"
            )
        self.text_columns = [c for c in GLUE_TASKS[self.config.task_name][:2] if c]
        self.num_labels = GLUE_TASKS[self.config.task_name][2]
        self.is_regression = self.num_labels == 1

    def hub_dataset(self) -> tuple[str, str | None]:
        return "nyu-mll/glue", self.config.task_name

    def hub_eval_splits(self) -> list[str]:
        if self.config.task_name == "mnli":
            return ["validation_matched", "validation_mismatched"]
        return ["validation"]

    def required_columns(self) -> list[str]:
        return [*self.text_columns, "label"]

    def primary_metric(self) -> str:
        return PRIMARY_METRIC.get(self.config.task_name, "accuracy")

    def metric_names(self) -> list[str]:
        return {"cola": ["matthews_correlation"], "stsb": ["pearson", "spearmanr"]}.get(
            self.config.task_name,
            ["accuracy", "f1"] if self.config.task_name in ("mrpc", "qqp") else ["accuracy"],
        )

    def model_config_overrides(self) -> dict[str, Any]:
        overrides: dict[str, Any] = {"num_labels": self.num_labels, "finetuning_task": self.config.task_name}
        if self.is_regression:
            overrides["problem_type"] = "regression"
        return overrides

    def load_model(self, model_config: PretrainedConfig):
        return AutoModelForSequenceClassification.from_pretrained(
            self.config.model_name_or_path,
            config=model_config,
            trust_remote_code=self.config.trust_remote_code,
        )

    def _check_labels(self, dataset: datasets.Dataset, name: str) -> None:
        dtype = dataset.features["label"].dtype
        if self.is_regression and not dtype.startswith(("float", "int")):
            raise ConfigError(
                f"{name} data: column 'label' must hold numbers for {self.config.task_name}, got {dtype}"
            )
        if not self.is_regression:
            if not dtype.startswith("int"):
                raise ConfigError(
                    f"{name} data: column 'label' must hold integer class ids 0..{self.num_labels - 1}, got {dtype}"
                )
            labels = np.asarray(dataset["label"])
            if labels.min() < 0 or labels.max() >= self.num_labels:
                raise ConfigError(
                    f"{name} data: labels must be in 0..{self.num_labels - 1} for {self.config.task_name}, "
                    f"found {labels.min()}..{labels.max()} (unlabelled test split?)"
                )

    def _tokenize(self, dataset: datasets.Dataset, tokenizer, description: str) -> datasets.Dataset:
        def tokenize(batch: dict[str, list]) -> dict[str, list]:
            texts = [batch[column] for column in self.text_columns]
            encoded = tokenizer(*texts, truncation=True, max_length=self.config.max_seq_length)
            encoded["labels"] = [float(x) for x in batch["label"]] if self.is_regression else batch["label"]
            return encoded

        return dataset.map(tokenize, **self.map_kwargs(dataset, description))

    def preprocess_train(self, dataset, tokenizer):
        self._check_labels(dataset, "train")
        return self._tokenize(dataset, tokenizer, "Tokenizing train")

    def preprocess_eval(self, name, dataset, tokenizer) -> EvalSet:
        self._check_labels(dataset, name)
        features = self._tokenize(dataset, tokenizer, f"Tokenizing {name}")
        return EvalSet(name=name, examples=dataset, features=features, model_inputs=features)

    def collator(self, tokenizer, model, pad_to_multiple_of):
        return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)

    def predict(self, model, batch, accelerator):
        labels = batch["labels"]
        logits = model(**batch).logits
        predictions = logits.squeeze(-1) if self.is_regression else logits.argmax(dim=-1)
        return {"predictions": (predictions.float(), 0.0), "labels": (labels.float(), 0.0)}

    def compute_metrics(self, eval_set, outputs):
        predictions, labels = outputs["predictions"], outputs["labels"]
        if not self.is_regression:
            predictions, labels = predictions.astype(np.int64), labels.astype(np.int64)
        return glue_metrics(self.config.task_name, predictions, labels)
