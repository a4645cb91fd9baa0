"""The quality sweep's planner and worker loop: which runs are still needed, and running them one claim at a time.

Each method's learning rate is searched on seed 0 along `LR_LADDER` until the best point lies inside the tried grid
(`next_lrs`, `lr_is_interior`); the other seeds then run at that rate (`pending`). Any number of worker processes
share one runs folder through exclusive lock files (`Claim`), and `run_sweep` writes each result atomically.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

from orthora.train.atomic_files import write_json_atomic

from .quality_methods import QualityMethod
from .quality_runs import Protocol, RunKey, load_runs, run_one
from .report import fmt

#: learning rates a grid may use; each method starts from three neighbours and is extended along this ladder
LR_LADDER = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)


def _ladder_neighbour(lr: float, step: int) -> Optional[float]:
    index = min(range(len(LR_LADDER)), key=lambda i: abs(math.log(LR_LADDER[i] / lr)))
    j = index + step
    return LR_LADDER[j] if 0 <= j < len(LR_LADDER) else None


def _best_and_plateau(runs: Iterable[dict[str, Any]], seed: int) -> tuple[list[float], list[float]]:
    """The rates that share ``seed``'s best score (sorted), and every rate tried at that seed (sorted)."""
    runs = [r for r in runs if r["seed"] == seed]
    scored = [(r["score"], r["lr"]) for r in runs if r.get("score") is not None]
    if not scored:
        return [], sorted(r["lr"] for r in runs)
    top = max(score for score, _ in scored)
    return sorted(lr for score, lr in scored if score == top), sorted(r["lr"] for r in runs)


def best_lr(runs: Iterable[dict[str, Any]], *, seed: int = 0) -> Optional[float]:
    """The learning rate with the best ``seed`` score among ``runs`` (one target set, task and method); among equal
    best scores the smallest rate, the smallest change to the pretrained model."""
    tied, _ = _best_and_plateau(runs, seed)
    return tied[0] if tied else None


def next_lrs(runs: Sequence[dict[str, Any]], start: Sequence[float]) -> list[float]:
    """Learning rates still to try on seed 0: the start grid (its middle first), then one ladder step past an edge
    that is best.

    An edge is closed when the ladder ends or when the run past it scored worse (diverged runs score None, i.e.
    worst), so the search stops with the best point strictly inside the tried grid whenever the ladder allows.
    Equal best scores are a plateau (e.g. every rate predicting the majority class): one that reaches inside the
    grid ends the search, instead of being walked to the ladder's end.
    """
    tried = {r["lr"] for r in runs if r["seed"] == 0}
    middle_out = sorted(range(len(start)), key=lambda i: abs(i - len(start) // 2))
    missing = [start[i] for i in middle_out if start[i] not in tried]
    if missing:
        return missing
    tied, ordered = _best_and_plateau(runs, 0)
    if not tied or _inside(tied, ordered):
        return []
    if tied[0] == ordered[0]:
        down = _ladder_neighbour(tied[0], -1)
        return [down] if down is not None and down not in tried else []
    up = _ladder_neighbour(tied[-1], +1)  # the best is the top edge alone
    return [up] if up is not None and up not in tried else []


def lr_is_interior(runs: Sequence[dict[str, Any]]) -> bool:
    """Whether seed 0's best learning rate (or one that ties with it) has a tried neighbour on both sides."""
    return _inside(*_best_and_plateau(runs, 0))


def _inside(tied: Sequence[float], tried: Sequence[float]) -> bool:
    return any(tried[0] < lr < tried[-1] for lr in tied)


def pending(
    done: Sequence[dict[str, Any]],
    methods: Sequence[QualityMethod],
    tasks: Sequence[str],
    target_sets: Sequence[str],
    seeds: Sequence[int],
    head_lr: Optional[float] = None,
) -> list[tuple[RunKey, QualityMethod]]:
    """Runs still needed: every seed-0 learning-rate search first, breadth first (a cell with fewer rates tried
    goes first; the start grid's middle first), so a sweep cut short still has one run in every cell; then the
    other seeds of each cell whose search has settled (best LR interior, or the ladder's end reached), at that LR.

    A run counts for every method with its resolved config (its fingerprint), whatever name it ran under: when the
    default changes to a benchmarked variant, ``orthora`` inherits that variant's runs.
    """
    grouped: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in done:
        if r.get("head_lr") != head_lr:  # another protocol's run
            continue
        grouped[(r["target_set"], r["task"], r.get("fingerprint"))].append(r)
    search_rounds: dict[int, list] = defaultdict(list)
    repeats = []
    for target_set in target_sets:
        for task in tasks:
            for method in methods:
                runs = grouped[(target_set, task, method.fingerprint)]
                key = functools.partial(
                    RunKey, target_set, task, method.name, method.fingerprint, head_lr=head_lr
                )
                lrs = next_lrs(runs, method.start_lrs)
                if lrs:
                    tried = len({r["lr"] for r in runs if r["seed"] == 0})
                    for i, lr in enumerate(lrs):  # round = rates this cell has tried before this one
                        search_rounds[tried + i].append((key(lr, 0), method))
                    continue
                lr = best_lr(runs)
                if lr is None:
                    continue
                have = {r["seed"] for r in runs if r["lr"] == lr}
                repeats += [(key(lr, s), method) for s in seeds if s not in have]
    return [run for round_ in sorted(search_rounds) for run in search_rounds[round_]] + repeats


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
    wait: bool = True,
    log=print,
) -> int:
    """Run pending settings until none is left (or ``max_runs``); return how many this process finished.

    When every pending setting is claimed by another worker, wait for their results (they may open new settings),
    or with ``wait=False`` return, so a driver can give this worker another sweep meanwhile.
    """
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
                write_json_atomic(runs_dir / key.file_name, record)
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
            if not wait:
                return finished
            time.sleep(poll_s)
    return finished
