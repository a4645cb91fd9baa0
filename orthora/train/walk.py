"""Worked example of adapter arithmetic: train two GLUE task adapters, then walk between them and beyond.

For each method (orthora and PEFT LoRA) one adapter is trained per task with the training engine. The two adapters
are then combined with weights ``(1 - t, t)`` for ``t`` from -0.5 to 1.5: orthora through
``add_weighted_adapter(..., combination_type="geodesic")`` (every point an exact rotation), LoRA through PEFT's
``add_weighted_adapter(..., combination_type="cat")``, which is exactly ``W + (1 - t) dW_1 + t dW_2``. At every
point both tasks' dev sets are scored and the diagnostics (:mod:`orthora.diagnostics`) recorded.

Heads: each task adapter was trained with its own classifier head (PEFT's ``modules_to_save``). Heads cannot be
interpolated (the tasks' label spaces differ), so the adapters are loaded without them and task ``k`` is always
scored with the head trained for task ``k``, on top of the combined body. At ``t = 0`` this is exactly adapter 1
with head 1, at ``t = 1`` adapter 2 with head 2.

Results are written as they come (JSON after every point), then a markdown table and a PNG.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from .. import arithmetic, diagnostics
from ..layer import OrthoLayer
from .atomic_files import write_json_atomic
from .config import TrainConfig
from .engine import run as train_run
from .recipes.glue import GLUE_TASKS, PRIMARY_METRIC, GlueRecipe

#: adapter settings of each method: the same targets and about the same number of trainable parameters
METHOD_ADAPTERS: dict[str, dict[str, Any]] = {
    "orthora": {"block_size": 32, "side": "input", "target_modules": ["query", "value"]},
    "lora": {"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]},
}
#: how each method's adapters are combined at a point of the walk
COMBINATION = {"orthora": "geodesic", "lora": "cat"}
WALK_ADAPTER = "walk"


@dataclass
class WalkConfig:
    """Everything the worked example needs; the defaults are the documented run."""

    model_name_or_path: str
    data_dir: str  # holds <task>/train.jsonl and <task>/validation.jsonl (GLUE Hub schema)
    output_dir: str = "outputs/arithmetic_walk"
    results_prefix: str = "benchmarks/results/arithmetic-walk"
    tasks: tuple[str, str] = ("sst2", "stsb")
    methods: tuple[str, ...] = ("orthora", "lora")
    weights: tuple[float, ...] = (-0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
    max_train_samples: int = 1500
    num_train_epochs: int = 3
    learning_rate: float = 1e-3
    batch_size: int = 16
    max_seq_length: int = 128
    max_eval_samples: int | None = None
    probe_size: int = 32
    seed: int = 0


# ------------------------------------------------------------------------------------------------------ training
def train_adapters(config: WalkConfig) -> dict[tuple[str, str], dict[str, Any]]:
    """Train (or reuse, when its results.json exists) one adapter per method and task with the training engine."""
    trained = {}
    for method in config.methods:
        for task in config.tasks:
            output_dir = Path(config.output_dir) / method / task
            results_file = output_dir / "results.json"
            if not results_file.is_file():
                train_run(
                    TrainConfig(
                        task="glue",
                        task_name=task,
                        model_name_or_path=config.model_name_or_path,
                        method=method,
                        adapter=dict(METHOD_ADAPTERS[method]),
                        train_file=str(Path(config.data_dir) / task / "train.jsonl"),
                        validation_file=str(Path(config.data_dir) / task / "validation.jsonl"),
                        max_train_samples=config.max_train_samples,
                        max_eval_samples=config.max_eval_samples,
                        max_seq_length=config.max_seq_length,
                        per_device_train_batch_size=config.batch_size,
                        per_device_eval_batch_size=64,
                        learning_rate=config.learning_rate,
                        num_train_epochs=config.num_train_epochs,
                        seed=config.seed,
                        output_dir=str(output_dir),
                        report_to="none",
                        checkpointing_steps=None,
                    )
                )
            results = json.loads(results_file.read_text())
            trained[(method, task)] = {"adapter_dir": str(output_dir / "adapter"), "results": results}
    return trained


# ------------------------------------------------------------------------------------------------ evaluation
class TaskScorer:
    """Tokenized dev set of one GLUE task and the recipe's own prediction and metric code."""

    def __init__(self, config: WalkConfig, task: str, tokenizer) -> None:
        import datasets

        train_config = TrainConfig(
            task="glue",
            task_name=task,
            model_name_or_path=config.model_name_or_path,
            max_seq_length=config.max_seq_length,
        )
        self.recipe = GlueRecipe(train_config)
        self.task = task
        rows = datasets.load_dataset(
            "json", data_files=str(Path(config.data_dir) / task / "validation.jsonl"), split="train"
        )
        if config.max_eval_samples:
            rows = rows.select(range(min(config.max_eval_samples, len(rows))))
        self.eval_set = self.recipe.preprocess_eval("validation", rows, tokenizer)
        columns = ["input_ids", "attention_mask", "labels"] + (
            ["token_type_ids"] if "token_type_ids" in self.eval_set.features.column_names else []
        )
        self.features = self.eval_set.features.select_columns(columns)
        self.collate = self.recipe.collator(tokenizer, None, None)

    @torch.no_grad()
    def score(self, model: nn.Module, batch_size: int = 64) -> dict[str, float]:
        model.eval()
        predictions, labels = [], []
        for start in range(0, len(self.features), batch_size):
            batch = self.collate(
                [self.features[i] for i in range(start, min(start + batch_size, len(self.features)))]
            )
            # the labels stay out of the forward: the swapped head's task is not the one the base config knows
            outputs = self.recipe.predict(_without_labels(model), batch, None)
            predictions.append(outputs["predictions"][0].numpy())
            labels.append(outputs["labels"][0].numpy())
        arrays = {"predictions": np.concatenate(predictions), "labels": np.concatenate(labels)}
        return self.recipe.compute_metrics(self.eval_set, arrays)


def _without_labels(model: nn.Module):
    return lambda **batch: model(**{k: v for k, v in batch.items() if k != "labels"})


def _load_head(adapter_dir: str) -> nn.Linear:
    """The classifier head saved with an adapter (PEFT saves modules_to_save under the module's own name)."""
    state = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    weight = next(v for k, v in state.items() if k.endswith("classifier.weight"))
    bias = next(v for k, v in state.items() if k.endswith("classifier.bias"))
    head = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return head.eval()


def load_body_adapters(
    config: WalkConfig, method: str, trained: dict
) -> tuple[nn.Module, dict[str, nn.Linear]]:
    """A PEFT model holding each task's adapter (named by task) without heads, and the heads by task."""
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForSequenceClassification

    import orthora  # noqa: F401  (registers the method with PEFT)

    base = AutoModelForSequenceClassification.from_pretrained(config.model_name_or_path, num_labels=2)
    model = None
    heads = {}
    for task in config.tasks:
        adapter_dir = trained[(method, task)]["adapter_dir"]
        peft_config = PeftConfig.from_pretrained(adapter_dir)
        peft_config.modules_to_save = None  # heads are attached per task below, never combined
        peft_config.task_type = None
        peft_config.inference_mode = True
        if model is None:
            model = get_peft_model(base, peft_config, adapter_name=task)
        else:
            model.add_adapter(task, peft_config)
        state = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
        body = {k: v for k, v in state.items() if "classifier" not in k}
        result = set_peft_model_state_dict(model, body, adapter_name=task)
        missing = [k for k in result.missing_keys if f".{task}." in k]
        if missing:
            raise ValueError(f"{adapter_dir}: adapter weights missing after loading: {missing[:3]}")
        heads[task] = _load_head(adapter_dir)
    return model.eval(), heads


def _use_head(model: nn.Module, head: nn.Linear) -> None:
    model.base_model.model.classifier = head


def _probe_batch(scorer: TaskScorer, size: int) -> dict[str, torch.Tensor]:
    batch = scorer.collate([scorer.features[i] for i in range(min(size, len(scorer.features)))])
    return {k: v for k, v in batch.items() if k != "labels"}


def _geodesic_gap(model: nn.Module, tasks: Sequence[str], t: float) -> float | None:
    """Largest ``||R_walk - R_1 (R_1^T R_2)^t||_F`` over all blocks: how far the log-Euclidean point is from the
    Riemannian geodesic between the two adapters (0 when their blocks commute)."""
    gap = 0.0
    for module in model.modules():
        if not isinstance(module, OrthoLayer):
            continue
        for _, table_name in arithmetic.SIDES:
            table = getattr(module, table_name)
            if WALK_ADAPTER not in table:
                continue
            first, second = (arithmetic.exact_blocks(table[task]) for task in tasks)
            first, second = torch.broadcast_tensors(first, second)
            geodesic = first @ arithmetic.rotation_power(first.mT @ second, t)
            walk = arithmetic.exact_blocks(table[WALK_ADAPTER])
            gap = max(gap, float(torch.linalg.matrix_norm(walk - geodesic).max()))
    return gap


def walk_method(
    config: WalkConfig, method: str, trained: dict, scorers: dict[str, TaskScorer], on_point
) -> list[dict[str, Any]]:
    """Score both tasks and record diagnostics at every weight ``t`` of the walk for one method."""
    model, heads = load_body_adapters(config, method, trained)
    probe = _probe_batch(scorers[config.tasks[0]], config.probe_size)
    rows = []
    for t in config.weights:
        started = time.perf_counter()
        weights = [1.0 - t, t]
        if WALK_ADAPTER in model.peft_config:
            model.set_adapter(config.tasks[0])
            model.delete_adapter(WALK_ADAPTER)
        model.add_weighted_adapter(
            list(config.tasks), weights, WALK_ADAPTER, combination_type=COMBINATION[method]
        )
        model.set_adapter(WALK_ADAPTER)
        model.eval()
        row: dict[str, Any] = {
            "method": method,
            "t": t,
            "weights": weights,
            "combination": COMBINATION[method],
        }
        for task in config.tasks:
            _use_head(model, heads[task])
            metrics = scorers[task].score(model)
            row[f"{task}_{PRIMARY_METRIC.get(task, 'accuracy')}"] = metrics[
                PRIMARY_METRIC.get(task, "accuracy")
            ]
            row[f"{task}_metrics"] = metrics
        summary = diagnostics.model_summary(diagnostics.layer_report(model, WALK_ADAPTER))
        shift = diagnostics.representation_shift(None, model, probe)
        row["diagnostics"] = summary
        row["representation_mean_cosine"] = shift["mean_cosine"]
        row["geodesic_gap"] = _geodesic_gap(model, config.tasks, t) if method == "orthora" else None
        row["seconds"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        on_point(row)
    return rows


# --------------------------------------------------------------------------------------------------- reporting
def metric_key(task: str) -> str:
    return f"{task}_{PRIMARY_METRIC.get(task, 'accuracy')}"


def markdown_table(rows: list[dict[str, Any]], tasks: Sequence[str]) -> str:
    """One line per method and weight: both tasks' dev scores and the main diagnostics."""
    header = (
        "| method | t | "
        + " | ".join(f"{t} {PRIMARY_METRIC.get(t, 'accuracy')}" for t in tasks)
        + " | max angle (rad) | mean distance from I | relative weight change | hyperspherical energy change "
        "| hidden-state cosine | gap to geodesic |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]

    def fmt(value, digits=3):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "–"
        return f"{value:.{digits}f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"

    for row in rows:
        d = row["diagnostics"]
        cells = [row["method"], f"{row['t']:+.2f}"]
        cells += [fmt(row[metric_key(task)]) for task in tasks]
        cells += [
            fmt(d["max_angle"]),
            fmt(d["mean_distance_from_identity"]),
            fmt(d["relative_weight_change"]),
            fmt(d["hyperspherical_energy_relative_change"]),
            fmt(row["representation_mean_cosine"], 4),
            fmt(row["geodesic_gap"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], tasks: Sequence[str], path: str) -> None:
    """Dev scores along the walk (one panel per task) and the relative weight change, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(tasks) + 1, figsize=(5 * (len(tasks) + 1), 4))
    methods = sorted({row["method"] for row in rows})
    labels = {"orthora": "orthora geodesic", "lora": "LoRA linear (cat)"}
    for method in methods:
        mine = [row for row in rows if row["method"] == method]
        ts = [row["t"] for row in mine]
        for axis, task in zip(axes, tasks, strict=False):
            axis.plot(
                ts, [row[metric_key(task)] for row in mine], marker="o", label=labels.get(method, method)
            )
        axes[-1].plot(
            ts,
            [row["diagnostics"]["relative_weight_change"] for row in mine],
            marker="o",
            label=labels.get(method),
        )
    for axis, task in zip(axes, tasks, strict=False):
        axis.set_title(f"{task} dev {PRIMARY_METRIC.get(task, 'accuracy')} (own head)")
        axis.set_xlabel(f"t  (weights 1-t on {tasks[0]}, t on {tasks[1]})")
    axes[-1].set_title("relative weight change ||W'-W|| / ||W||")
    axes[-1].set_xlabel("t")
    for axis in axes:
        axis.axvline(0, color="grey", lw=0.5)
        axis.axvline(1, color="grey", lw=0.5)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run_walk(config: WalkConfig) -> dict[str, Any]:
    """Train, walk, and write ``<results_prefix>.json`` (after every point), ``.md`` and ``.png``."""
    from transformers import AutoTokenizer

    for task in config.tasks:
        if task not in GLUE_TASKS:
            raise ValueError(f"unknown GLUE task {task!r}; valid: {', '.join(GLUE_TASKS)}")
    started = time.perf_counter()
    trained = train_adapters(config)
    tokenizer = AutoTokenizer.from_pretrained(config.model_name_or_path)
    scorers = {task: TaskScorer(config, task, tokenizer) for task in config.tasks}
    payload: dict[str, Any] = {
        "config": {
            **asdict(config),  # machine paths reduced to their last part
            "model_name_or_path": Path(config.model_name_or_path).name,
            "data_dir": Path(config.data_dir).name,
        },
        "trained": {
            f"{m}/{t}": {k: v["results"][k] for k in ("metrics", "trainable_params", "train_time_s")}
            for (m, t), v in trained.items()
        },
        "points": [],
    }
    json_path = f"{config.results_prefix}.json"
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)

    def on_point(row: dict[str, Any]) -> None:
        payload["points"].append(row)
        payload["wall_seconds"] = round(time.perf_counter() - started, 1)
        write_json_atomic(json_path, payload)
        print(
            f"{row['method']:8s} t={row['t']:+.2f} "
            + " ".join(f"{task}={row[metric_key(task)]:.3f}" for task in config.tasks)
            + f" rel.change={row['diagnostics']['relative_weight_change']:.4f} ({row['seconds']} s)",
            flush=True,
        )

    for method in config.methods:
        walk_method(config, method, trained, scorers, on_point)
    Path(f"{config.results_prefix}.md").write_text(markdown_table(payload["points"], config.tasks))
    plot(payload["points"], config.tasks, f"{config.results_prefix}.png")
    payload["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_json_atomic(json_path, payload)
    return payload
