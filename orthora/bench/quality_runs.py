"""One quality run: what identifies it (`RunKey`), the protocol every method shares, and how it is trained and scored.

`run_one` fine-tunes once through `orthora.train.run` and measures what the adapted encoder forgot (its zero-shot
STS-B score against the untouched model's); `load_runs` reads the finished runs, one JSON file each, back from
their folder. The task and target-set tables live here because a run is defined by them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from orthora.train.recipes.glue import GLUE_METRICS
from orthora.train.recipes.qa import SQUAD_METRICS

from .models import BERT_TARGETS, minilm_path
from .quality_methods import QualityMethod
from .report import RESULTS_DIR, machine_info

GLUE_TASKS = ("sst2", "mrpc", "stsb", "cola", "rte")
QA_TASKS = ("squad",)
#: metrics that make up each task's score (their mean; GLUE leaderboard convention), from the recipes' tables
TASK_METRICS = {**{task: GLUE_METRICS[task] for task in GLUE_TASKS}, "squad": SQUAD_METRICS}
#: target sets: the encoder's linear layers only, and the common user pattern whose ``dense`` also catches the pooler
TARGET_SETS = {"encoder": BERT_TARGETS, "dense": ["query", "key", "value", "dense"]}
#: where finished runs are written, one JSON file each (the default of --runs-dir)
RUNS_DIR = RESULTS_DIR / "quality-runs"


@dataclasses.dataclass(frozen=True)
class RunKey:
    """What identifies one fine-tuning run; its file name is derived from it."""

    target_set: str
    task: str
    method: str
    fingerprint: str
    lr: float
    seed: int
    head_lr: Optional[float] = None  # None: the head trains at ``lr`` (the protocol's original form)

    @property
    def file_name(self) -> str:
        safe = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in self.method)
        return f"{self.target_set}__{self.task}__{safe}__{self.fingerprint}__{self._settings}.json"

    @property
    def claim_name(self) -> str:
        """The lock file's name: without the method's name, so two names for one config never run it twice."""
        return f"{self.target_set}__{self.task}__{self.fingerprint}__{self._settings}.claim"

    def finished_in(self, runs_dir: Path) -> bool:
        """Whether ``runs_dir`` holds this setting's result, under this method name or another for the same config."""
        pattern = f"{self.target_set}__{self.task}__*__{self.fingerprint}__{self._settings}.json"
        return any(Path(runs_dir).glob(pattern))

    @property
    def _settings(self) -> str:
        head = f"__h{self.head_lr:g}" if self.head_lr is not None else ""
        return f"lr{self.lr:g}{head}__s{self.seed}"


@dataclasses.dataclass
class Protocol:
    """Everything that must be equal across methods for their numbers to be comparable."""

    train_samples: int = 2000
    epochs: int = 3
    batch_size: int = 16
    warmup_ratio: float = 0.06
    max_seq_length: int = 128
    eval_samples: Optional[int] = None  # None: full GLUE dev sets
    squad_train_samples: int = 2000
    squad_eval_samples: int = 1000
    squad_max_seq_length: int = 256
    squad_doc_stride: int = 96
    sts_pairs: Optional[int] = None  # None: the full STS-B dev set for forgetting
    head_learning_rate: Optional[float] = None  # one head LR for every method; None: the head follows each LR
    model: Optional[str] = None  # None: all-MiniLM-L6-v2

    def model_path(self) -> str:
        return self.model or minilm_path()


def score_of(task: str, metrics: dict[str, Any]) -> Optional[float]:
    """The task's score on a 0-1 scale: the mean of its `TASK_METRICS` (SQuAD's percentages divided by 100)."""
    values = [metrics.get(k) for k in TASK_METRICS[task]]
    if any(not isinstance(v, (int, float)) or math.isnan(v) for v in values):
        return None
    scale = 0.01 if task in QA_TASKS else 1.0
    return statistics.mean(float(v) * scale for v in values)


def trivial_score(task: str, data_dir: Path, eval_samples: Optional[int] = None) -> float:
    """The score of the best constant prediction on the dev set: majority class (accuracy, F1, MCC), 0 for a
    constant regression (its correlation is undefined) and for SQuAD."""
    if task in QA_TASKS or task == "stsb":
        return 0.0
    import numpy as np

    from orthora.train.recipes.glue import glue_metrics

    labels = []
    with open(data_dir / "glue" / task / "validation.jsonl", encoding="utf-8") as handle:
        for line in handle:
            labels.append(int(json.loads(line)["label"]))
    labels = np.asarray(labels[:eval_samples] if eval_samples else labels)
    best = 0.0
    for constant in np.unique(labels):
        score = score_of(task, glue_metrics(task, np.full_like(labels, constant), labels))
        best = max(best, score or 0.0)
    return best


def train_config(key: RunKey, method: QualityMethod, protocol: Protocol, data_dir: Path, out_dir: str):
    """The `orthora.train.TrainConfig` of one run: the protocol's settings, the method's adapter, the key's LR/seed."""
    from orthora.train import TrainConfig

    adapter = {**method.spec.kwargs, "target_modules": list(TARGET_SETS[key.target_set])}
    common = dict(
        model_name_or_path=protocol.model_path(),
        method=method.spec.kind,
        adapter=adapter,
        learning_rate=key.lr,
        head_learning_rate=key.head_lr,
        seed=key.seed,
        num_train_epochs=protocol.epochs,
        output_dir=out_dir,
        report_to="none",
        checkpointing_steps=None,
        logging_steps=10**6,
        eval_steps=10**9,  # one evaluation, the engine's final one (the score is the final model's)
        warmup_ratio=protocol.warmup_ratio,
        per_device_train_batch_size=protocol.batch_size,
        per_device_eval_batch_size=64,
    )
    if key.task in QA_TASKS:
        return TrainConfig(
            task="qa",
            train_file=str(data_dir / "squad" / "train.jsonl"),
            validation_file=str(data_dir / "squad" / "validation.jsonl"),
            max_train_samples=protocol.squad_train_samples,
            max_eval_samples=protocol.squad_eval_samples,
            max_seq_length=protocol.squad_max_seq_length,
            doc_stride=protocol.squad_doc_stride,
            **common,
        )
    return TrainConfig(
        task="glue",
        task_name=key.task,
        train_file=str(data_dir / "glue" / key.task / "train.jsonl"),
        validation_file=str(data_dir / "glue" / key.task / "validation.jsonl"),
        max_train_samples=protocol.train_samples,
        max_eval_samples=protocol.eval_samples,
        max_seq_length=protocol.max_seq_length,
        **common,
    )


def _load_adapted(key: RunKey, adapter_dir: str, protocol: Protocol):
    """The trained adapter on a fresh base model, through PEFT's public loading path (any method)."""
    from peft import PeftModel
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    import orthora  # noqa: F401  (registers the method with PEFT)

    if key.task in QA_TASKS:
        base = AutoModelForQuestionAnswering.from_pretrained(protocol.model_path())
    else:
        base = AutoModelForSequenceClassification.from_pretrained(
            protocol.model_path(), num_labels=1 if key.task == "stsb" else 2
        )
    return PeftModel.from_pretrained(base, adapter_dir).eval()


_STS_CACHE: dict[tuple, Any] = {}


def base_sts(protocol: Protocol, data_dir: Path) -> float:
    """The untouched model's zero-shot STS-B score (computed once per process)."""
    from transformers import AutoModel, AutoTokenizer

    from .forgetting import load_sts_pairs, zero_shot_sts

    key = ("base", protocol.model_path(), protocol.sts_pairs, str(data_dir))
    if key not in _STS_CACHE:
        pairs = load_sts_pairs(data_dir / "glue" / "stsb" / "validation.jsonl", protocol.sts_pairs)
        tokenizer = AutoTokenizer.from_pretrained(protocol.model_path())
        _STS_CACHE[key] = zero_shot_sts(AutoModel.from_pretrained(protocol.model_path()), tokenizer, pairs)
    return _STS_CACHE[key]


def run_one(key: RunKey, method: QualityMethod, protocol: Protocol, data_dir: Path) -> dict[str, Any]:
    """Fine-tune once through `orthora.train.run`, then score the adapted encoder's zero-shot STS-B."""
    from transformers import AutoTokenizer

    from orthora.train import run

    from .forgetting import load_sts_pairs, zero_shot_sts

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="orthora-quality-") as tmp:
        result = run(train_config(key, method, protocol, data_dir, tmp))
        adapted = _load_adapted(key, result["adapter_dir"], protocol)
        pairs = load_sts_pairs(data_dir / "glue" / "stsb" / "validation.jsonl", protocol.sts_pairs)
        sts = zero_shot_sts(adapted, AutoTokenizer.from_pretrained(protocol.model_path()), pairs)
    metrics = result["metrics"]
    split = next((k for k, v in metrics.items() if isinstance(v, dict)), None)
    final = {k: v for k, v in (metrics[split] if split else {}).items() if isinstance(v, (int, float))}
    sts_base = base_sts(protocol, data_dir)
    return {
        **dataclasses.asdict(key),
        "method_kind": method.spec.kind,
        "adapter": result["config"]["adapter"],
        "resolved_adapter": method.resolved_config,
        "tier": method.tier,
        "targets": list(TARGET_SETS[key.target_set]),
        "metrics": final,
        "score": score_of(key.task, final),
        "sts_zero_shot": sts,
        "sts_base": sts_base,
        "forgetting": sts_base - sts,
        "trainable_params": result["trainable_params"],
        "train_time_s": result["train_time_s"],
        "wall_s": time.perf_counter() - started,
        "protocol": dataclasses.asdict(protocol),
        "machine": machine_info(),
    }


def run_key(run: dict[str, Any]) -> RunKey:
    """The key a finished run's JSON was written under."""
    return RunKey(**{field.name: run.get(field.name) for field in dataclasses.fields(RunKey)})


def merge_runs(source: Path, runs_dir: Path, twins_dir: Path) -> dict[str, list[str]]:
    """Bring the finished runs of another machine's sweep folder into ``runs_dir``.

    A setting not finished in ``runs_dir`` is copied in. One that finished on both machines keeps the run already
    there (the tables do not change under it) and the incoming one goes to ``twins_dir``, where the report pairs the
    two. A file that is already there unchanged is skipped. Every incoming file is read before any is written, so a
    folder holding a broken file changes nothing.
    """
    from orthora.train.atomic_files import write_json_atomic

    incoming = []
    for path in sorted(Path(source).glob("*.json")):
        try:
            run = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not a finished run ({err}); nothing was merged") from None
        named = [f.name for f in dataclasses.fields(RunKey) if f.name != "head_lr"]  # head_lr may be None
        missing = [k for k in named if not isinstance(run, dict) or run.get(k) is None]
        if missing:
            raise ValueError(f"{path} is not a finished run (no {', '.join(missing)}); nothing was merged")
        incoming.append((path.name, run))
    done: dict[str, list[str]] = {"added": [], "twins": [], "unchanged": []}
    for name, run in incoming:
        here = Path(runs_dir) / name
        if here.exists() and json.loads(here.read_text()) == run:
            done["unchanged"].append(name)
        elif run_key(run).finished_in(runs_dir):
            write_json_atomic(Path(twins_dir) / name, run)
            done["twins"].append(name)
        else:
            write_json_atomic(here, run)
            done["added"].append(name)
    return done


def load_runs(runs_dir: Path) -> list[dict[str, Any]]:
    """Every finished run in ``runs_dir`` (files that do not parse, e.g. from another tool, are an error)."""
    runs = []
    for path in sorted(Path(runs_dir).glob("*.json")):
        try:
            runs.append(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path} is not a finished run ({err}); delete it to rerun that setting"
            ) from None
    return runs
