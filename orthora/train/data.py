"""Loading raw data: Hub data sets by name, or local json/jsonl/csv files, with clear errors before training."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import datasets

from .config import ConfigError, TrainConfig

if TYPE_CHECKING:  # the recipes import this module's column checks
    from .recipes.base import TaskRecipe

#: environment variable naming the folder of benchmark data in the Hub's schemas (``glue/<task>/*.jsonl``, ``squad/``)
DATA_DIR_ENV = "ORTHORA_DATA_DIR"


def default_data_dir() -> Path:
    """The benchmark data folder: ``$ORTHORA_DATA_DIR``, else ``shared/data`` beside a source checkout."""
    return Path(os.environ.get(DATA_DIR_ENV) or Path(__file__).resolve().parents[3] / "shared" / "data")


LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv"}


def check_local_file(path: str, role: str) -> str:
    """Return the `datasets` builder for ``path``, or raise naming the file if it cannot be used."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in LOCAL_FORMATS:
        raise ConfigError(
            f"{role} {path!r}: unsupported file type {extension or '(none)'!r}; use .json, .jsonl or .csv"
        )
    if not os.path.isfile(path):
        raise ConfigError(f"{role} {path!r} does not exist")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{role} {path!r} is not readable (permission denied)")
    return LOCAL_FORMATS[extension]


def local_files(config: TrainConfig) -> dict[str, str]:
    """The local files of a run, by split name (train, validation, extra evaluation sets)."""
    files: dict[str, str] = {}
    if config.train_file:
        files["train"] = config.train_file
    if config.validation_file:
        files["validation"] = config.validation_file
    for name, path in config.extra_validation_files.items():
        if name in ("train", "validation"):
            raise ConfigError(f"extra_validation_files: the name {name!r} is reserved; pick another")
        files[name] = path
    return files


def check_data_files(config: TrainConfig) -> None:
    """Fail early on missing or unreadable local files (cheap: no parsing)."""
    for split, path in local_files(config).items():
        check_local_file(path, f"{split} data file")


def load_local_split(path: str, split: str) -> datasets.Dataset:
    builder = check_local_file(path, f"{split} data file")
    try:
        dataset = datasets.load_dataset(builder, data_files=path, split="train")
    except Exception as err:  # noqa: BLE001 - datasets raises many types for a malformed file
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{split} data file {path!r} could not be read as {builder}: {message}") from None
    if len(dataset) == 0:
        raise ConfigError(f"{split} data file {path!r} holds no rows")
    return dataset


def load_hub_splits(name: str, config_name: str | None, splits: Iterable[str]) -> dict[str, datasets.Dataset]:
    try:
        loaded = datasets.load_dataset(name, config_name)
    except Exception as err:  # noqa: BLE001 - network, missing data set, missing config ...
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"could not load Hub data set {name!r}{f' ({config_name})' if config_name else ''}: {message}; "
            "offline, give train_file/validation_file instead"
        ) from None
    missing = [s for s in splits if s not in loaded]
    if missing:
        raise ConfigError(f"Hub data set {name!r} has no split {missing[0]!r} (it has: {', '.join(loaded)})")
    return {split: loaded[split] for split in splits}


def load_raw_data(
    config: TrainConfig, recipe: TaskRecipe
) -> tuple[datasets.Dataset, dict[str, datasets.Dataset]]:
    """(train rows, {evaluation split: rows}), from local files when given, else from the Hub."""
    files = local_files(config)
    if config.train_file or config.validation_file:
        if "train" not in files or "validation" not in files:
            raise ConfigError("local data needs both train_file and validation_file")
        splits = {split: load_local_split(path, split) for split, path in files.items()}
        source = {split: f"{split} data file {path!r}" for split, path in files.items()}
    else:
        name, config_name = recipe.hub_dataset()
        name = config.dataset_name or name
        config_name = config.dataset_config_name or config_name
        eval_names = recipe.hub_eval_splits()
        splits = load_hub_splits(name, config_name, ["train", *eval_names])
        source = {split: f"{split} split of {name!r}" for split in splits}
    for split, dataset in splits.items():
        recipe.check_split(dataset, source[split])
    train = truncate(splits.pop("train"), config.max_train_samples)
    evals = {split: truncate(dataset, config.max_eval_samples) for split, dataset in splits.items()}
    return train, evals


def check_columns(dataset: datasets.Dataset, required: Iterable[str], where: str) -> None:
    """Raise naming the first missing column (and what the data does have)."""
    for column in required:
        if column not in dataset.column_names:
            raise ConfigError(
                f"{where} has no column {column!r} (its columns: {', '.join(dataset.column_names)})"
            )


def truncate(dataset: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    return dataset.select(range(min(limit, len(dataset)))) if limit else dataset
