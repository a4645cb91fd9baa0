"""Smoke test of scripts/benchmark.py: the cost code path on tiny random models, structure and sanity only.

No timing is asserted (timings are never pass/fail); numbers must only be present, finite and positive.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("orthora_benchmark_script", REPO / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_matched_budgets(bench):
    widths = [(384, 384)] * 4 + [(384, 1536), (1536, 384)]  # one MiniLM layer
    methods = {m.name: m for m in bench.matched_methods(widths * 6, 32, "all")}
    assert {"lora-r8", "orthora-cayley-output", "oft-cayley", "oft-cayley_neumann", "hra-r16"} <= set(methods)
    assert any(n.startswith("boft-") for n in methods)
    assert methods["orthora-cayley-both"].kwargs["block_size"] == 16
    assert methods["orthora-householder-output"].kwargs["num_reflections"] % 2 == 0


def test_cost_rows_subprocess_workers(bench, tmp_path):
    """Two methods in two worker subprocesses, interleaved: every column measured, finite and positive."""
    spec = bench.ModelSpec("bert-tiny", batch=2, seq=16)
    widths = bench.targeted_widths(bench.build_model(spec), bench.target_modules(spec))
    methods = bench.matched_methods(widths, 8, "pair")
    results = bench.run_interleaved(spec, methods, rounds=2, warmup=1, inference_reps=1, log=lambda *_: None)
    rows = bench.summarize(results, spec)
    assert [r["method"] for r in rows] == [m.name for m in methods]
    for row in rows:
        assert "error" not in row, row
        for key in ("step_s", "tokens_per_s", "trainable_params", "adapter_kb", "infer_merged_ratio",
                    "infer_unmerged_ratio", "step_vs_lora", "params_vs_lora"):
            assert _finite_positive(row[key]), (row["method"], key, row[key])
        assert row["peak_mem_mb"] is None or math.isfinite(row["peak_mem_mb"])
    assert rows[0]["step_vs_lora"] == 1.0
    report = {"profile": "test", "machine": bench.machine_info(), "model": vars(spec), "rows": rows}
    md = bench.render_cost(report, "pytest")
    assert "| lora-r" in md and "| orthora-cayley-output" in md
    jpath, mpath = bench.write_outputs(bench.slim(report), md, "smoke", tmp_path)
    assert json.loads(jpath.read_text())["rows"][1]["method"] == "orthora-cayley-output"
    assert mpath.read_text().startswith("## test")


def test_gpu_profile_dry_run_in_process(bench):
    """The GPU profile's code path (Llama decoder, bf16, LM loss) on a tiny config on CPU."""
    report = bench.run_cost("gpu", dry_run=True, methods="pair", in_process=True, profile_ops=False,
                            log=lambda *_: None)
    assert report["model"]["kind"] == "llama" and report["model"]["dtype"] == "bfloat16"
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"lora-r8", "orthora-cayley-output"}
    for row in rows.values():
        assert "error" not in row, row
        assert _finite_positive(row["step_s"]) and _finite_positive(row["trainable_params"])
        assert _finite_positive(row["infer_merged_ratio"])


def test_boft_budget_counts_instantiated_layers(bench):
    """The BOFT rule counts what PEFT really builds (full b'xb' blocks + an output scale), not a formula."""
    widths = [(64, 64), (64, 64), (64, 128)]
    for block, factors in ((8, 1), (4, 2)):
        count = bench.boft_trainable_params(widths, block, factors)
        import peft
        import torch

        class Stack(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b, self.c = (torch.nn.Linear(i, o) for i, o in widths)

        model = peft.get_peft_model(Stack(), peft.BOFTConfig(target_modules=["a", "b", "c"], boft_block_size=block,
                                                             boft_n_butterfly_factor=factors))
        assert count == sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    boft = next(m for m in bench.matched_methods(widths, 8, "all") if m.kind == "boft")
    chosen = bench.boft_trainable_params(widths, boft.kwargs["boft_block_size"], boft.kwargs["boft_n_butterfly_factor"])
    budget = sum(o for _, o in widths) * (8 - 1) / 2
    for b in (2, 4, 8, 16, 32):  # no valid single-factor config is closer to the budget
        other = bench.boft_trainable_params(widths, b, 1)
        assert other is None or abs(chosen - budget) <= abs(other - budget)


def test_quality_summary_picks_best_lr_and_keeps_target_configs_apart(bench):
    """Best LR by seed mean per (method, task); the GLUE mean and its per-seed spread; -qv rows stay separate."""

    def run(method, task, lr, seed, score):
        metric = {"sst2": "accuracy", "rte": "accuracy"}[task]
        return {"method": method, "task": task, "lr": lr, "seed": seed, "score": score, "metrics": {metric: score},
                "trainable_params": 10}

    runs = [run("orthora", "sst2", 1e-3, 0, 0.80), run("orthora", "sst2", 1e-3, 1, 0.70),
            run("orthora", "sst2", 3e-3, 0, 0.74), run("orthora", "sst2", 3e-3, 1, 0.74),
            run("orthora", "rte", 1e-3, 0, 0.50), run("orthora", "rte", 1e-3, 1, 0.60),
            run("orthora-qv", "sst2", 1e-3, 0, 0.90), run("orthora-qv", "rte", 1e-3, 0, 0.40)]
    summary = bench.summarize_quality(runs, ["sst2", "rte"], ["orthora", "orthora-qv"])
    sst2 = summary["orthora"]["tasks"]["sst2"]
    assert sst2["lr"] == 1e-3 and sst2["score"] == pytest.approx(0.75) and (sst2["min"], sst2["max"]) == (0.70, 0.80)
    assert summary["orthora"]["glue_mean"] == pytest.approx((0.75 + 0.55) / 2)
    assert sorted(summary["orthora"]["glue_mean_per_seed"]) == pytest.approx([0.65, 0.65])
    assert summary["orthora-qv"]["glue_mean"] == pytest.approx(0.65)
    table = bench.quality_table({"tasks": ["sst2", "rte"], "summary": summary})
    assert "| orthora | 10 | 0.750 (lr 0.001, ±0.050)" in table and "| orthora-qv |" in table


def test_quality_train_time_ratio_pairs_runs_of_the_same_setting(bench):
    runs = [{"method": "lora", "task": "sst2", "lr": 1e-3, "seed": 0, "train_time_s": 100.0},
            {"method": "lora", "task": "rte", "lr": 1e-3, "seed": 0, "train_time_s": 200.0},
            {"method": "orthora", "task": "sst2", "lr": 1e-3, "seed": 0, "train_time_s": 90.0},
            {"method": "orthora", "task": "rte", "lr": 1e-3, "seed": 0, "train_time_s": 160.0},
            {"method": "orthora", "task": "rte", "lr": 3e-3, "seed": 0, "train_time_s": 999.0}]  # no LoRA partner
    assert bench._train_time_vs_lora(runs, "orthora") == pytest.approx((0.9 + 0.8) / 2)
    assert bench._train_time_vs_lora(runs, "hra") is None


def test_select_runs_filters_and_refuses_duplicates(bench):
    runs = [{"task": "sst2", "method": "lora", "lr": lr, "seed": seed} for lr in (1e-3, 3e-3) for seed in (0, 1)]
    assert len(bench.select_runs(runs)) == 4
    assert [(r["lr"], r["seed"]) for r in bench.select_runs(runs, lrs="1e-3", seeds="0")] == [(1e-3, 0)]
    with pytest.raises(SystemExit, match="appears twice"):
        bench.select_runs(runs + runs[:1])


def test_quality_train_time_ratio_never_pairs_runs_of_different_sweeps(bench):
    runs = [{"method": "lora", "task": "sst2", "lr": 1e-3, "seed": 0, "train_time_s": 100.0, "source": "a.json"},
            {"method": "hra", "task": "sst2", "lr": 1e-3, "seed": 0, "train_time_s": 900.0, "source": "b.json"}]
    assert bench._train_time_vs_lora(runs, "hra") is None
