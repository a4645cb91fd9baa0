"""`TrainConfig`: every knob of a fine-tuning run, loaded from YAML and overridden from the command line.

One flat dataclass keeps the YAML files, the command line (``--learning_rate 3e-4``) and the Python API
(``TrainConfig(task="glue", ...)``) in one-to-one correspondence. Task-specific fields are tagged with the tasks
they apply to, so a value given for the wrong task is reported instead of silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml

TASKS = ("glue", "translation", "qa", "summarization")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
HUB_STRATEGIES = ("end", "checkpoint")
NONFINITE_POLICIES = ("stop", "skip")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """Bad user input (config, data or model choice), detected before any training step runs."""


def report_error(prog: str, message: str) -> None:
    """Print a user error from every process, naming its rank when several run.

    Every rank meets the same bad input before any collective, and the launcher kills the others as soon as one
    exits, so a line printed by rank 0 alone is lost whenever another rank exits first.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    where = f" [rank {os.environ.get('RANK', '?')}]" if world > 1 else ""
    print(f"{prog}{where}: error: {message}", file=sys.stderr, flush=True)


def _opt(default: Any = None, help: str = "", tasks: tuple[str, ...] = ()) -> Any:
    metadata = {"help": help, "tasks": tasks}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=metadata)
    return field(default=default, metadata=metadata)


GEN = ("translation", "summarization")


@dataclass
class TrainConfig:
    """One fine-tuning run. ``None`` means "the task recipe's default" for the data/length fields."""

    # --- what to train -------------------------------------------------------------------------------------------
    task: str = _opt("glue", "Task family: glue, translation, qa or summarization.")
    model_name_or_path: Optional[str] = _opt(
        None, "Hub id or local path of the pretrained checkpoint (required)."
    )
    tokenizer_name: Optional[str] = _opt(None, "Tokenizer Hub id or path, if not the model's.")
    method: str = _opt(
        "orthora", "Adapter method: orthora, or a PEFT method name (lora, oft, boft, hra, ia3, ...)."
    )
    adapter: dict = _opt({}, "Keyword arguments of the adapter config (OrthoConfig, LoraConfig, ...).")
    trust_remote_code: bool = _opt(False, "Allow model code from the Hub (passed to from_pretrained).")

    # --- data -------------------------------------------------------------------------------------------------------
    dataset_name: Optional[str] = _opt(
        None, "Hub data set name (default: the task's usual one). Ignored with train_file."
    )
    dataset_config_name: Optional[str] = _opt(
        None, "Hub data set configuration (e.g. 3.0.0 for cnn_dailymail)."
    )
    train_file: Optional[str] = _opt(None, "Local training data (.json, .jsonl or .csv), instead of the Hub.")
    validation_file: Optional[str] = _opt(None, "Local evaluation data (.json, .jsonl or .csv).")
    extra_validation_files: dict = _opt(
        {}, "More evaluation sets, {name: path}, e.g. {validation_mismatched: dev_mm.jsonl} for MNLI."
    )
    max_train_samples: Optional[int] = _opt(None, "Keep only the first N training rows.")
    max_eval_samples: Optional[int] = _opt(None, "Keep only the first N rows of each evaluation set.")
    max_seq_length: Optional[int] = _opt(
        None, "Maximum input length in tokens (GLUE 128, QA 384).", ("glue", "qa")
    )
    preprocessing_num_workers: Optional[int] = _opt(None, "Processes for datasets.map.")

    # --- GLUE ---------------------------------------------------------------------------------------------------------
    task_name: Optional[str] = _opt(
        None, "GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte or wnli.", ("glue",)
    )

    # --- extractive QA ----------------------------------------------------------------------------------------------
    version_2_with_negative: bool = _opt(False, "SQuAD v2.0: some questions have no answer.", ("qa",))
    doc_stride: int = _opt(128, "Overlap, in tokens, between the windows of a long context.", ("qa",))
    n_best_size: int = _opt(20, "Start/end candidates considered when extracting an answer span.", ("qa",))
    max_answer_length: int = _opt(30, "Longest answer span, in tokens.", ("qa",))
    null_score_diff_threshold: float = _opt(
        0.0, "SQuAD v2: predict no answer when null score - best span score exceeds this.", ("qa",)
    )
    question_column: str = _opt("question", "Question column.", ("qa",))
    context_column: str = _opt("context", "Context column.", ("qa",))
    answer_column: str = _opt("answers", "Answers column ({text: [...], answer_start: [...]}).", ("qa",))

    # --- sequence-to-sequence (translation, summarization) -----------------------------------------------------------
    source_lang: Optional[str] = _opt(
        None, "Source language key (e.g. en, or en_XX for mBART).", ("translation",)
    )
    target_lang: Optional[str] = _opt(
        None, "Target language key (e.g. ro, or ro_RO for mBART).", ("translation",)
    )
    forced_bos_token: Optional[str] = _opt(
        None, "Token forced first in generation (mBART-50 target code).", ("translation",)
    )
    text_column: Optional[str] = _opt(
        None, "Document column (default: the data set's usual one).", ("summarization",)
    )
    summary_column: Optional[str] = _opt(
        None, "Summary column (default: the data set's usual one).", ("summarization",)
    )
    source_prefix: Optional[str] = _opt(
        None, "Text put before every source (T5: 'translate English to German: ').", GEN
    )
    max_source_length: Optional[int] = _opt(None, "Maximum source length in tokens.", GEN)
    max_target_length: Optional[int] = _opt(None, "Maximum target length in tokens (training labels).", GEN)
    generation_max_length: Optional[int] = _opt(
        None, "Maximum generated length at evaluation (default: max_target_length).", GEN
    )
    num_beams: int = _opt(4, "Beams for generation at evaluation.", GEN)

    # --- optimisation ---------------------------------------------------------------------------------------------
    per_device_train_batch_size: int = _opt(16, "Training batch size per process.")
    per_device_eval_batch_size: int = _opt(32, "Evaluation batch size per process.")
    learning_rate: float = _opt(1e-3, "Peak learning rate (AdamW).")
    head_learning_rate: Optional[float] = _opt(
        None,
        "Peak learning rate of the task head (the adapter's modules_to_save, e.g. the classifier); "
        "null: learning_rate. A fast head with a slow adapter distorts pretrained features less.",
    )
    weight_decay: float = _opt(0.0, "AdamW weight decay.")
    adam_beta1: float = _opt(0.9, "AdamW beta1.")
    adam_beta2: float = _opt(0.999, "AdamW beta2.")
    num_train_epochs: int = _opt(3, "Training epochs (overridden by max_train_steps).")
    max_train_steps: Optional[int] = _opt(None, "Total optimizer steps; overrides num_train_epochs.")
    gradient_accumulation_steps: int = _opt(1, "Batches accumulated per optimizer step.")
    lr_scheduler_type: str = _opt(
        "linear", "transformers scheduler: linear, cosine, constant_with_warmup, ..."
    )
    warmup_ratio: float = _opt(
        0.0, "Warmup as a fraction of the optimizer steps (if num_warmup_steps is unset)."
    )
    num_warmup_steps: Optional[int] = _opt(None, "Warmup optimizer steps.")
    max_grad_norm: Optional[float] = _opt(1.0, "Clip the gradient norm to this (null: no clipping).")
    mixed_precision: Optional[str] = _opt(None, "no, fp16 or bf16 (default: accelerate launch's setting).")
    on_nonfinite: str = _opt(
        "stop",
        "When the loss or a gradient is NaN/Inf: stop (report the step and module; nothing more is written) or "
        "skip (drop that step's update, report it, go on).",
    )
    seed: int = _opt(42, "Seed for weights, dropout and data order.")

    # --- evaluation, checkpoints, logging, outputs ----------------------------------------------------------------
    output_dir: str = _opt("outputs/run", "Where the adapter, checkpoints, logs and results.json go.")
    eval_steps: Optional[int] = _opt(
        None, "Evaluate every N optimizer steps (default: at the end of each epoch)."
    )
    eval_before_training: bool = _opt(False, "Also evaluate the untrained model (results: initial_metrics).")
    metric_for_best_model: Optional[str] = _opt(
        None, "Metric tracked for the best adapter (default: the task's)."
    )
    checkpointing_steps: Optional[Union[int, str]] = _opt(
        None, "Save a resumable checkpoint every N optimizer steps, or 'epoch'."
    )
    checkpoints_total_limit: Optional[int] = _opt(None, "Keep only the newest N checkpoints.")
    resume_from_checkpoint: Optional[str] = _opt(None, "Checkpoint folder to continue from, or 'latest'.")
    logging_steps: int = _opt(10, "Log training loss and learning rate every N optimizer steps.")
    report_to: str = _opt("tensorboard", "accelerate tracker(s): tensorboard, wandb, all, or none.")
    save_merged_model: bool = _opt(False, "Also save the base model with the adapter merged in.")
    push_to_hub: bool = _opt(
        False,
        "Push the best adapter and its model card to the Hub at the end (needs hub_model_id and a token).",
    )
    hub_model_id: Optional[str] = _opt(
        None, "Hub repository for push_to_hub, e.g. your-name/bert-sst2-orthora."
    )
    hub_strategy: str = _opt("end", "end: push once at the end; checkpoint: also push at every checkpoint.")
    hub_private_repo: bool = _opt(False, "Create the Hub repository as private.")
    hub_revision: Optional[str] = _opt(None, "Branch to push to (created if missing; default main).")
    hub_token: Optional[str] = _opt(
        None, "Hub token (default: HF_TOKEN or `hf auth login`); never written to the outputs."
    )

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for item in dataclasses.fields(self):  # the Python API gets the same coercion as YAML and the CLI
            setattr(self, item.name, coerce(item.name, getattr(self, item.name), hints[item.name]))
        self.validate()

    # ----------------------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check values that need neither the data nor the model."""
        if self.task not in TASKS:
            raise ConfigError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if not self.model_name_or_path:
            raise ConfigError("model_name_or_path is required (a Hub id or a local checkpoint folder)")
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISIONS:
            raise ConfigError(
                f"mixed_precision={self.mixed_precision!r}; choose one of {', '.join(MIXED_PRECISIONS)}"
            )
        for name in (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "num_train_epochs",
            "logging_steps",
            "num_beams",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "max_train_steps",
            "eval_steps",
            "checkpoints_total_limit",
            "max_train_samples",
            "max_eval_samples",
            "max_seq_length",
            "max_source_length",
            "max_target_length",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 or null, got {value}")
        if isinstance(self.checkpointing_steps, str) and self.checkpointing_steps != "epoch":
            if not self.checkpointing_steps.isdigit():
                raise ConfigError(
                    f"checkpointing_steps must be a number of steps or 'epoch', got {self.checkpointing_steps!r}"
                )
            self.checkpointing_steps = int(self.checkpointing_steps)
        if isinstance(self.checkpointing_steps, int) and self.checkpointing_steps < 1:
            raise ConfigError(f"checkpointing_steps must be >= 1, got {self.checkpointing_steps}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.head_learning_rate is not None and self.head_learning_rate <= 0:
            raise ConfigError(f"head_learning_rate must be positive or null, got {self.head_learning_rate}")
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigError("push_to_hub needs hub_model_id (e.g. your-name/bert-sst2-orthora)")
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ConfigError(
                f"on_nonfinite={self.on_nonfinite!r}; choose one of {', '.join(NONFINITE_POLICIES)}"
            )
        if self.hub_strategy not in HUB_STRATEGIES:
            raise ConfigError(
                f"hub_strategy={self.hub_strategy!r}; choose one of {', '.join(HUB_STRATEGIES)}"
            )
        if not isinstance(self.adapter, dict):
            raise ConfigError(
                f"adapter must be a mapping of adapter-config arguments, got {type(self.adapter).__name__}"
            )
        if not isinstance(self.extra_validation_files, dict):
            raise ConfigError("extra_validation_files must be a mapping {name: path}")
        if self.validation_file is None and self.extra_validation_files and self.train_file is None:
            raise ConfigError("extra_validation_files needs local data (train_file and validation_file)")

    # ----------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a plain mapping (YAML, overrides): unknown keys, wrong types and wrong-task keys are errors."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        typed: dict[str, Any] = {}
        for key, value in values.items():
            if key not in fields:
                raise unknown_key_error(key)
            typed[key] = coerce(key, value, _field_type(cls, key))
        task = typed.get("task", cls.task)
        if task not in TASKS:
            raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
        for key in typed:
            tasks = fields[key].metadata.get("tasks", ())
            if tasks and task not in tasks:
                raise ConfigError(
                    f"config key {key!r} applies to task(s) {', '.join(tasks)}, not to task {task!r}"
                )
        return cls(**typed)

    def to_dict(self) -> dict[str, Any]:
        """Every value except the Hub token, which must not end up in train_config.yaml, results.json or logs."""
        values = dataclasses.asdict(self)
        values.pop("hub_token")
        return values


def unknown_key_error(key: str) -> ConfigError:
    """The error for a key TrainConfig does not have, with the closest real key as a suggestion."""
    hint = difflib.get_close_matches(key, [f.name for f in dataclasses.fields(TrainConfig)], n=1)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    return ConfigError(f"unknown config key {key!r}{suggestion}")


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def coerce(key: str, value: Any, annotation: Any) -> Any:
    """Convert ``value`` (from YAML or the command line) to the field's type, or say which key is wrong."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        errors = []
        for option in options:
            try:
                return coerce(key, value, option)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"config key {key!r}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
        try:
            number = float(value) if isinstance(value, str) else value
            if isinstance(number, float) and number.is_integer():
                number = int(number)
            if isinstance(number, int):
                return number
        except ValueError:
            pass
        raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key {key!r}: expected a number, got {value!r}") from None
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
        return str(value)
    if annotation is dict or origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
        return value
    return value


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config file into a mapping, with a one-line error if it is missing or malformed."""
    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle)
    except OSError as err:
        raise ConfigError(f"cannot read config file {os.fspath(path)!r}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(
            f"config file {os.fspath(path)!r} is not valid YAML: {str(err).splitlines()[0]}"
        ) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {os.fspath(path)!r} must hold a mapping of keys to values")
    return values


def parse_value(text: str) -> Any:
    """A command-line value: YAML scalars/lists/mappings, but '3e-4' is a number (YAML 1.1 would say string)."""
    if _NUMBER.fullmatch(text.strip()):
        return float(text) if any(c in text for c in ".eE") else int(text)
    return yaml.safe_load(text)


def apply_overrides(values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Merge ``--key value`` overrides into ``values``; ``adapter.block_size`` style keys set nested entries."""
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
    for key, value in overrides.items():
        if "." in key:
            parent, child = key.split(".", 1)
            if parent not in ("adapter", "extra_validation_files"):
                raise ConfigError(
                    f"unknown config key {key!r} (only adapter.* and extra_validation_files.* nest)"
                )
            merged.setdefault(parent, {})
            if not isinstance(merged[parent], dict):
                raise ConfigError(f"config key {parent!r} must be a mapping to set {key!r}")
            merged[parent][child] = value
        else:
            merged[key] = value
    return merged
