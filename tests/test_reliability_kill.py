"""Kill and resume: a run SIGKILLed mid-step, mid-checkpoint or mid-adapter write, resumed with
``--resume_from_checkpoint latest``, ends with the adapter of an uninterrupted run with the same seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orthora.train.cli import main

DRIVER = Path(__file__).with_name("kill_driver.py")
REPO = Path(__file__).resolve().parents[1]


def run_args(model: str, train: str, dev: str, out: Path) -> list[str]:
    return [
        "--task", "glue", "--task_name", "sst2", "--model_name_or_path", model, "--train_file", train,
        "--validation_file", dev, "--output_dir", str(out), "--adapter",
        "{block_size: 16, target_modules: [query, value]}", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "8", "--max_train_steps", "6", "--checkpointing_steps", "2",
        "--eval_steps", "2", "--learning_rate", "5e-3", "--num_warmup_steps", "1", "--report_to", "none",
        "--seed", "7",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def data_and_reference(tiny_train_models, tmp_path_factory):
    from conftest import synthetic_rows, write_jsonl

    root = tmp_path_factory.mktemp("kill")
    train = write_jsonl(root / "train.jsonl", synthetic_rows("sst2", 24, seed=1))
    dev = write_jsonl(root / "dev.jsonl", synthetic_rows("sst2", 8, seed=2))
    out = root / "uninterrupted"
    assert main(run_args(tiny_train_models["bert"], train, dev, out)) == 0
    return train, dev, load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kill_point", "checkpoints_left"),
    [
        (["optimizer", "3"], ["step_2"]),  # mid step 3, after the step-2 checkpoint
        (["save", "model.safetensors", "2"], ["step_2"]),  # mid write of the step-4 checkpoint
        (
            ["save", "adapter_model.safetensors", "1"],
            [],
        ),  # mid write of the first best_adapter, before any checkpoint
    ],
    ids=["mid-step", "mid-checkpoint", "mid-adapter"],
)
def test_sigkill_then_resume_latest_equals_an_uninterrupted_run(
    kill_point, checkpoints_left, data_and_reference, tiny_train_models, tmp_path
):
    train, dev, reference = data_and_reference
    out = tmp_path / "run"
    args = run_args(tiny_train_models["bert"], train, dev, out)
    # the driver is a script, so its sys.path starts at tests/: PYTHONPATH makes it import this checkout's orthora
    # (not another one installed in the environment), like the in-process reference run
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": pythonpath}
    killed = subprocess.run(
        [sys.executable, str(DRIVER), *kill_point, "--", *args], env=env, capture_output=True, timeout=300
    )
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]

    # what the kill left: complete checkpoints only (a half-written one stays in its temporary folder), no results
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == checkpoints_left
    assert not (out / "results.json").exists()
    for folder in ("adapter", "best_adapter"):
        if (out / folder).exists():  # an adapter folder is either absent or complete and loadable
            load_file(out / folder / "adapter_model.safetensors")

    assert main([*args, "--resume_from_checkpoint", "latest"]) == 0
    results = json.loads((out / "results.json").read_text())
    resumed_from = int(checkpoints_left[-1].split("_")[1]) if checkpoints_left else 0
    assert results["resumed_from_step"] == resumed_from and results["completed_steps"] == 6
    resumed = load_file(out / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == reference.keys()
    for key, value in reference.items():
        # CPU kernels are deterministic and the checkpoint restores weights, optimizer, scheduler, data position and
        # RNG states, so the resumed run repeats the same float operations: the adapters are bit-identical
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)
