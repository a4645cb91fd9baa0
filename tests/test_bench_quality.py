"""The quality sweep (orthora.bench.quality_*): LR-grid search, seeds, sanity floor, paired comparison, forgetting."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from unittest import mock

import pytest
from conftest import synthetic_rows, write_jsonl

from orthora.bench import cli as bench_cli
from orthora.bench import quality
from orthora.bench.budgets import MethodSpec
from orthora.bench.quality_methods import (
    QualityMethod,
    adapter_params,
    method_table,
    parse_method_name,
    resolve_method,
)
from orthora.bench.quality_plan import Claim, best_lr, lr_is_interior, next_lrs, pending, run_sweep
from orthora.bench.quality_report import (
    head_rate_markdown,
    paired_markdown,
    plot_label,
    provenance_markdown,
    quality_markdown,
    runs_of,
    summarize,
    twins_markdown,
)
from orthora.bench.quality_runs import (
    TARGET_SETS,
    TASK_METRICS,
    Protocol,
    RunKey,
    load_runs,
    merge_runs,
    trivial_score,
)
from orthora.train.atomic_files import write_json_atomic


def record(method, task, lr, seed, score, target_set="encoder", forgetting=10.0, fingerprint="f"):
    metric = TASK_METRICS[task]
    return {
        "target_set": target_set,
        "fingerprint": fingerprint,
        "task": task,
        "method": method,
        "lr": lr,
        "seed": seed,
        "score": score,
        "metrics": {k: score for k in metric} if score is not None else {},
        "forgetting": forgetting,
        "trainable_params": 100,
        "train_time_s": 10.0,
    }


def test_method_names_with_variants_split_and_parse():
    assert quality._split("lora,orthora[side=both,block_size=16], oft") == [
        "lora",
        "orthora[side=both,block_size=16]",
        "oft",
    ]
    assert parse_method_name("orthora[side=both,block_size=16,magnitude=true]") == (
        "orthora",
        {"side": "both", "block_size": 16, "magnitude": True},
    )
    with pytest.raises(ValueError, match="key=value"):
        parse_method_name("orthora[side]")
    with pytest.raises(ValueError, match="unknown quality method 'nope'"):
        resolve_method("nope", TARGET_SETS["encoder"])


def test_lr_search_extends_past_a_best_edge_and_stops_inside():
    start = (3e-4, 1e-3, 3e-3)
    assert next_lrs([], start) == [1e-3, 3e-4, 3e-3]  # the middle first: one run alone is the likeliest best
    runs = [record("m", "sst2", lr, 0, s) for lr, s in ((3e-4, 0.7), (1e-3, 0.8), (3e-3, 0.9))]
    assert next_lrs(runs, start) == [1e-2]  # best at the top edge: one ladder step up
    runs.append(record("m", "sst2", 1e-2, 0, None))  # diverged: scores worst, so 3e-3 is now interior
    assert next_lrs(runs, start) == [] and lr_is_interior(runs)
    low = [record("m", "sst2", lr, 0, s) for lr, s in ((3e-4, 0.9), (1e-3, 0.8), (3e-3, 0.7))]
    assert next_lrs(low, start) == [1e-4]
    assert not lr_is_interior(low)
    # seeds other than 0 never steer the search
    assert next_lrs(low + [record("m", "sst2", 1e-3, 1, 0.99)], start) == [1e-4]
    # the ladder's end closes an edge
    top = [record("m", "sst2", lr, 0, s) for lr, s in ((1e-2, 0.1), (3e-2, 0.9))]
    assert next_lrs(top, (1e-2, 3e-2)) == []


def test_lr_search_stops_on_a_plateau_of_equal_scores():
    """Every rate at the majority class scores exactly the same: the search must not walk that plateau up (or down)
    the ladder, and of tied rates it keeps the smallest, the smallest change to the pretrained model."""
    start = (3e-4, 1e-3, 3e-3)
    flat = [record("m", "rte", lr, 0, 0.527) for lr in start]
    assert next_lrs(flat, start) == [] and lr_is_interior(flat)
    assert best_lr(flat) == 3e-4
    # a plateau that reaches the top edge but also holds an interior rate stops too
    edge = [record("m", "rte", lr, 0, s) for lr, s in ((3e-4, 0.50), (1e-3, 0.527), (3e-3, 0.527))]
    assert next_lrs(edge, start) == [] and best_lr(edge) == 1e-3
    # a tie confined to the two edges is no plateau inside: the smaller rate is kept and the search goes on below it
    ends = [record("m", "rte", lr, 0, s) for lr, s in ((3e-4, 0.527), (1e-3, 0.50), (3e-3, 0.527))]
    assert best_lr(ends) == 3e-4 and next_lrs(ends, start) == [1e-4] and not lr_is_interior(ends)


def test_pending_searches_seed0_everywhere_first_then_repeats_at_the_chosen_lr():
    method = QualityMethod("m", MethodSpec("m", "lora", {}), "matched", (1e-3, 3e-3, 1e-2))
    fp = method.fingerprint
    done = [
        record("m", "sst2", lr, 0, s, fingerprint=fp) for lr, s in ((1e-3, 0.7), (3e-3, 0.9), (1e-2, 0.8))
    ]
    stale = [record("m", "rte", lr, 0, 0.9, fingerprint="older") for lr in (1e-3, 3e-3, 1e-2)]
    todo = pending(done + stale, [method], ["sst2", "rte", "cola", "mrpc"], ["encoder"], [0, 1, 2])
    keys = [(k.task, k.lr, k.seed) for k, _ in todo]
    assert keys == [
        # breadth first: every open search's middle rate before any search's neighbours, so a sweep cut short
        # (one slow method, one session) has a run in every cell instead of whole searches for some tasks only
        ("rte", 3e-3, 0),
        ("cola", 3e-3, 0),
        ("mrpc", 3e-3, 0),
        ("rte", 1e-3, 0),
        ("cola", 1e-3, 0),
        ("mrpc", 1e-3, 0),
        ("rte", 1e-2, 0),
        ("cola", 1e-2, 0),
        ("mrpc", 1e-2, 0),
        ("sst2", 3e-3, 1),
        ("sst2", 3e-3, 2),
    ]
    # a cell that has run its middle rate waits until every other cell has run one: its next rate is in round 1
    started = done + [record("m", "cola", 3e-3, 0, 0.5, fingerprint=fp)]
    todo = pending(started, [method], ["rte", "cola"], ["encoder"], [0])
    assert [(k.task, k.lr) for k, _ in todo] == [
        ("rte", 3e-3),
        ("rte", 1e-3),
        ("cola", 1e-3),
        ("rte", 1e-2),
        ("cola", 1e-2),
    ]
    assert all(m is method and k.fingerprint == fp for k, m in todo)  # runs of another config never count


def test_runs_of_another_head_learning_rate_never_count():
    """A sweep with one head LR for every method is another protocol: its runs neither steer nor fill the other's."""
    method = QualityMethod("m", MethodSpec("m", "lora", {}), "matched", (1e-3, 3e-3, 1e-2))
    fp = method.fingerprint
    same_head = [
        {**record("m", "sst2", lr, 0, s, fingerprint=fp), "head_lr": None}
        for lr, s in ((1e-3, 0.7), (3e-3, 0.9), (1e-2, 0.8))
    ]
    todo = pending(same_head, [method], ["sst2"], ["encoder"], [0], head_lr=3e-3)
    assert [(k.lr, k.seed, k.head_lr) for k, _ in todo] == [(3e-3, 0, 3e-3), (1e-3, 0, 3e-3), (1e-2, 0, 3e-3)]
    assert todo[0][0].file_name.endswith("__lr0.003__h0.003__s0.json")
    assert pending(same_head, [method], ["sst2"], ["encoder"], [0]) == []
    assert RunKey("encoder", "sst2", "m", fp, 1e-3, 0).file_name.endswith("__lr0.001__s0.json")


def test_a_run_counts_for_every_name_of_its_config():
    """When the default becomes a benchmarked variant, ``orthora`` inherits the variant's runs instead of rerunning
    them (the planner, the finished-file check and the claim ignore the name) and shows them under its own name."""
    variant = QualityMethod("orthora[side=input]", MethodSpec("v", "orthora", {"side": "input"}), "matched")
    default = QualityMethod("orthora", MethodSpec("orthora", "orthora", {"side": "input"}), "matched")
    other = QualityMethod("orthora-output", MethodSpec("o", "orthora", {"side": "output"}), "matched")
    assert default.fingerprint == variant.fingerprint != other.fingerprint
    fp = variant.fingerprint
    done = [
        record(variant.name, "sst2", lr, s, 0.8, fingerprint=fp) for lr in (3e-4, 1e-3, 3e-3) for s in (0,)
    ]
    done[1]["score"] = 0.9
    done += [record(variant.name, "sst2", 1e-3, s, 0.9, fingerprint=fp) for s in (1, 2)]
    assert pending(done, [default], ["sst2"], ["encoder"], [0, 1, 2]) == []
    assert len(pending(done, [other], ["sst2"], ["encoder"], [0])) == 3
    labelled = runs_of(done, {"encoder": [default, variant, other]}, ["sst2"])
    assert len(labelled) == 5 and {r["method"] for r in labelled} == {"orthora"}  # the first name given wins
    assert {r["method"] for r in done} == {variant.name}  # the records themselves are not changed
    assert runs_of(done, {"encoder": [other]}, ["sst2"]) == []
    assert runs_of(done, {"dense": [default]}, ["sst2"]) == []  # another target set's runs never count


def test_fingerprint_is_the_method_not_the_file_layout():
    """A new adapter file layout (format_version) must not orphan every finished orthora run; a real setting must."""
    table = method_table(TARGET_SETS["encoder"])
    assert "format_version" not in table["orthora"].resolved_config
    other_block = table["orthora"].resolved_config["block_size"] // 2  # a block size other than the default's
    variant = resolve_method(f"orthora[block_size={other_block}]", TARGET_SETS["encoder"])
    assert variant.fingerprint != table["orthora"].fingerprint


def test_finished_check_and_claim_ignore_the_method_name(tmp_path):
    as_variant = RunKey("encoder", "sst2", "orthora[side=input]", "abc123", 1e-3, 0, head_lr=0.01)
    as_default = dataclasses.replace(as_variant, method="orthora")
    assert as_variant.file_name != as_default.file_name and as_variant.claim_name == as_default.claim_name
    assert not as_default.finished_in(tmp_path)
    (tmp_path / as_variant.file_name).write_text("{}")
    assert as_default.finished_in(tmp_path)
    assert not dataclasses.replace(as_default, seed=1).finished_in(tmp_path)
    assert not dataclasses.replace(as_default, head_lr=None).finished_in(tmp_path)
    assert not dataclasses.replace(as_default, fingerprint="abc12").finished_in(tmp_path)
    assert not dataclasses.replace(as_default, lr=1e-2).finished_in(tmp_path)


def test_head_rate_table_pairs_runs_that_differ_only_in_the_head_rate():
    slow = {**record("m", "sst2", 1e-3, 0, 0.80, forgetting=40.0), "head_lr": None}
    fast = {**record("m", "sst2", 1e-3, 0, 0.81, forgetting=10.0), "head_lr": 1e-2}
    other_seed = {
        **record("m", "sst2", 1e-3, 1, 0.79, forgetting=9.0),
        "head_lr": 1e-2,
    }  # no partner: left out
    other_config = {**record("m", "sst2", 3e-3, 0, 0.70, forgetting=50.0, fingerprint="g"), "head_lr": None}
    table = head_rate_markdown([slow, fast, other_seed, other_config], 1e-2)
    assert "| sst2 | m | 0.001 | 0 | 80.0 / 40.0 | 81.0 / 10.0 |" in table
    assert table.count("| sst2 |") == 1
    assert head_rate_markdown([slow, other_config], 1e-2) == ""


def test_plot_labels_name_the_seeds_behind_each_point():
    """The learn-vs-forget plot mixes 3-seed means with one-seed peers (BOFT, HRA): each legend entry says which."""
    runs = [record("lora", "sst2", 1e-3, seed, 0.8) for seed in range(3)]
    # CoLA ran two seeds: the fewest of LoRA's shared tasks, so its point is a 2-seed mean
    runs += [record("lora", "cola", 1e-3, seed, 0.3) for seed in range(2)]
    runs += [record("hra", task, 1e-3, 0, 0.8 if task == "sst2" else 0.3) for task in ("sst2", "cola")]
    summary = summarize(runs, ["sst2", "cola"], {"sst2": 0.5, "cola": 0.0})["encoder"]
    assert plot_label("lora", summary["lora"]) == "lora (2 seeds)"
    assert plot_label("hra", summary["hra"]) == "hra (1 seed)"


def test_summary_means_stds_failed_settings_and_paired_differences():
    runs = []
    for seed, (a, b) in enumerate(((0.80, 0.78), (0.82, 0.79), (0.84, 0.81))):
        runs += [
            record("orthora", "sst2", 1e-3, seed, a, forgetting=5.0 + seed),
            record("lora", "sst2", 1e-3, seed, b),
        ]
        runs += [record("orthora", "cola", 1e-3, seed, 0.30), record("lora", "cola", 1e-3, seed, 0.01)]
    runs.append(record("orthora", "sst2", 3e-3, 0, 0.50))  # a worse LR on seed 0: not chosen
    trivial = {"sst2": 0.51, "cola": 0.0}
    summary = summarize(runs, ["sst2", "cola"], trivial)["encoder"]
    sst2 = summary["orthora"]["tasks"]["sst2"]
    assert sst2["lr"] == 1e-3 and sst2["scores"] == [0.80, 0.82, 0.84]
    assert sst2["mean"] == pytest.approx(0.82) and sst2["std"] == pytest.approx(0.02)
    # LoRA's CoLA (MCC 0.01) is not clearly above the trivial 0: a failed setting, kept out of its GLUE mean
    assert summary["lora"]["tasks"]["cola"]["failed"] and summary["lora"]["glue_failed"] == ["cola"]
    assert summary["lora"]["glue_mean"] == (None, None)
    assert summary["orthora"]["glue_mean"][0] == pytest.approx((0.82 + 0.30) / 2)
    # only the tasks every method passed are ranked together
    assert summary["orthora"]["shared_tasks"] == ["sst2"]
    assert summary["orthora"]["shared_mean"] == pytest.approx(0.82)
    paired = summary["orthora"]["paired_score_vs_lora"]["sst2"]
    assert paired["n"] == 3 and paired["mean"] == pytest.approx(0.0267, abs=1e-4)
    assert paired["p"] is not None and paired["p"] < 0.05
    table = quality_markdown({"encoder": summary}, ["sst2", "cola"], trivial)
    assert (
        "| lora |" in table and "failed: cola" in table and "82.0 ± 2.0 (forgot 6.0; lr 0.001, n=3)" in table
    )
    # the GLUE mean paired seed by seed: (0.55, 0.56, 0.57) - (0.395, 0.40, 0.41)
    assert summary["orthora"]["paired_score_vs_lora"]["glue_mean"]["mean"] == pytest.approx(0.1583, abs=1e-4)
    paired = paired_markdown({"encoder": summary}, ["sst2", "cola"])
    assert "| pair | sst2 | cola | GLUE mean |" in paired
    assert (
        "| orthora − lora | +2.7 ± 0.6 (n=3, p=0.0" in paired
        and "| +29.0 ± 0.0 (n=3) | +15.8 ± 0.3 (n=3, p=" in paired
    )
    assert "lora − orthora" not in paired and "| lora − lora" not in paired
    # forgetting is paired the same way, in points: orthora forgot 5, 6, 7 on SST-2 where LoRA forgot 10
    forgetting = paired_markdown({"encoder": summary}, ["sst2", "cola"], "forgetting")
    assert "| orthora − lora | -4.0 ± 1.0 (n=3, p=0.0" in forgetting
    assert "| +0.0 ± 0.0 (n=3) | -2.0 ± 0.5 (n=3, p=0.0" in forgetting


def test_a_squad_only_table_renders_and_shows_em_and_f1():
    """A sweep of SQuAD alone has no GLUE task to average (the trivial row's GLUE mean crashed on it), and its cell
    names EM and F1, because the targets are stated in F1 while the score is their mean."""
    runs = []
    for lr, (em, f1) in ((1e-3, (20.0, 30.0)), (3e-3, (30.0, 40.0)), (1e-2, (25.0, 35.0))):
        rec = record("orthora", "squad", lr, 0, (em + f1) / 200)
        runs.append({**rec, "metrics": {"exact_match": em, "f1": f1}})
    summary = summarize(runs, ["squad"], {"squad": 0.0})
    table = quality_markdown(summary, ["squad"], {"squad": 0.0})
    # no GLUE aggregate columns: there is no GLUE task to aggregate
    assert "| method | trainable params (with head) | squad (exact_match/f1) |\n|---|---|---|\n" in table
    assert "| trivial baseline | 0 | 0.0 |\n" in table
    assert "| orthora | 100 | 35.0 [exact_match 30.0, f1 40.0] (forgot 10.0; lr 0.003, n=1) |\n" in table


def test_the_render_says_where_and_when_the_runs_ran():
    """Runs span sessions and machines; the render names them from the runs, not from the machine rendering."""
    xeon = {"cpu_model": "Xeon", "host_cores": 2, "torch_threads": 1, "git_commit": "a"}
    epyc = {"cpu_model": "EPYC", "host_cores": 2, "torch_threads": 1, "git_commit": "b"}
    h200 = {
        "cpu_model": "Xeon",
        "host_cores": 16,
        "torch_threads": 1,
        "gpu": "NVIDIA H200",
        "git_commit": "b",
    }
    runs = [
        {**record("m", "sst2", 1e-3, 0, 0.8), "machine": {**xeon, "date": "2026-11-30T03:00:00+00:00"}},
        {**record("m", "sst2", 1e-3, 1, 0.8), "machine": {**xeon, "date": "2026-11-30T14:10:00+00:00"}},
        {**record("m", "sst2", 1e-3, 2, 0.8), "machine": {**epyc, "date": "2026-11-29T23:59:00+00:00"}},
        {
            **record("m", "mrpc", 1e-3, 0, 0.8),
            "machine": {**h200, "gpu": None, "date": "2026-11-30T05:00:00+00:00"},
        },
        {**record("m", "mrpc", 1e-3, 1, 0.8), "machine": {**h200, "date": "2026-11-30T05:00:00+00:00"}},
    ]
    line = provenance_markdown(runs)
    assert (
        "Runs summarised: 5 (1 on EPYC, 2 cores, torch threads 1; 1 on NVIDIA H200 with Xeon, 16 cores, torch "
        "threads 1; 1 on Xeon, 16 cores, torch threads 1; 2 on Xeon, 2 cores, torch threads 1)" in line
    )
    assert "finished 2026-11-29T23:59 to 2026-11-30T14:10 UTC, at 2 commits" in line


def test_trivial_baseline_is_the_best_constant_prediction(tmp_path):
    (tmp_path / "glue" / "mrpc").mkdir(parents=True)
    rows = [{"sentence1": "a", "sentence2": "b", "label": int(i < 7), "idx": i} for i in range(10)]
    write_jsonl(tmp_path / "glue" / "mrpc" / "validation.jsonl", rows)
    # always "paraphrase": accuracy 0.7, F1 2*0.7/(1+0.7); the score is their mean
    assert trivial_score("mrpc", tmp_path) == pytest.approx((0.7 + 1.4 / 1.7) / 2)
    assert trivial_score("stsb", tmp_path) == 0.0


def test_budgets_match_lora_r8_within_five_percent_and_orthora_is_the_shipped_default():
    targets = TARGET_SETS["encoder"]
    table = method_table(targets)
    lora = adapter_params(table["lora"], targets)
    for name in ("oft", "hra", "orthora", "orthora-output"):
        assert abs(adapter_params(table[name], targets) / lora - 1) <= 0.05, name
    for name in ("lora-half", "oft-half", "orthora-half"):
        assert 0.45 <= adapter_params(table[name], targets) / lora <= 0.55, name
    assert table["orthora"].spec.kwargs == {}  # OrthoConfig() as shipped: the row measures the default
    assert table["lora"].spec.kwargs["r"] == 8


def test_claims_keep_workers_apart_and_stale_claims_are_taken_over(tmp_path):
    first = Claim(tmp_path / "run.json")
    assert first.acquire()
    assert not Claim(tmp_path / "run.json").acquire()  # this (live) process holds it
    first.release()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    (tmp_path / "run.claim").write_text(dead.stdout.strip())  # a process that has exited
    assert Claim(tmp_path / "run.json").acquire()


def _tiny_data(root, n_train=48, n_dev=16):
    (root / "glue" / "sst2").mkdir(parents=True)
    (root / "glue" / "stsb").mkdir(parents=True)
    write_jsonl(root / "glue" / "sst2" / "train.jsonl", synthetic_rows("sst2", n_train, seed=1))
    write_jsonl(root / "glue" / "sst2" / "validation.jsonl", synthetic_rows("sst2", n_dev, seed=2))
    sentences = [r["sentence"] for r in synthetic_rows("sst2", 20, seed=3)]
    pairs = [
        {"sentence1": a, "sentence2": b, "label": float(i % 6), "idx": i}
        for i, (a, b) in enumerate(zip(sentences, reversed(sentences), strict=True))
    ]
    write_jsonl(root / "glue" / "stsb" / "validation.jsonl", pairs)


def test_sweep_end_to_end_writes_one_record_per_run_with_forgetting(tmp_path, tiny_train_models):
    """Real runs through orthora.train on a tiny BERT: records carry the metrics, the score, the trained config
    and the zero-shot STS-B forgetting of the adapted encoder; finished settings are never rerun."""
    _tiny_data(tmp_path / "data")
    protocol = Protocol(train_samples=48, epochs=1, model=tiny_train_models["bert"])
    method = QualityMethod(
        "orthora", MethodSpec("orthora", "orthora", {"block_size": 16}), "matched", (1e-2, 3e-2)
    )
    runs_dir = tmp_path / "runs"
    logged = []
    kwargs = dict(protocol=protocol, data_dir=tmp_path / "data", runs_dir=runs_dir, log=logged.append)
    assert run_sweep([method], ["sst2"], ["encoder"], [0, 1], max_runs=2, **kwargs) == 2
    files = sorted(p.name for p in runs_dir.glob("*.json"))
    fp = method.fingerprint
    assert files == [
        f"encoder__sst2__orthora__{fp}__lr0.01__s0.json",
        f"encoder__sst2__orthora__{fp}__lr0.03__s0.json",
    ]
    rec = json.loads((runs_dir / files[0]).read_text())
    assert rec["adapter"]["block_size"] == 16 and rec["adapter"]["target_modules"]
    assert (
        rec["resolved_adapter"]["block_size"] == 16 and rec["resolved_adapter"]["parametrization"] == "cayley"
    )
    assert 0.0 <= rec["score"] <= 1.0 and rec["metrics"]["accuracy"] == rec["score"]
    assert rec["forgetting"] == pytest.approx(rec["sts_base"] - rec["sts_zero_shot"])
    assert not list(runs_dir.glob("*.claim")) and not list(runs_dir.glob(".*.tmp"))
    mtimes = {p: p.stat().st_mtime_ns for p in runs_dir.glob("*.json")}
    run_sweep([method], ["sst2"], ["encoder"], [0], max_runs=0, **kwargs)
    assert {p: p.stat().st_mtime_ns for p in runs_dir.glob("*.json")} == mtimes


def test_a_worker_that_finds_every_pending_run_claimed_waits_or_returns(tmp_path):
    """With wait=False a worker whose every pending run is held by a live worker returns at once, running nothing
    (a driver then gives it another sweep); by default it polls for their results."""
    lrs = (3e-4, 1e-3, 3e-3)
    method = QualityMethod("m", MethodSpec("m", "lora", {"r": 8}), "matched", lrs)
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    keys = [RunKey("encoder", "sst2", "m", method.fingerprint, lr, 0) for lr in lrs]
    for key in keys:  # a live worker holds every pending run
        (runs_dir / key.claim_name).write_text(str(os.getpid()))
    kwargs = dict(protocol=Protocol(), data_dir=tmp_path, runs_dir=runs_dir, poll_s=0.01)
    with mock.patch("orthora.bench.quality_plan.time.sleep", side_effect=AssertionError("waited")):
        assert run_sweep([method], ["sst2"], ["encoder"], [0], wait=False, **kwargs) == 0
    polls = []

    def others_finish(seconds):  # the search closes (best LR inside the grid) while this worker waits
        polls.append(seconds)
        for key, score in zip(keys, (0.7, 0.8, 0.75), strict=True):
            rec = record("m", "sst2", key.lr, 0, score, fingerprint=method.fingerprint)
            write_json_atomic(runs_dir / key.file_name, rec)

    with mock.patch("orthora.bench.quality_plan.time.sleep", others_finish):
        assert run_sweep([method], ["sst2"], ["encoder"], [0], **kwargs) == 0
    assert polls == [0.01]


def test_quality_profile_cli_renders_finished_runs(tmp_path):
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    fp = method_table(TARGET_SETS["encoder"])["lora"].fingerprint
    for seed in (0, 1, 2):
        for lr, score in ((3e-4, 0.7), (1e-3, 0.8), (3e-3, 0.75)):
            rec = record("lora", "sst2", lr, seed, score + 0.01 * seed, fingerprint=fp)
            key = RunKey("encoder", "sst2", "lora", fp, lr, seed)
            write_json_atomic(runs_dir / key.file_name, rec)
    data = tmp_path / "data"
    _tiny_data(data)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "orthora.bench",
            "--profile",
            "quality",
            "--render",
            "--no-write",
            "--tasks",
            "sst2",
            "--quality-methods",
            "lora",
            "--runs-dir",
            str(runs_dir),
            "--data-dir",
            str(data),
            "--plot",
            str(tmp_path / "plot.png"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "| lora | 100 | 81.0 ± 1.0 (forgot 10.0; lr 0.001, n=3)" in out.stdout
    assert (tmp_path / "plot.png").stat().st_size > 1000
    assert (tmp_path / "plot_tradeoff.png").stat().st_size > 1000
    # the same command on a protocol with no finished runs: one line that says so, no plot
    again = subprocess.run(
        out.args + ["--head-lr", "0.01"], capture_output=True, text=True, env=os.environ, timeout=300
    )
    assert again.returncode == 1 and again.stderr.strip().splitlines()[-1].startswith("no finished runs in ")
    # another machine's folder: a second seed-1 run of a finished setting comes back as a twin, next to the first
    other = tmp_path / "gpu-runs"
    other.mkdir()
    twin = {**record("lora", "sst2", 1e-3, 1, 0.9, fingerprint=fp), "machine": {"gpu": "NVIDIA H200"}}
    write_json_atomic(other / RunKey("encoder", "sst2", "lora", fp, 1e-3, 1).file_name, twin)
    merged = subprocess.run(
        out.args[: out.args.index("--render")]
        + ["--merge-runs", str(other)]
        + out.args[out.args.index("--render") + 1 :],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert merged.returncode == 0, merged.stderr
    assert f"0 runs added, 1 twins of finished settings kept in {tmp_path / 'runs-twins'}" in merged.stdout
    assert (
        "| encoder sst2 lora lr 0.001 seed 1 | 81.0 (" in merged.stdout
        and "| 90.0 (NVIDIA H200 with " in merged.stdout
    )


def test_merging_another_machines_runs_adds_new_settings_and_keeps_second_runs_apart(tmp_path):
    """The tables keep the run they had; a setting finished on both machines pairs its two runs; nothing is written
    when the incoming folder holds a file that is not a finished run."""
    here, there, twins = tmp_path / "here", tmp_path / "there", tmp_path / "twins"
    here.mkdir(), there.mkdir()
    cpu, gpu = (
        {"cpu_model": "Xeon", "host_cores": 2, "torch_threads": 1},
        {"gpu": "NVIDIA H200", "host_cores": 16},
    )
    first = {**record("lora", "rte", 1e-3, 0, 0.55), "machine": cpu}
    kept = {**record("lora", "rte", 1e-3, 1, 0.56), "machine": cpu}
    for run in (first, kept):
        write_json_atomic(here / RunKey("encoder", "rte", "lora", "f", run["lr"], run["seed"]).file_name, run)
    second = {**record("lora-again", "rte", 1e-3, 0, 0.58, forgetting=12.0), "machine": gpu}  # same config
    new = {**record("lora", "rte", 1e-3, 2, 0.57), "machine": gpu}
    write_json_atomic(there / RunKey("encoder", "rte", "lora-again", "f", 1e-3, 0).file_name, second)
    write_json_atomic(there / RunKey("encoder", "rte", "lora", "f", 1e-3, 2).file_name, new)
    write_json_atomic(there / RunKey("encoder", "rte", "lora", "f", 1e-3, 1).file_name, kept)
    (there / "zz-cut-short.json").write_text('{"task": "rte", ')
    with pytest.raises(ValueError, match="zz-cut-short.json is not a finished run"):
        merge_runs(there, here, twins)
    assert len(list(here.iterdir())) == 2 and not twins.exists()
    (tmp_path / "data" / "glue").mkdir(parents=True)  # the command line says it in one line, not a traceback
    argv = [
        "--profile",
        "quality",
        "--merge-runs",
        str(there),
        "--runs-dir",
        str(here),
        "--twins-dir",
        str(twins),
    ]
    with pytest.raises(SystemExit, match="zz-cut-short.json is not a finished run") as exit_:
        bench_cli.main([*argv, "--data-dir", str(tmp_path / "data"), "--no-write"])
    assert "\n" not in str(exit_.value.code) and not twins.exists()

    (there / "zz-cut-short.json").write_text('{"profile": "quality", "summary": {}}')  # a report, not a run
    with pytest.raises(ValueError, match="zz-cut-short.json is not a finished run .no target_set, task"):
        merge_runs(there, here, twins)
    assert len(list(here.iterdir())) == 2 and not twins.exists()
    (there / "zz-cut-short.json").unlink()
    done = merge_runs(there, here, twins)
    assert (len(done["added"]), len(done["twins"]), len(done["unchanged"])) == (1, 1, 1)
    assert sorted(r["seed"] for r in load_runs(here)) == [0, 1, 2]
    assert [r["machine"] for r in load_runs(here) if r["seed"] == 0] == [cpu]  # the table's run stays
    table = twins_markdown(load_runs(here), load_runs(twins))
    row = [line for line in table.splitlines() if line.startswith("| encoder rte")]
    assert row == [
        "| encoder rte lora lr 0.001 seed 0 | 55.0 (Xeon, 2 cores, torch threads 1) "
        "| 58.0 (NVIDIA H200 with ?, 16 cores, torch threads ?) | +3.0 | 10.0 / 12.0 |"
    ]
    # merging the same folder again adds nothing and keeps one twin
    again = merge_runs(there, here, twins)
    assert (len(again["added"]), len(again["twins"]), len(again["unchanged"])) == (0, 1, 2)
    assert len(list(here.glob("*.json"))) == 3 and len(list(twins.glob("*.json"))) == 1


def test_forgetting_scores_the_adapted_encoder_not_the_base(tiny_train_models):
    """encoder_of looks through PEFT and the task head: a rotated encoder gives other embeddings than the base."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertModel

    import orthora
    from orthora.bench.forgetting import encoder_of, mean_pooled_embeddings

    path = tiny_train_models["bert"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    sentences = [r["sentence"] for r in synthetic_rows("sst2", 6)]
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    before = mean_pooled_embeddings(encoder_of(base), tokenizer, sentences)
    adapted = get_peft_model(base, orthora.OrthoConfig(target_modules=["query", "value"], init_weights=False))
    encoder = encoder_of(adapted)
    assert isinstance(encoder, BertModel) and any(
        isinstance(m, orthora.OrthoLayer) for m in encoder.modules()
    )
    after = mean_pooled_embeddings(encoder, tokenizer, sentences)
    assert not torch.allclose(before, after, atol=1e-4)
    with adapted.disable_adapter():
        assert torch.allclose(
            before, mean_pooled_embeddings(encoder_of(adapted), tokenizer, sentences), atol=1e-5
        )


def test_lr_grids_of_auto_scaled_rotations_start_one_ladder_step_higher():
    """With generator_scale="auto" (the default) a rotation turns ~10x less per unit of LR, so its search starts
    higher, whether "auto" is written in the variant or comes from the default config."""
    targets = TARGET_SETS["encoder"]
    raw, scaled = (3e-4, 1e-3, 3e-3), (1e-3, 3e-3, 1e-2)
    assert resolve_method("lora", targets).start_lrs == raw
    # the default's "auto", written nowhere in its spec
    assert resolve_method("orthora", targets).start_lrs == scaled
    assert resolve_method("orthora-half", targets).start_lrs == scaled
    assert resolve_method("orthora[side=input,generator_scale=auto]", targets).start_lrs == scaled
    assert resolve_method("orthora[generator_scale=1.0]", targets).start_lrs == raw
