"""The quality sweep: every method fine-tunes all-MiniLM-L6-v2 under one protocol, and what it forgot is measured.

Protocol (docs/benchmarks.md): GLUE SST-2, MRPC, STS-B, CoLA and RTE with ``--train-samples`` rows each (all rows
where a set is smaller) and full dev sets, SQuAD v1.1 with its own sample sizes; the same epochs, batch, warmup,
seeds and data order for every method; trainable parameters matched to PEFT LoRA r=8 on the same targets (and one
half-budget tier). Each method gets its own learning-rate grid, chosen on seed 0 per task and extended until the best
point lies inside it; the other seeds then run at that learning rate. After each run the adapted encoder's zero-shot
STS-B score is taken (:mod:`orthora.bench.forgetting`), so every task score comes with what the method forgot.

Every run writes one JSON file when it finishes (atomically), named by its settings, so a sweep cut short loses at
most the run in flight, several worker processes can share a sweep (``--shard``-free: each claims the next pending
run with an exclusive lock file), and runs from several sessions combine by just being in the same folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

from orthora.config import OrthoConfig
from orthora.train.adapters import build_adapter_config
from orthora.train.atomic_files import write_json_atomic as write_atomic
from orthora.train.data import DATA_DIR_ENV, default_data_dir
from orthora.train.recipes.glue import GLUE_METRICS
from orthora.train.recipes.qa import SQUAD_METRICS

from .budgets import MethodSpec, matched_methods, targeted_widths, trainable_params
from .models import BERT_TARGETS, minilm_path
from .report import RESULTS_DIR, fmt, machine_info

GLUE_TASKS = ("sst2", "mrpc", "stsb", "cola", "rte")
QA_TASKS = ("squad",)
#: metrics that make up each task's score (their mean; GLUE leaderboard convention), from the recipes' tables
TASK_METRICS = {**{task: GLUE_METRICS[task] for task in GLUE_TASKS}, "squad": SQUAD_METRICS}
#: target sets: the encoder's linear layers only, and the common user pattern whose ``dense`` also catches the pooler
TARGET_SETS = {"encoder": BERT_TARGETS, "dense": ["query", "key", "value", "dense"]}
#: a run must beat the task's trivial baseline (majority class / constant prediction) by this much to count
SANITY_MARGIN = 0.02
#: learning rates a grid may use; each method starts from three neighbours and is extended along this ladder
LR_LADDER = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
DEFAULT_START_LRS = (3e-4, 1e-3, 3e-3)
RUNS_DIR = RESULTS_DIR / "quality-runs"


# ------------------------------------------------------------------------------------------------------ methods
@dataclasses.dataclass(frozen=True)
class QualityMethod:
    """A benchmarked method: its adapter config (``spec``), budget tier and where its LR grid starts."""

    name: str
    spec: MethodSpec
    tier: str  # "matched" (LoRA r=8's budget) or "half"
    start_lrs: tuple[float, ...] = DEFAULT_START_LRS

    @functools.cached_property
    def resolved_config(self) -> dict[str, Any]:
        """The adapter config this method trains with, every default filled in (targets and task left out)."""
        config = build_adapter_config(self.spec.kind, dict(self.spec.kwargs), task_type=None).to_dict()
        for key in (
            "target_modules",
            "task_type",
            "base_model_name_or_path",
            "revision",
            "inference_mode",
            "peft_version",
            "format_version",  # the file layout, not the method: a new layout must not orphan finished runs
        ):
            config.pop(key, None)
        return json.loads(json.dumps(config, sort_keys=True, default=str))

    @functools.cached_property
    def fingerprint(self) -> str:
        """A short hash of `resolved_config`: runs of an older default (e.g. ``orthora`` before a default changed)
        have another fingerprint, so they are never mixed with the current one."""
        return hashlib.sha1(json.dumps(self.resolved_config, sort_keys=True).encode()).hexdigest()[:8]


def parse_method_name(name: str) -> tuple[str, dict[str, Any]]:
    """``"orthora[side=output,block_size=16]"`` -> ``("orthora", {"side": "output", "block_size": 16})``.

    The bracket form benchmarks a variant without adding it to the table; values are parsed as JSON when they can be.
    """
    if "[" not in name:
        return name, {}
    if not name.endswith("]"):
        raise ValueError(f"method {name!r}: a variant is written base[key=value,...]")
    base, body = name[:-1].split("[", 1)
    kwargs: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in body.split(","))):
        if "=" not in item:
            raise ValueError(f"method {name!r}: {item!r} is not key=value")
        key, raw = (s.strip() for s in item.split("=", 1))
        try:
            kwargs[key] = json.loads(raw)
        except json.JSONDecodeError:
            kwargs[key] = raw
    return base, kwargs


def method_table(targets: Sequence[str]) -> dict[str, QualityMethod]:
    """The benchmarked methods on ``targets``, sized by `orthora.bench.budgets` on MiniLM's real layer shapes.

    ``orthora`` is ``OrthoConfig()`` exactly as shipped (only ``target_modules`` is set), so the table measures the
    default users get; ``orthora-output`` is the method's original output-side form.
    """
    widths = minilm_widths(targets)
    matched = _peers(matched_methods(widths, 32))
    half = _peers(matched_methods(widths, 16, "small"))
    default_block = OrthoConfig().block_size
    table = [
        QualityMethod("lora", _renamed(matched["lora"], "lora"), "matched"),
        QualityMethod("oft", _renamed(matched["oft"], "oft"), "matched"),
        QualityMethod("boft", _renamed(matched["boft"], "boft"), "matched") if "boft" in matched else None,
        QualityMethod("hra", _renamed(matched["hra"], "hra"), "matched"),
        QualityMethod("orthora", MethodSpec("orthora", "orthora", {}), "matched"),
        QualityMethod(  # the default's rotation on the output side, at LoRA r=8's budget like the others
            "orthora-output",
            MethodSpec("orthora-output", "orthora", {"side": "output", "block_size": 32, "magnitude": False}),
            "matched",
        ),
        QualityMethod("lora-half", _renamed(half["lora"], "lora-half"), "half"),
        QualityMethod("oft-half", _renamed(half["oft"], "oft-half"), "half"),
        QualityMethod(  # the default with half its block size: half its parameters
            "orthora-half", MethodSpec("orthora-half", "orthora", {"block_size": default_block // 2}), "half"
        ),
    ]
    return {m.name: m for m in table if m is not None}


def _peers(specs: Sequence[MethodSpec]) -> dict[str, MethodSpec]:
    """The PEFT peers among `matched_methods`' specs, keyed by method (OFT in PEFT's default Cayley-Neumann form)."""
    out = {}
    for spec in specs:
        if spec.kind in ("lora", "hra", "boft") or spec.name == "oft-cayley_neumann":
            out[spec.kind] = spec
    return out


def _renamed(spec: MethodSpec, name: str) -> MethodSpec:
    return MethodSpec(name, spec.kind, dict(spec.kwargs))


def resolve_method(name: str, targets: Sequence[str]) -> QualityMethod:
    """A table method, or a bracketed variant of one (``orthora[side=both]``), with a clear error otherwise."""
    table = method_table(targets)
    base, extra = parse_method_name(name)
    if base not in table:
        raise ValueError(
            f"unknown quality method {base!r}; valid: {', '.join(table)} (or base[key=value,...])"
        )
    method = table[base]
    if not extra:
        return method
    spec = MethodSpec(name, method.spec.kind, {**method.spec.kwargs, **extra})
    start = method.start_lrs
    if (
        spec.kwargs.get("generator_scale") == "auto"
    ):  # rotations learn ~10x slower per unit of LR: start higher
        start = tuple(lr * 10 / 3 for lr in start)
    return QualityMethod(name, spec, method.tier, tuple(float(f"{lr:.0e}") for lr in start))


def minilm_widths(targets: Sequence[str]) -> list[tuple[int, int]]:
    """``(d_in, d_out)`` of the MiniLM linears ``targets`` select: its config built on the meta device (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(AutoConfig.from_pretrained(minilm_path()))
    return targeted_widths(model, list(targets))


def adapter_params(method: QualityMethod, targets: Sequence[str]) -> int | None:
    """The method's adapter parameters on MiniLM's ``targets`` (heads excluded), counted on instantiated layers."""
    return trainable_params(method.spec, minilm_widths(targets))


# --------------------------------------------------------------------------------------------------------- runs
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


# -------------------------------------------------------------------------------------------------- the planner
def _ladder_neighbour(lr: float, step: int) -> Optional[float]:
    index = min(range(len(LR_LADDER)), key=lambda i: abs(math.log(LR_LADDER[i] / lr)))
    j = index + step
    return LR_LADDER[j] if 0 <= j < len(LR_LADDER) else None


def best_lr(runs: Iterable[dict[str, Any]], *, seed: int = 0) -> Optional[float]:
    """The learning rate with the best ``seed`` score among ``runs`` (one target set, task and method)."""
    scored = [(r["score"], r["lr"]) for r in runs if r["seed"] == seed and r.get("score") is not None]
    return max(scored)[1] if scored else None


def next_lrs(runs: Sequence[dict[str, Any]], start: Sequence[float]) -> list[float]:
    """Learning rates still to try on seed 0: the start grid, then one ladder step past an edge that is best.

    An edge is closed when the ladder ends or when the run past it scored worse (diverged runs score None, i.e.
    worst), so the search stops with the best point strictly inside the tried grid whenever the ladder allows.
    """
    tried = {r["lr"] for r in runs if r["seed"] == 0}
    missing = [lr for lr in start if lr not in tried]
    if missing:
        return missing
    best = best_lr(runs)
    if best is None:
        return []
    ordered = sorted(tried)
    if best == ordered[-1]:
        up = _ladder_neighbour(best, +1)
        return [up] if up is not None and up not in tried else []
    if best == ordered[0]:
        down = _ladder_neighbour(best, -1)
        return [down] if down is not None and down not in tried else []
    return []


def lr_is_interior(runs: Sequence[dict[str, Any]]) -> bool:
    """Whether seed 0's best learning rate has a tried neighbour on both sides."""
    tried = sorted({r["lr"] for r in runs if r["seed"] == 0})
    best = best_lr(runs)
    return best is not None and tried[0] < best < tried[-1]


def pending(
    done: Sequence[dict[str, Any]],
    methods: Sequence[QualityMethod],
    tasks: Sequence[str],
    target_sets: Sequence[str],
    seeds: Sequence[int],
    head_lr: Optional[float] = None,
) -> list[tuple[RunKey, QualityMethod]]:
    """Runs still needed: every seed-0 learning-rate search first (a whole one-seed picture early), then the
    other seeds of each cell whose search has settled (best LR interior, or the ladder's end reached), at that LR.

    A run counts for every method with its resolved config (its fingerprint), whatever name it ran under: when the
    default changes to a benchmarked variant, ``orthora`` inherits that variant's runs.
    """
    grouped: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in done:
        if r.get("head_lr") != head_lr:  # another protocol's run
            continue
        grouped[(r["target_set"], r["task"], r.get("fingerprint"))].append(r)
    search, repeats = [], []
    for target_set in target_sets:
        for task in tasks:
            for method in methods:
                runs = grouped[(target_set, task, method.fingerprint)]
                key = functools.partial(
                    RunKey, target_set, task, method.name, method.fingerprint, head_lr=head_lr
                )
                lrs = next_lrs(runs, method.start_lrs)
                if lrs:
                    search += [(key(lr, 0), method) for lr in lrs]
                    continue
                lr = best_lr(runs)
                if lr is None:
                    continue
                have = {r["seed"] for r in runs if r["lr"] == lr}
                repeats += [(key(lr, s), method) for s in seeds if s not in have]
    return search + repeats


class Claim:
    """An exclusive lock file next to a run's result, so parallel workers never run the same setting twice.

    A claim whose process is gone (a session that ended) is stale and taken over.
    """

    def __init__(self, path: Path) -> None:
        self.path = path.with_suffix(".claim")

    def acquire(self) -> bool:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if self._stale():
                    self.path.unlink(missing_ok=True)
                    continue
                return False
            with os.fdopen(fd, "w") as handle:
                handle.write(str(os.getpid()))
            return True
        return False

    def _stale(self) -> bool:
        try:
            pid = int(self.path.read_text() or "0")
        except (OSError, ValueError):
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


def run_sweep(
    methods: Sequence[QualityMethod],
    tasks: Sequence[str],
    target_sets: Sequence[str],
    seeds: Sequence[int],
    protocol: Protocol,
    data_dir: Path,
    runs_dir: Path,
    *,
    max_runs: Optional[int] = None,
    poll_s: float = 30.0,
    log=print,
) -> int:
    """Run pending settings until none is left (or ``max_runs``); return how many this process finished."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    finished = 0
    started = time.perf_counter()
    while max_runs is None or finished < max_runs:
        todo = pending(load_runs(runs_dir), methods, tasks, target_sets, seeds, protocol.head_learning_rate)
        if not todo:
            return finished
        for key, method in todo:
            claim = Claim(runs_dir / key.claim_name)
            if key.finished_in(runs_dir) or not claim.acquire():
                continue
            if key.finished_in(runs_dir):  # another worker finished it between our listing and our claim
                claim.release()
                continue
            try:
                try:
                    record = run_one(key, method, protocol, data_dir)
                except Exception as err:  # a diverged or broken setting is a result too: it scores worst
                    record = {
                        **dataclasses.asdict(key),
                        "score": None,
                        "error": f"{type(err).__name__}: {err}",
                        "resolved_adapter": method.resolved_config,
                    }
                write_atomic(runs_dir / key.file_name, record)
            finally:
                claim.release()
            finished += 1
            log(
                f"[{time.perf_counter() - started:7.0f}s] {key.target_set} {key.task} {key.method} lr={key.lr:g} "
                f"seed={key.seed}: score={fmt(record.get('score'), '.4f')} "
                f"forgetting={fmt(record.get('forgetting'), '.1f')} {record.get('error', '')}"
            )
            break
        else:  # everything pending is being run by other workers; their results may open new settings
            time.sleep(poll_s)
    return finished


# ------------------------------------------------------------------------------------------------------ summary
def runs_of(
    runs: Iterable[dict[str, Any]], methods: dict[str, Sequence[QualityMethod]], tasks: Sequence[str]
) -> list[dict[str, Any]]:
    """The runs of ``methods`` (per target set) on ``tasks``, each labelled with the name asked for.

    A run belongs to the method whose resolved config it trained: the shipped default and a variant with the same
    config are one method, shown under the first of their names in ``methods``.
    """
    names: dict[tuple[str, str], str] = {}
    for target_set, listed in methods.items():
        for method in listed:
            names.setdefault((target_set, method.fingerprint), method.name)
    return [
        {**r, "method": names[(r["target_set"], r.get("fingerprint"))]}
        for r in runs
        if r["task"] in tasks and (r["target_set"], r.get("fingerprint")) in names
    ]


def _mean_std(values: Sequence[float]) -> tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(
    runs: Sequence[dict[str, Any]], tasks: Sequence[str], trivial: dict[str, float], reference: str = "lora"
) -> dict[str, dict[str, Any]]:
    """Per target set and method: per-task mean ± std over seeds at the LR chosen on seed 0, failed settings
    (not clearly above the trivial baseline), the GLUE mean over seeds, forgetting, and paired differences
    against ``reference`` (same seeds, same data order)."""
    cells: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        cells[(r["target_set"], r["method"], r["task"])].append(r)
    out: dict[str, dict[str, Any]] = {}
    for target_set, method in sorted({(t, m) for t, m, _ in cells}):
        per_task: dict[str, Any] = {}
        for task in tasks:
            runs_here = cells.get((target_set, method, task), [])
            lr = best_lr(runs_here)
            if lr is None:
                continue
            chosen = [r for r in runs_here if r["lr"] == lr and r.get("score") is not None]
            chosen.sort(key=lambda r: r["seed"])
            scores = [r["score"] for r in chosen]
            mean, std = _mean_std(scores)
            failed = mean is None or mean < trivial.get(task, 0.0) + SANITY_MARGIN
            per_task[task] = {
                "lr": lr,
                "lr_interior": lr_is_interior(runs_here),
                "seeds": [r["seed"] for r in chosen],
                "scores": scores,
                "mean": mean,
                "std": std,
                "metrics": {
                    k: statistics.mean(r["metrics"][k] for r in chosen if k in r["metrics"])
                    for k in TASK_METRICS[task]
                    if any(k in r["metrics"] for r in chosen)
                },
                "forgetting": _mean_std([r["forgetting"] for r in chosen if r.get("forgetting") is not None]),
                "trainable_params": chosen[0].get("trainable_params") if chosen else None,
                "train_time_s": statistics.median(r["train_time_s"] for r in chosen) if chosen else None,
                "failed": failed,
            }
        glue = [t for t in tasks if t in GLUE_TASKS and t in per_task]
        complete_seeds = sorted(set.intersection(*(set(per_task[t]["seeds"]) for t in glue))) if glue else []
        per_seed = [
            statistics.mean(per_task[t]["scores"][per_task[t]["seeds"].index(s)] for t in glue)
            for s in complete_seeds
        ]
        forgetting = [f for t in glue for f in [per_task[t]["forgetting"][0]] if f is not None]
        out.setdefault(target_set, {})[method] = {
            "tasks": per_task,
            "glue_tasks": glue,
            "glue_complete": len(glue) == len([t for t in tasks if t in GLUE_TASKS]),
            "glue_failed": [t for t in glue if per_task[t]["failed"]],
            "glue_mean_per_seed": dict(zip(complete_seeds, per_seed, strict=True)),
            "glue_mean": _mean_std(per_seed)
            if not any(per_task[t]["failed"] for t in glue)
            else (None, None),
            "forgetting_mean": statistics.mean(forgetting) if forgetting else None,
        }
    for methods in out.values():
        # the tasks every method of this target set passed: the only fair ground for one ranking across methods
        shared = [
            t
            for t in tasks
            if t in GLUE_TASKS
            and all(t in m["tasks"] and not m["tasks"][t]["failed"] for m in methods.values())
        ]
        for summary in methods.values():
            summary["shared_tasks"] = shared
            summary["shared_mean"] = (
                statistics.mean(summary["tasks"][t]["mean"] for t in shared) if shared else None
            )
            forgot = [summary["tasks"][t]["forgetting"][0] for t in shared]
            summary["shared_forgetting"] = statistics.mean(forgot) if forgot and None not in forgot else None
        if reference in methods:
            for summary in methods.values():
                summary["paired_vs_" + reference] = paired_differences(summary, methods[reference], tasks)
    return out


def paired_differences(a: dict[str, Any], b: dict[str, Any], tasks: Sequence[str]) -> dict[str, Any]:
    """Per task, ``a - b`` on the seeds both ran (same seed = same data order and head initialisation): the mean
    difference, its standard deviation, and a paired t-test's p-value when there are at least 3 pairs."""
    from scipy.stats import ttest_rel

    result = {}
    for task in tasks:
        ta, tb = a["tasks"].get(task), b["tasks"].get(task)
        if not ta or not tb:
            continue
        common = sorted(set(ta["seeds"]) & set(tb["seeds"]))
        if not common:
            continue
        xa = [ta["scores"][ta["seeds"].index(s)] for s in common]
        xb = [tb["scores"][tb["seeds"].index(s)] for s in common]
        diffs = [x - y for x, y in zip(xa, xb, strict=True)]
        mean, std = _mean_std(diffs)
        p = float(ttest_rel(xa, xb).pvalue) if len(common) >= 3 and std and std > 0 else None
        result[task] = {"n": len(common), "mean": mean, "std": std, "p": p}
    return result


def _pm(mean: Optional[float], std: Optional[float], scale: float = 100.0, digits: int = 1) -> str:
    if mean is None:
        return "–"
    if std is None:
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def quality_markdown(
    summary: dict[str, dict[str, Any]], tasks: Sequence[str], trivial: dict[str, float]
) -> str:
    """One table per target set: scores ×100 as mean ± std over seeds (LR chosen on seed 0; † = LR at the grid's
    edge; ✗ = not clearly above the trivial baseline), GLUE mean, zero-shot STS-B forgetting, params."""
    lines = []
    for target_set, methods in summary.items():
        lines += [
            f"#### Targets `{target_set}`: {', '.join(TARGET_SETS.get(target_set, []))}",
            "",
            "| method | trainable params (with head) | "
            + " | ".join(f"{t} ({'/'.join(TASK_METRICS[t])})" for t in tasks)
            + " | GLUE mean | mean over tasks all passed | STS-B forgetting, same tasks |",
            "|" + "---|" * (len(tasks) + 5),
            "| trivial baseline | 0 | "
            + " | ".join(f"{trivial.get(t, 0.0) * 100:.1f}" for t in tasks)
            + f" | {statistics.mean(trivial.get(t, 0.0) for t in tasks if t in GLUE_TASKS) * 100:.1f} | | 0 |",
        ]
        for method, s in methods.items():
            cells, params = [], None
            for t in tasks:
                d = s["tasks"].get(t)
                if not d:
                    cells.append("–")
                    continue
                params = params or d["trainable_params"]
                mark = ("" if d["lr_interior"] else " †") + (" ✗" if d["failed"] else "")
                spread = d["std"] if len(d["scores"]) > 1 else None
                forgot = fmt(d["forgetting"][0], ".1f")
                cells.append(
                    f"{_pm(d['mean'], spread)} (forgot {forgot}; lr {d['lr']:g}, n={len(d['scores'])}){mark}"
                )
            gm, gs = s["glue_mean"]
            if s["glue_failed"]:
                glue = "failed: " + ", ".join(s["glue_failed"])
            else:
                glue = (
                    _pm(gm, gs if len(s["glue_mean_per_seed"]) > 1 else None)
                    if s["glue_complete"]
                    else "incomplete"
                )
            shared = _pm(s["shared_mean"], None) if s["shared_mean"] is not None else "–"
            forget = fmt(s["shared_forgetting"], ".1f")
            lines.append(
                f"| {method} | {'–' if params is None else format(params, ',')} | "
                + " | ".join(cells)
                + f" | {glue} | {shared} | {forget} |"
            )
        lines.append("")
    return "\n".join(lines)


def head_rate_markdown(runs: Sequence[dict[str, Any]], head_lr: float) -> str:
    """Pairs of runs that differ only in the head's learning rate (its adapter LR vs ``head_lr``), same seed:
    how much of a method's task score and forgetting is the head's rate rather than the method."""
    by_key = {
        (
            r["target_set"],
            r["task"],
            r["method"],
            r.get("fingerprint"),
            r["lr"],
            r["seed"],
            r.get("head_lr"),
        ): r
        for r in runs
        if r.get("score") is not None
    }
    rows = []
    for (target_set, task, method, fp, lr, seed, head), fast in sorted(by_key.items(), key=str):
        if head != head_lr:
            continue
        same = by_key.get((target_set, task, method, fp, lr, seed, None))
        if same is None:
            continue
        rows.append(
            f"| {task} | {method} | {lr:g} | {seed} | {same['score'] * 100:.1f} / {same['forgetting']:.1f} | "
            f"{fast['score'] * 100:.1f} / {fast['forgetting']:.1f} |"
        )
    if not rows:
        return ""
    return "\n".join(
        [
            f"#### The head's learning rate: at the adapter's LR vs at {head_lr:g} (score x100 / STS-B points forgotten)",
            "",
            f"| task | method | adapter LR | seed | head at the adapter's LR | head at {head_lr:g} |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )


def learn_forget_plot(summary: dict[str, dict[str, Any]], path: Path) -> Path:
    """Learned (mean score over the tasks every method passed) against forgotten (zero-shot STS-B drop on those same
    tasks), one point per method and a panel per target set, so every point is measured on the same tasks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summary), figsize=(7 * len(summary), 4.8), squeeze=False)
    for ax, (target_set, methods) in zip(axes[0], summary.items(), strict=True):
        shared = next(iter(methods.values()))["shared_tasks"] if methods else []
        for method, s in methods.items():
            if s["shared_mean"] is None or s["shared_forgetting"] is None:
                continue
            ax.plot(s["shared_forgetting"], s["shared_mean"] * 100, "o", markersize=8, label=method)
        ax.set_xlabel("zero-shot STS-B drop, points (lower = forgot less)")
        ax.set_ylabel("mean task score x100 (higher = learned more)")
        ax.set_title(f"targets {target_set}; tasks: {', '.join(shared) or 'none shared'}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def tradeoff_plot(runs: Sequence[dict[str, Any]], tasks: Sequence[str], path: Path) -> Path:
    """Score against forgetting for every learning rate tried on seed 0, one line per method and a panel per task.

    A method's point at its best LR says little on its own, because a lower LR forgets less and learns less for
    every method; the curves show the whole trade-off, so methods are compared at equal forgetting or equal score.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in tasks if any(r["task"] == t for r in runs)]
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(5 * max(len(tasks), 1), 4.4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=False):
        by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in runs:
            if (
                r["task"] == task
                and r["seed"] == 0
                and r.get("score") is not None
                and r.get("forgetting") is not None
            ):
                by_method[r["method"]].append(r)
        for method, points in sorted(by_method.items()):
            points.sort(key=lambda r: r["lr"])
            line = ax.plot(
                [r["forgetting"] for r in points], [r["score"] * 100 for r in points], "o-", label=method
            )
            for r in points:
                ax.annotate(
                    f"{r['lr']:g}", (r["forgetting"], r["score"] * 100), fontsize=6, color=line[0].get_color()
                )
        scores = [r["score"] * 100 for points in by_method.values() for r in points]
        if (
            scores
        ):  # a diverged run would squash the curves that matter: keep 10 points below the best in view
            floor = max(min(scores), max(scores) - 10)
            ax.set_ylim(floor - 0.5, max(scores) + 1)
            below = [
                f"{m} lr {r['lr']:g}: {r['score'] * 100:.1f}"
                for m, points in sorted(by_method.items())
                for r in points
                if r["score"] * 100 < floor - 0.5
            ]
            if below:
                ax.text(
                    0.02,
                    0.98,
                    "below the panel: " + "; ".join(below),
                    transform=ax.transAxes,
                    fontsize=6,
                    va="top",
                )
        ax.set_title(task)
        ax.set_xlabel("zero-shot STS-B drop, points")
        ax.set_ylabel("score x100 (seed 0)")
        ax.grid(alpha=0.3)
    if tasks:
        axes[0][0].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--profile quality`` options (see docs/benchmarks.md)."""
    group = parser.add_argument_group("quality profile")
    group.add_argument("--tasks", default=",".join(GLUE_TASKS + QA_TASKS))
    group.add_argument(
        "--quality-methods",
        default="lora,oft,orthora",
        help="comma-separated table methods, or variants like 'orthora[side=output]'",
    )
    group.add_argument("--target-sets", default="encoder", help=f"comma-separated: {', '.join(TARGET_SETS)}")
    group.add_argument("--seeds", default="0,1,2")
    group.add_argument("--train-samples", type=int, default=Protocol.train_samples)
    group.add_argument("--eval-samples", type=int, default=None, help="cap on GLUE dev rows (default: full)")
    group.add_argument("--squad-train-samples", type=int, default=Protocol.squad_train_samples)
    group.add_argument("--squad-eval-samples", type=int, default=Protocol.squad_eval_samples)
    group.add_argument("--epochs", type=int, default=Protocol.epochs)
    group.add_argument(
        "--head-lr",
        type=float,
        default=None,
        help="one learning rate for every method's task head (default: the head trains at each run's LR)",
    )
    group.add_argument("--sts-pairs", type=int, default=None, help="cap on STS-B pairs for forgetting")
    group.add_argument("--model", default=None, help="model path (default: all-MiniLM-L6-v2)")
    group.add_argument("--data-dir", default=str(default_data_dir()), help=f"default: ${DATA_DIR_ENV}")
    group.add_argument("--runs-dir", default=str(RUNS_DIR), help="one JSON per finished run")
    group.add_argument("--max-runs", type=int, default=None, help="stop this process after N runs")
    group.add_argument("--render", action="store_true", help="only summarise the finished runs in --runs-dir")
    group.add_argument(
        "--plot",
        default=None,
        help="also draw the learn-vs-forget plot to this PNG (and every LR's trade-off to <name>_tradeoff.png)",
    )


def _split(text: str) -> list[str]:
    return [item.strip() for item in _split_top_level(text) if item.strip()]


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets, so 'orthora[side=both,block_size=16],lora' is two methods."""
    parts, depth, current = [], 0, []
    for char in text:
        depth += char == "["
        depth -= char == "]"
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def run_profile(args: argparse.Namespace, command: str) -> tuple[dict, str, str]:
    """Run (or with ``--render`` only summarise) the sweep; return (report, markdown, file tag)."""
    tasks = _split(args.tasks)
    unknown = [t for t in tasks if t not in TASK_METRICS]
    target_sets = _split(args.target_sets)
    unknown_sets = [t for t in target_sets if t not in TARGET_SETS]
    if unknown or unknown_sets:
        raise SystemExit(
            f"unknown task(s) {unknown or ''} / target set(s) {unknown_sets or ''}; "
            f"valid tasks: {', '.join(TASK_METRICS)}; target sets: {', '.join(TARGET_SETS)}"
        )
    data_dir = Path(args.data_dir)
    if not (data_dir / "glue").is_dir():
        raise SystemExit(f"--data-dir {data_dir} has no glue/ folder (the shared GLUE/SQuAD data)")
    protocol = Protocol(
        train_samples=args.train_samples,
        epochs=args.epochs,
        eval_samples=args.eval_samples,
        squad_train_samples=args.squad_train_samples,
        squad_eval_samples=args.squad_eval_samples,
        sts_pairs=args.sts_pairs,
        model=args.model,
        head_learning_rate=args.head_lr,
    )
    runs_dir = Path(args.runs_dir)
    seeds = [int(s) for s in _split(args.seeds)]
    names = _split(args.quality_methods)
    methods = {ts: [resolve_method(n, TARGET_SETS[ts]) for n in names] for ts in target_sets}
    if not args.render:
        for target_set in target_sets:
            run_sweep(
                methods[target_set],
                tasks,
                [target_set],
                seeds,
                protocol,
                data_dir,
                runs_dir,
                max_runs=args.max_runs,
            )
    # these methods' runs on these tasks under any head rate (the head-rate table pairs them), then this protocol's
    every_head = runs_of(load_runs(runs_dir), methods, tasks)
    runs = [r for r in every_head if r.get("head_lr") == protocol.head_learning_rate]
    if not runs:
        raise SystemExit(
            f"no finished runs in {runs_dir} for tasks {', '.join(tasks)}, methods {', '.join(names)} and target "
            f"set(s) {', '.join(target_sets)} (head LR {protocol.head_learning_rate}); nothing to summarise"
        )
    trivial = {t: trivial_score(t, data_dir, args.eval_samples) for t in tasks}
    summary = summarize(runs, tasks, trivial)
    markdown = quality_markdown(summary, tasks, trivial)
    if (
        protocol.head_learning_rate is not None
    ):  # the same settings with the head at each run's LR, where both ran
        markdown += "\n" + head_rate_markdown(every_head, protocol.head_learning_rate)
    if args.plot:
        learn_forget_plot(summary, Path(args.plot))
        tradeoff_plot(runs, tasks, Path(args.plot).with_name(Path(args.plot).stem + "_tradeoff.png"))
    report = {
        "profile": "quality",
        "command": command,
        "machine": machine_info(),
        "protocol": dataclasses.asdict(protocol),
        "tasks": tasks,
        "target_sets": target_sets,
        "methods": names,
        "trivial": trivial,
        "runs": len(runs),
        "summary": summary,
    }
    return report, f"{markdown}\nCommand: `{command}`\n", "quality"
