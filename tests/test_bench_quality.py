"""The quality sweep's bookkeeping (orthora.bench.quality): best-LR selection, GLUE means, paired train times."""

from __future__ import annotations

import pytest

from orthora.bench import quality


def test_quality_summary_picks_best_lr_and_keeps_target_configs_apart():
    """Best LR by seed mean per (method, task); the GLUE mean and its per-seed spread; -qv rows stay separate."""

    def run(method, task, lr, seed, score):
        metric = {"sst2": "accuracy", "rte": "accuracy"}[task]
        return {
            "method": method,
            "task": task,
            "lr": lr,
            "seed": seed,
            "score": score,
            "metrics": {metric: score},
            "trainable_params": 10,
        }

    runs = [
        run("orthora", "sst2", 1e-3, 0, 0.80),
        run("orthora", "sst2", 1e-3, 1, 0.70),
        run("orthora", "sst2", 3e-3, 0, 0.74),
        run("orthora", "sst2", 3e-3, 1, 0.74),
        run("orthora", "rte", 1e-3, 0, 0.50),
        run("orthora", "rte", 1e-3, 1, 0.60),
        run("orthora-qv", "sst2", 1e-3, 0, 0.90),
        run("orthora-qv", "rte", 1e-3, 0, 0.40),
    ]
    summary = quality.summarize_quality(runs, ["sst2", "rte"], ["orthora", "orthora-qv"])
    sst2 = summary["orthora"]["tasks"]["sst2"]
    assert (
        sst2["lr"] == 1e-3
        and sst2["score"] == pytest.approx(0.75)
        and (sst2["min"], sst2["max"]) == (0.70, 0.80)
    )
    assert summary["orthora"]["glue_mean"] == pytest.approx((0.75 + 0.55) / 2)
    assert sorted(summary["orthora"]["glue_mean_per_seed"]) == pytest.approx([0.65, 0.65])
    assert summary["orthora-qv"]["glue_mean"] == pytest.approx(0.65)
    table = quality.quality_table({"tasks": ["sst2", "rte"], "summary": summary})
    assert "| orthora | 10 | 0.750 (lr 0.001, ±0.050)" in table and "| orthora-qv |" in table


def test_quality_train_time_ratio_pairs_runs_of_the_same_setting():
    runs = [
        {"method": "lora", "task": "sst2", "lr": 1e-3, "seed": 0, "train_time_s": 100.0},
        {"method": "lora", "task": "rte", "lr": 1e-3, "seed": 0, "train_time_s": 200.0},
        {"method": "orthora", "task": "sst2", "lr": 1e-3, "seed": 0, "train_time_s": 90.0},
        {"method": "orthora", "task": "rte", "lr": 1e-3, "seed": 0, "train_time_s": 160.0},
        {"method": "orthora", "task": "rte", "lr": 3e-3, "seed": 0, "train_time_s": 999.0},
    ]  # no LoRA partner
    assert quality._train_time_vs_lora(runs, "orthora") == pytest.approx((0.9 + 0.8) / 2)
    assert quality._train_time_vs_lora(runs, "hra") is None


def test_select_runs_filters_and_refuses_duplicates():
    runs = [
        {"task": "sst2", "method": "lora", "lr": lr, "seed": seed} for lr in (1e-3, 3e-3) for seed in (0, 1)
    ]
    assert len(quality.select_runs(runs)) == 4
    assert [(r["lr"], r["seed"]) for r in quality.select_runs(runs, lrs="1e-3", seeds="0")] == [(1e-3, 0)]
    with pytest.raises(SystemExit, match="appears twice"):
        quality.select_runs(runs + runs[:1])


def test_quality_train_time_ratio_never_pairs_runs_of_different_sweeps():
    runs = [
        {"method": "lora", "task": "sst2", "lr": 1e-3, "seed": 0, "train_time_s": 100.0, "source": "a.json"},
        {"method": "hra", "task": "sst2", "lr": 1e-3, "seed": 0, "train_time_s": 900.0, "source": "b.json"},
    ]
    assert quality._train_time_vs_lora(runs, "hra") is None
