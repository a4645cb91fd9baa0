"""The quality sweep: GLUE and SQuAD fine-tuning of all-MiniLM-L6-v2 through `orthora.train`, every method alike.

Per (task, method) the LR with the best seed-mean dev score is reported, with the GLUE mean, its per-seed spread and
each method's real training time relative to LoRA's in the same setting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Optional

from .budgets import matched_methods, targeted_widths
from .models import BERT_TARGETS, minilm_path
from .report import REPO, fmt, machine_info

GLUE_TASKS = ("sst2", "mrpc", "stsb", "rte", "cola")
#: official metric(s) per task; the first is the one averaged into the GLUE mean (MRPC/STS-B: mean of the two)
TASK_METRICS = {
    "sst2": ("accuracy",),
    "rte": ("accuracy",),
    "cola": ("matthews_correlation",),
    "mrpc": ("f1", "accuracy"),
    "stsb": ("pearson", "spearmanr"),
    "squad": ("exact_match", "f1"),
}
DEFAULT_LR_GRID = (1e-3, 3e-3)
#: ``--quality-targets``: every attention/MLP linear (the cost profiles' setting), or PEFT's BERT default q/v
QUALITY_TARGETS = {"all": BERT_TARGETS, "qv": ["query", "value"]}


def quality_methods(names: list[str], targets: list[str]) -> dict[str, tuple[str, dict]]:
    """(train-engine method, adapter kwargs) per quality method, at the cost profile's matched budgets."""
    table = {
        "orthora": ("orthora", dict(block_size=32, parametrization="cayley", side="output")),
        "orthora-input": ("orthora", dict(block_size=32, parametrization="cayley", side="input")),
        "lora": ("lora", dict(r=8, lora_alpha=16, lora_dropout=0.0)),
        "oft": ("oft", dict(r=0, oft_block_size=32, use_cayley_neumann=True)),
        "oft-cayley": ("oft", dict(r=0, oft_block_size=32, use_cayley_neumann=False)),
        "hra": ("hra", dict(r=16)),
    }
    out = {}
    for n in names:
        if n == "boft":  # the cost profile's rule, on MiniLM's real layer shapes
            spec = next(m for m in matched_methods(minilm_widths(targets), 32, "all") if m.kind == "boft")
            table["boft"] = ("boft", dict(spec.kwargs))
        method, kw = table[n]
        out[n] = (method, {**kw, "target_modules": list(targets)})
    return out


def minilm_widths(targets: list[str]) -> list[tuple[int, int]]:
    """``(d_in, d_out)`` of the MiniLM linears ``targets`` select: its config built on the meta device (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(AutoConfig.from_pretrained(minilm_path()))
    return targeted_widths(model, targets)


def task_score(task: str, metrics: dict) -> Optional[float]:
    """The number averaged into the mean: the official metric (mean of the pair for MRPC, STS-B and SQuAD)."""
    keys = TASK_METRICS[task]
    vals = [metrics.get(k) for k in (keys if task in ("mrpc", "stsb", "squad") else keys[:1])]
    if any(v is None for v in vals):
        return None
    scale = 0.01 if task == "squad" else 1.0  # SQuAD metrics are in percent
    return statistics.mean(float(v) * scale for v in vals)


def run_one_quality(
    task: str, method: str, adapter: dict, lr: float, seed: int, args: argparse.Namespace, out_dir: str
) -> dict:
    """One fine-tuning run through the training engine (orthora.train), returning its final dev metrics."""
    from orthora.train import TrainConfig, run

    data = Path(args.data_dir)
    common = dict(
        model_name_or_path=minilm_path(),
        method=method,
        adapter=adapter,
        learning_rate=lr,
        seed=seed,
        num_train_epochs=args.epochs,
        max_train_samples=args.train_samples,
        output_dir=out_dir,
        report_to="none",
        checkpointing_steps=None,
        logging_steps=10**6,
        warmup_ratio=0.06,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
    )
    if task == "squad":
        cfg = TrainConfig(
            task="qa",
            train_file=str(data / "squad" / "train.jsonl"),
            validation_file=str(data / "squad" / "validation.jsonl"),
            max_seq_length=256,
            max_eval_samples=args.squad_eval_samples,
            **common,
        )
    else:
        cfg = TrainConfig(
            task="glue",
            task_name=task,
            train_file=str(data / "glue" / task / "train.jsonl"),
            validation_file=str(data / "glue" / task / "validation.jsonl"),
            max_seq_length=128,
            max_eval_samples=args.eval_samples,
            **common,
        )
    res = run(cfg)
    metrics = res["metrics"]
    split = next((k for k, v in metrics.items() if isinstance(v, dict)), None)
    final = metrics[split] if split else {}
    return {
        "metrics": {k: v for k, v in final.items() if isinstance(v, (int, float))},
        "trainable_params": res.get("trainable_params"),
        "train_time_s": res.get("train_time_s"),
    }


def run_quality(args: argparse.Namespace, log=print) -> dict:
    """Every task x method x LR x seed; per (task, method) the LR with the best seed-mean dev score is reported."""
    import tempfile as _tf

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    names = [m.strip() for m in args.quality_methods.split(",") if m.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else list(DEFAULT_LR_GRID)
    targets = QUALITY_TARGETS[args.quality_targets]
    methods = quality_methods(names, targets)
    partial = None if args.no_write else Path(args.out_dir) / "quality-partial.json"
    runs = []
    machine = machine_info()
    started = time.perf_counter()
    for task in tasks:
        for lr in lrs:
            for seed in seeds:
                for name, (method, adapter) in methods.items():  # methods innermost: drift hits all alike
                    with _tf.TemporaryDirectory() as tmp:
                        t0 = time.perf_counter()
                        try:
                            r = run_one_quality(task, method, adapter, lr, seed, args, tmp)
                            r["score"] = task_score(task, r["metrics"])
                        except Exception as exc:  # recorded, the sweep goes on
                            r = {"error": f"{type(exc).__name__}: {exc}", "score": None, "metrics": {}}
                    row_name = name if args.quality_targets == "all" else f"{name}-{args.quality_targets}"
                    r.update(task=task, method=row_name, lr=lr, seed=seed, wall_s=time.perf_counter() - t0)
                    runs.append(r)
                    if partial is not None:  # a sweep cut short still leaves every finished run on disk
                        partial.write_text(json.dumps({"args": vars(args), "runs": runs}, default=str))
                    log(
                        f"  [{time.perf_counter() - started:6.0f}s] {task} {name} lr={lr:g} seed={seed}: "
                        f"score={fmt(r['score'], '.4f')} {r.get('error', '')}"
                    )
    if partial is not None and partial.exists():  # complete: the final JSON supersedes it
        partial.unlink()
    return {
        "profile": "quality",
        "machine": machine,
        "tasks": tasks,
        "methods": {n: m for n, m in methods.items()},
        "lrs": lrs,
        "seeds": seeds,
        "targets": targets,
        "train_samples": args.train_samples,
        "epochs": args.epochs,
        "eval_samples": args.eval_samples,
        "squad_eval_samples": args.squad_eval_samples,
        "runs": runs,
        "summary": summarize_quality(runs, tasks, list(dict.fromkeys(r["method"] for r in runs))),
    }


def select_runs(runs: list[dict], *, lrs: str = "", seeds: str = "") -> list[dict]:
    """Saved runs restricted to the ``--lrs`` / ``--seeds`` given (empty: all); a repeated setting is an error."""
    keep_lrs = {float(x) for x in lrs.split(",") if x.strip()}
    keep_seeds = {int(x) for x in seeds.split(",") if x.strip()}
    seen, out = set(), []
    for r in runs:
        if (keep_lrs and r["lr"] not in keep_lrs) or (keep_seeds and r["seed"] not in keep_seeds):
            continue
        key = (r["task"], r["method"], r["lr"], r["seed"])
        if key in seen:
            raise SystemExit(f"run {key} appears twice in the saved files")
        seen.add(key)
        out.append(r)
    return out


def summarize_quality(runs: list[dict], tasks: list[str], methods: list[str]) -> dict:
    """Per (method, task): best LR by seed-mean score, its mean, min-max spread and metrics; and the GLUE mean."""
    out: dict[str, dict] = {}
    for m in methods:
        per_task = {}
        for t in tasks:
            by_lr: dict[float, list[dict]] = {}
            for r in runs:
                if r["method"] == m and r["task"] == t and r["score"] is not None:
                    by_lr.setdefault(r["lr"], []).append(r)
            if not by_lr:
                per_task[t] = None
                continue
            lr, rs = max(by_lr.items(), key=lambda kv: statistics.mean(x["score"] for x in kv[1]))
            scores = [x["score"] for x in rs]
            metric_means = {
                k: statistics.mean(x["metrics"][k] for x in rs if k in x["metrics"])
                for k in TASK_METRICS[t]
                if any(k in x["metrics"] for x in rs)
            }
            per_task[t] = {
                "lr": lr,
                "score": statistics.mean(scores),
                "min": min(scores),
                "max": max(scores),
                "n": len(scores),
                "metrics": metric_means,
                "trainable_params": rs[0].get("trainable_params"),
            }
        glue = [per_task[t]["score"] for t in tasks if t in GLUE_TASKS and per_task.get(t)]
        # spread of the GLUE mean over seeds, at each task's chosen LR
        seed_means = {}
        for t in tasks:
            if t in GLUE_TASKS and per_task.get(t):
                for r in runs:
                    if (
                        r["method"] == m
                        and r["task"] == t
                        and r["lr"] == per_task[t]["lr"]
                        and r["score"] is not None
                    ):
                        seed_means.setdefault(r["seed"], []).append(r["score"])
        complete = [statistics.mean(v) for v in seed_means.values() if len(v) == len(glue)]
        out[m] = {
            "tasks": per_task,
            "glue_mean": statistics.mean(glue) if glue else None,
            "glue_mean_per_seed": complete,
            "train_time_vs_lora": _train_time_vs_lora(runs, m),
        }
    return out


def _train_time_vs_lora(runs: list[dict], method: str) -> Optional[float]:
    """Median over (task, LR, seed) of this method's training time / LoRA's in the same setting (real training).

    Only runs of the same sweep are paired (methods are interleaved there, so machine load hits both alike)."""

    def key(r: dict) -> tuple:
        return r["task"], r["lr"], r["seed"], r.get("source")

    lora = {key(r): r.get("train_time_s") for r in runs if r["method"] == "lora"}
    ratios = [
        r["train_time_s"] / lora[key(r)]
        for r in runs
        if r["method"] == method and r.get("train_time_s") and lora.get(key(r))
    ]
    return statistics.median(ratios) if ratios else None


def quality_table(report: dict) -> str:
    """Markdown: one row per method, official metric(s) per task (best LR, mean over seeds), GLUE mean."""
    tasks = report["tasks"]
    heads = []
    for t in tasks:
        heads.append(f"{t} ({'/'.join(TASK_METRICS[t])})")
    lines = [
        "| method | trainable params | " + " | ".join(heads) + " | GLUE mean (per-seed range) "
        "| train time × LoRA |",
        "|" + "---|" * (len(tasks) + 4),
    ]
    for m, s in report["summary"].items():
        cells, params = [], None
        for t in tasks:
            d = s["tasks"].get(t)
            if not d:
                cells.append("–")
                continue
            params = params or d.get("trainable_params")
            vals = "/".join(f"{d['metrics'][k]:.3f}" for k in TASK_METRICS[t] if k in d["metrics"])
            cells.append(f"{vals} (lr {d['lr']:g}, ±{(d['max'] - d['min']) / 2:.3f})")
        per_seed = s["glue_mean_per_seed"]
        rng = f" ({min(per_seed):.3f}–{max(per_seed):.3f})" if len(per_seed) > 1 else ""
        gm = "–" if s["glue_mean"] is None else f"{s['glue_mean']:.4f}{rng}"
        ratio = fmt(s.get("train_time_vs_lora"), ".2f")
        lines.append(
            f"| {m} | {params if params is None else format(params, ',')} | "
            + " | ".join(cells)
            + f" | {gm} | {ratio} |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--profile quality`` options."""
    parser.add_argument("--tasks", default="sst2,mrpc,stsb,rte,cola,squad")
    parser.add_argument("--quality-methods", default="orthora,lora,oft")
    parser.add_argument(
        "--quality-targets",
        choices=sorted(QUALITY_TARGETS),
        default="all",
        help="quality: all attention/MLP linears, or query/value only (every method alike)",
    )
    parser.add_argument("--train-samples", type=int, default=500)
    parser.add_argument("--eval-samples", type=int, default=None, help="cap on GLUE dev rows (default: full)")
    parser.add_argument("--squad-eval-samples", type=int, default=1000, help="cap on SQuAD dev questions")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--lrs", default="", help="comma-separated LR grid, the same for every method")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument(
        "--render-partial",
        nargs="+",
        default=None,
        metavar="JSON",
        help="quality: render the table from saved runs (partial or finished JSON files; several "
        "files, e.g. task groups run in parallel processes, are merged; --lrs and --seeds select runs)",
    )


def render_partial(args: argparse.Namespace) -> dict:
    """The report of saved runs: a cut-short sweep, or task groups run in parallel (``--render-partial``)."""
    runs, settings = [], {}
    for path in args.render_partial:
        saved = json.loads(Path(path).read_text())
        runs.extend({**r, "source": str(path)} for r in saved["runs"])  # times pair within one sweep
        source = saved.get("args", saved)  # partial files keep the CLI args, finished reports the fields
        for key in ("train_samples", "epochs", "eval_samples", "squad_eval_samples"):
            if settings.setdefault(key, source.get(key)) != source.get(key):
                raise SystemExit(f"{path}: {key}={source.get(key)} differs from the other files")
    for key, value in settings.items():
        setattr(args, key, value)
    runs = select_runs(runs, lrs=args.lrs, seeds=args.seeds)
    tasks = list(dict.fromkeys(r["task"] for r in runs))
    names = list(dict.fromkeys(r["method"] for r in runs))
    return {
        "profile": "quality",
        "machine": machine_info(),
        "tasks": tasks,
        "runs": runs,
        "lrs": sorted({r["lr"] for r in runs}),
        "seeds": sorted({r["seed"] for r in runs}),
        "sources": list(args.render_partial),
        "summary": summarize_quality(runs, tasks, names),
    }


def run_profile(args: argparse.Namespace, command: str) -> tuple[dict, str, str]:
    """``--profile quality``: (report, markdown, file tag)."""
    report = render_partial(args) if args.render_partial else run_quality(args)
    report["command"] = command
    m = report["machine"]
    md = "\n".join(
        [
            f"## quality: all-MiniLM-L6-v2, {args.train_samples} train rows/task, {args.epochs} epochs, "
            f"LR grid {report['lrs']}, seeds {report['seeds']} (method suffix -qv: query/value targets only, "
            "otherwise all 36 attention/MLP linears)",
            f"`{command}` — {m['date']}, {m['cpu_model']} ({m['host_cores']} cores), torch {m['torch']}, "
            f"peft {m['peft']}, commit {m.get('git_commit', '?')}",
            f"Dev sets: GLUE {'full' if args.eval_samples is None else f'first {args.eval_samples} rows'}; "
            f"SQuAD first {args.squad_eval_samples} questions. Cells: official metric(s), mean over seeds at the "
            "best LR (± half the min-max range of the task score); SQuAD EM/F1 in percent.",
            "",
            quality_table(report),
        ]
    )
    return report, md, "quality"
