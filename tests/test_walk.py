"""The worked example's pipeline (orthora.train.walk) end to end on a tiny model: the walk's end points are the
trained adapters, each task scored with its own head, and the outputs are written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from orthora.train.walk import WalkConfig, markdown_table, run_walk


@pytest.mark.slow
def test_walk_end_points_reproduce_each_trained_adapter_with_its_head(
    tiny_train_models, task_files, tmp_path
):
    train, dev = task_files("sst2", 24, 16)
    data = tmp_path / "glue"
    for task in ("sst2", "cola"):  # same columns; two tasks so that two heads are trained
        (data / task).mkdir(parents=True)
        shutil.copy(train, data / task / "train.jsonl")
        shutil.copy(dev, data / task / "validation.jsonl")
    config = WalkConfig(
        model_name_or_path=tiny_train_models["bert"],
        data_dir=str(data),
        output_dir=str(tmp_path / "out"),
        results_prefix=str(tmp_path / "results" / "walk"),
        tasks=("sst2", "cola"),
        weights=(-0.5, 0.0, 1.0),
        max_train_samples=24,
        num_train_epochs=1,
        learning_rate=5e-2,
        batch_size=8,
        probe_size=4,
    )
    payload = run_walk(config)
    points = {(p["method"], p["t"]): p for p in payload["points"]}
    for method in ("orthora", "lora"):
        trained = payload["trained"]
        sst2 = trained[f"{method}/sst2"]["metrics"]["validation"]["accuracy"]
        cola = trained[f"{method}/cola"]["metrics"]["validation"]["matthews_correlation"]
        assert points[(method, 0.0)]["sst2_accuracy"] == pytest.approx(sst2)
        assert points[(method, 1.0)]["cola_matthews_correlation"] == pytest.approx(cola)
    assert points[("orthora", 0.0)]["geodesic_gap"] < 1e-5  # t = 0 is adapter 1 itself
    assert points[("orthora", -0.5)]["diagnostics"]["max_orthogonality_error"] < 1e-5
    assert points[("lora", 0.0)]["geodesic_gap"] is None
    for suffix in (".json", ".md", ".png"):
        assert Path(f"{config.results_prefix}{suffix}").stat().st_size > 0
    assert json.loads(Path(f"{config.results_prefix}.json").read_text())["points"] == payload["points"]
    table = markdown_table(payload["points"], config.tasks)
    assert table.count("\n") == 2 + 6 and "| orthora | -0.50 |" in table
