"""The quality sweep's summary and its rendering: per-method tables, the head-rate comparison and the plots.

`summarize` turns finished runs into per-task means over seeds at the LR chosen on seed 0, with the sanity floor,
the GLUE mean, forgetting and paired differences against LoRA; `quality_markdown`, `head_rate_markdown`,
`learn_forget_plot` and `tradeoff_plot` render it.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

from .quality_methods import QualityMethod
from .quality_plan import best_lr, lr_is_interior
from .quality_runs import GLUE_TASKS, QA_TASKS, TARGET_SETS, TASK_METRICS, run_key
from .report import fmt

#: a run must beat the task's trivial baseline (majority class / constant prediction) by this much to count
SANITY_MARGIN = 0.02


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


#: the peers every method is paired with, seed by seed (the issue's targets are stated against the better of them)
PAIRED_REFERENCES = ("lora", "oft")
#: what is paired: per kind, the per-task per-seed list, the per-seed GLUE aggregate, and the scale it is shown at
PAIRED_KINDS = {
    "score": ("scores", "glue_mean_per_seed", 100.0),
    "forgetting": ("forgettings", "glue_forgetting_per_seed", 1.0),
}


def summarize(
    runs: Sequence[dict[str, Any]],
    tasks: Sequence[str],
    trivial: dict[str, float],
) -> dict[str, dict[str, Any]]:
    """Per target set and method: per-task mean ± std over seeds at the LR chosen on seed 0, failed settings
    (not clearly above the trivial baseline), the GLUE mean over seeds, forgetting, and paired differences
    against each of `PAIRED_REFERENCES` (same seeds, same data order)."""
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
                "forgettings": [r.get("forgetting") for r in chosen],  # per seed, as "scores"
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
        forgetting_per_seed = {}
        for seed in complete_seeds:
            values = [per_task[t]["forgettings"][per_task[t]["seeds"].index(seed)] for t in glue]
            if None not in values:
                forgetting_per_seed[seed] = statistics.mean(values)
        out.setdefault(target_set, {})[method] = {
            "tasks": per_task,
            "glue_tasks": glue,
            "glue_complete": len(glue) == len([t for t in tasks if t in GLUE_TASKS]),
            "glue_failed": [t for t in glue if per_task[t]["failed"]],
            "glue_mean_per_seed": dict(zip(complete_seeds, per_seed, strict=True)),
            "glue_forgetting_per_seed": forgetting_per_seed,
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
        for reference in PAIRED_REFERENCES:
            if reference not in methods:
                continue
            for name, summary in methods.items():
                if name != reference:
                    for kind in PAIRED_KINDS:
                        summary[f"paired_{kind}_vs_{reference}"] = paired_differences(
                            summary, methods[reference], tasks, kind
                        )
    return out


def paired_differences(
    a: dict[str, Any], b: dict[str, Any], tasks: Sequence[str], kind: str = "score"
) -> dict[str, Any]:
    """Per task, ``a - b`` of ``kind`` (score or forgetting) on the seeds both ran (same seed = same data order and
    head initialisation): the mean difference, its standard deviation, and a paired t-test's p-value when there are
    at least 3 pairs; under ``"glue_mean"`` the same for the per-seed mean over the GLUE tasks."""
    per_task, per_seed, _ = PAIRED_KINDS[kind]
    result = {}
    for task in tasks:
        ta, tb = a["tasks"].get(task), b["tasks"].get(task)
        if not ta or not tb:
            continue
        xa = dict(zip(ta["seeds"], ta[per_task], strict=True))
        xb = dict(zip(tb["seeds"], tb[per_task], strict=True))
        common = sorted(s for s in set(xa) & set(xb) if xa[s] is not None and xb[s] is not None)
        if common:
            result[task] = _paired([xa[s] for s in common], [xb[s] for s in common])
    if a["glue_complete"] and b["glue_complete"]:  # the GLUE mean, seed by seed, on the same tasks
        common = sorted(set(a[per_seed]) & set(b[per_seed]))
        if common:
            result["glue_mean"] = _paired([a[per_seed][s] for s in common], [b[per_seed][s] for s in common])
    return result


def _paired(xa: Sequence[float], xb: Sequence[float]) -> dict[str, Any]:
    from scipy.stats import ttest_rel

    mean, std = _mean_std([x - y for x, y in zip(xa, xb, strict=True)])
    p = float(ttest_rel(xa, xb).pvalue) if len(xa) >= 3 and std and std > 0 else None
    return {"n": len(xa), "mean": mean, "std": std, "p": p}


def paired_markdown(summary: dict[str, dict[str, Any]], tasks: Sequence[str], kind: str = "score") -> str:
    """Per target set, each method minus each reference on the seeds both ran: mean ± std of the per-seed
    differences of ``kind`` (score ×100, or STS-B points forgotten), the number of pairs and a paired t-test's p
    where there are 3 or more."""
    scale = PAIRED_KINDS[kind][2]
    what = "score ×100" if kind == "score" else "STS-B points forgotten (negative = forgot less)"
    lines = []
    columns = [*tasks, "glue_mean"] if any(t in GLUE_TASKS for t in tasks) else list(tasks)
    for target_set, methods in summary.items():
        rows = []
        for method, s in methods.items():
            for reference in PAIRED_REFERENCES:
                paired = s.get(f"paired_{kind}_vs_{reference}")
                if not paired or _listed_before(method, reference):  # "oft − lora", not also "lora − oft"
                    continue
                cells = []
                for column in columns:
                    d = paired.get(column)
                    if d is None:
                        cells.append("–")
                        continue
                    p = "" if d["p"] is None else f", p={d['p']:.2f}"
                    spread = d["std"] if d["n"] > 1 else None
                    cells.append(f"{_signed_pm(d['mean'], spread, scale)} (n={d['n']}{p})")
                rows.append(f"| {method} − {reference} | " + " | ".join(cells) + " |")
        if not rows:
            continue
        lines += [
            f"#### Paired differences in {what}, targets `{target_set}` (same seeds, same data order)",
            "",
            "| pair | " + " | ".join("GLUE mean" if c == "glue_mean" else c for c in columns) + " |",
            "|" + "---|" * (len(columns) + 1),
            *rows,
            "",
        ]
    return "\n".join(lines)


def _listed_before(method: str, reference: str) -> bool:
    refs = PAIRED_REFERENCES
    return method in refs and refs.index(method) < refs.index(reference)


def _signed_pm(mean: float, std: Optional[float], scale: float) -> str:
    return f"{mean * scale:+.1f}" + ("" if std is None else f" ± {std * scale:.1f}")


def _pm(mean: Optional[float], std: Optional[float], scale: float = 100.0, digits: int = 1) -> str:
    if mean is None:
        return "–"
    if std is None:
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def _parts(task: str, metrics: dict[str, float]) -> str:
    """SQuAD's score is the mean of EM and F1 (percentages); its cell also shows each, since targets name F1."""
    if task not in QA_TASKS:
        return ""
    return " [" + ", ".join(f"{name} {value:.1f}" for name, value in metrics.items()) + "]"


def quality_markdown(
    summary: dict[str, dict[str, Any]], tasks: Sequence[str], trivial: dict[str, float]
) -> str:
    """One table per target set: scores ×100 as mean ± std over seeds (LR chosen on seed 0; † = LR at the grid's
    edge; ✗ = not clearly above the trivial baseline), GLUE mean, zero-shot STS-B forgetting, params."""
    lines = []
    glue_tasks = [t for t in tasks if t in GLUE_TASKS]
    # the GLUE aggregates only where there are GLUE tasks (a SQuAD-only table has none)
    aggregates = (
        " | GLUE mean | mean over tasks all passed | STS-B forgetting, same tasks" if glue_tasks else ""
    )
    trivial_glue = (
        f" | {_pm(statistics.mean(trivial.get(t, 0.0) for t in glue_tasks), None)} | | 0"
        if glue_tasks
        else ""
    )
    for target_set, methods in summary.items():
        header = (
            "| method | trainable params (with head) | "
            + " | ".join(f"{t} ({'/'.join(TASK_METRICS[t])})" for t in tasks)
            + aggregates
            + " |"
        )
        lines += [
            f"#### Targets `{target_set}`: {', '.join(TARGET_SETS.get(target_set, []))}",
            "",
            header,
            "|" + "---|" * (header.count("|") - 1),  # one per column of the header, however many it has
            "| trivial baseline | 0 | "
            + " | ".join(f"{trivial.get(t, 0.0) * 100:.1f}" for t in tasks)
            + trivial_glue
            + " |",
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
                    f"{_pm(d['mean'], spread)}{_parts(t, d['metrics'])} (forgot {forgot}; lr {d['lr']:g}, "
                    f"n={len(d['scores'])}){mark}"
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
                + (f" | {glue} | {shared} | {forget}" if glue_tasks else "")
                + " |"
            )
        lines.append("")
    return "\n".join(lines)


def machine_label(machine: dict[str, Any]) -> str:
    """What a run trained on, from its JSON's ``machine``: the GPU if it had one, the CPU, cores, torch threads."""
    cores, threads = machine.get("host_cores", "?"), machine.get("torch_threads", "?")
    gpu = f"{machine['gpu']} with " if machine.get("gpu") else ""
    return f"{gpu}{machine.get('cpu_model', '?')}, {cores} cores, torch threads {threads}"


def _setting(run: dict[str, Any]) -> str:
    """A run's setting whatever method name it ran under (its claim's name)."""
    return run_key(run).claim_name


def _run_cell(run: dict[str, Any]) -> str:
    metrics = {k: run["metrics"][k] for k in TASK_METRICS[run["task"]] if k in run["metrics"]}
    return (
        f"{run['score'] * 100:.1f}{_parts(run['task'], metrics)} ({machine_label(run.get('machine') or {})})"
    )


def twins_markdown(runs: Sequence[dict[str, Any]], twins: Iterable[dict[str, Any]]) -> str:
    """Settings that finished on two machines (`merge_runs` keeps the second apart): the run in the tables next to
    its twin, so a reader sees how far the machine alone (float order, dropout's generator) moves a score."""
    kept = {_setting(r): r for r in runs}
    rows = []
    for twin in sorted(twins, key=_setting):
        run = kept.get(_setting(twin))
        if run is None or run.get("score") is None or twin.get("score") is None:
            continue
        rows.append(
            f"| {run['target_set']} {run['task']} {run['method']} lr {run['lr']:g} seed {run['seed']} "
            f"| {_run_cell(run)} | {_run_cell(twin)} | {(twin['score'] - run['score']) * 100:+.1f} "
            f"| {run['forgetting']:.1f} / {twin['forgetting']:.1f} |"
        )
    if not rows:
        return ""
    return (
        "#### The same setting on two machines (the tables use the first)\n\n"
        "| setting | score in the tables | twin | twin − table | STS-B forgotten (table / twin) |\n"
        "|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )


def provenance_markdown(runs: Sequence[dict[str, Any]]) -> str:
    """Where and when the summarised runs ran (each run's JSON records its machine): runs of one sweep span
    sessions and can span machines, so the render's own machine says nothing about them."""
    machines: dict[str, int] = defaultdict(int)
    dates, commits = [], set()
    for r in runs:
        machine = r.get("machine") or {}
        machines[machine_label(machine)] += 1
        if machine.get("date"):
            dates.append(machine["date"])
        if machine.get("git_commit"):
            commits.add(machine["git_commit"])
    where = "; ".join(f"{count} on {name}" for name, count in sorted(machines.items()))
    when = f", finished {min(dates)[:16]} to {max(dates)[:16]} UTC" if dates else ""
    return (
        f"Runs summarised: {len(runs)} ({where}){when}, at {len(commits)} commit{'s' * (len(commits) != 1)}."
    )


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


def plot_label(method: str, summary: dict[str, Any]) -> str:
    """A method's legend entry with the seeds behind its point (the fewest of its shared tasks), so a one-seed point
    is never read as a mean of three."""
    n = min((len(summary["tasks"][t]["seeds"]) for t in summary["shared_tasks"]), default=0)
    return f"{method} ({n} seed{'' if n == 1 else 's'})"


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
            ax.plot(
                s["shared_forgetting"], s["shared_mean"] * 100, "o", markersize=8, label=plot_label(method, s)
            )
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
