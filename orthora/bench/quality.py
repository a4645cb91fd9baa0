"""The quality sweep: every method fine-tunes all-MiniLM-L6-v2 under one protocol, and what it forgot is measured.

Protocol (docs/benchmarks.md): GLUE SST-2, MRPC, STS-B, CoLA and RTE with ``--train-samples`` rows each (all rows
where a set is smaller) and full dev sets, SQuAD v1.1 with its own sample sizes; the same epochs, batch, warmup,
seeds and data order for every method; trainable parameters matched to PEFT LoRA r=8 on the same targets (and one
half-budget tier). Each method gets its own learning-rate grid, chosen on seed 0 per task and extended until the best
point lies inside it; the other seeds then run at that learning rate. After each run the adapted encoder's zero-shot
STS-B score is taken (:mod:`orthora.bench.forgetting`), so every task score comes with what the method forgot.

Every run writes one JSON file when it finishes (atomically), named by its settings, so a sweep cut short loses at
most the run in flight, several worker processes can share a sweep (``--shard``-free: each claims the next pending
run with an exclusive lock file), and runs from several sessions combine by just being in the same folder
(``--merge-runs`` joins another machine's folder, keeping a second run of a finished setting apart as its twin).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from orthora.train.data import DATA_DIR_ENV, default_data_dir

from .quality_methods import resolve_method
from .quality_plan import run_sweep
from .quality_report import (
    PAIRED_KINDS,
    head_rate_markdown,
    learn_forget_plot,
    paired_markdown,
    provenance_markdown,
    quality_markdown,
    runs_of,
    summarize,
    tradeoff_plot,
    twins_markdown,
)
from .quality_runs import (
    GLUE_TASKS,
    QA_TASKS,
    RUNS_DIR,
    TARGET_SETS,
    TASK_METRICS,
    Protocol,
    load_runs,
    merge_runs,
    trivial_score,
)
from .report import machine_info


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
    group.add_argument(
        "--merge-runs",
        default=None,
        metavar="DIR",
        help="bring another machine's finished runs into --runs-dir (a setting finished in both goes to "
        "--twins-dir), then summarise; runs nothing",
    )
    group.add_argument(
        "--twins-dir",
        default=None,
        help="second runs of settings already in --runs-dir (default: <runs-dir>-twins)",
    )
    group.add_argument("--max-runs", type=int, default=None, help="stop this process after N runs")
    group.add_argument(
        "--no-wait",
        action="store_true",
        help="return when every pending run is claimed by another worker, instead of waiting for their results",
    )
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
    twins_dir = Path(args.twins_dir) if args.twins_dir else runs_dir.with_name(runs_dir.name + "-twins")
    if args.merge_runs:
        try:
            done = merge_runs(Path(args.merge_runs), runs_dir, twins_dir)
        except ValueError as err:  # a file that is not a finished run: one line, and nothing was written
            raise SystemExit(str(err)) from None
        print(
            f"merged {args.merge_runs}: {len(done['added'])} runs added, {len(done['twins'])} twins of finished "
            f"settings kept in {twins_dir}, {len(done['unchanged'])} already there"
        )
    seeds = [int(s) for s in _split(args.seeds)]
    names = _split(args.quality_methods)
    methods = {ts: [resolve_method(n, TARGET_SETS[ts]) for n in names] for ts in target_sets}
    if not (args.render or args.merge_runs):
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
                wait=not args.no_wait,
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
    twins = runs_of(load_runs(twins_dir), methods, tasks) if twins_dir.is_dir() else []  # pairs by setting
    summary = summarize(runs, tasks, trivial)
    parts = [
        quality_markdown(summary, tasks, trivial),
        *(paired_markdown(summary, tasks, kind) for kind in PAIRED_KINDS),
        provenance_markdown(runs) + "\n",
        twins_markdown(runs, twins),
    ]
    markdown = "\n".join(part for part in parts if part)
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
