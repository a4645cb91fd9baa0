"""Two-process CPU data parallelism through `accelerate launch` and the shipped configs/accelerate/cpu_ddp.yaml.

With dropout off, 2 processes x batch 4 see exactly the samples of 1 process x batch 8 (same seeded order, gradients
averaged), so the adapter must match the single-process one: this checks sharding, gradient averaging and the
per-process learning-rate schedule, not only that the run finishes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from orthora.train.cli import main

REPO = Path(__file__).resolve().parents[1]


def _without_dropout(model_dir: str, target: Path) -> str:
    shutil.copytree(model_dir, target)
    config = json.loads((target / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (target / "config.json").write_text(json.dumps(config))
    return str(target)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_cpu_processes_match_one_process(tiny_train_models, task_files, tmp_path):
    model = _without_dropout(tiny_train_models["bert"], tmp_path / "bert_no_dropout")
    train, dev = task_files("sst2", 32, 12)
    common = [
        "--task_name",
        "sst2",
        "--model_name_or_path",
        model,
        "--train_file",
        train,
        "--validation_file",
        dev,
        "--adapter",
        "{block_size: 16, target_modules: [query, value]}",
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "2",
        "--learning_rate",
        "5e-3",
        "--num_warmup_steps",
        "1",
        "--report_to",
        "none",
        "--per_device_eval_batch_size",
        "5",
    ]
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(REPO / "configs" / "accelerate" / "cpu_ddp.yaml"),
            "--main_process_port",
            str(_free_port()),
            str(REPO / "scripts" / "finetune.py"),
            *common,
            "--per_device_train_batch_size",
            "4",
            "--output_dir",
            str(ddp_out),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in completed.stderr.splitlines() if "Error" in line or "error:" in line]
    assert completed.returncode == 0, "\n".join(errors[-20:]) or completed.stderr[-3000:]
    ddp = json.loads((ddp_out / "results.json").read_text())
    assert ddp["num_processes"] == 2 and ddp["completed_steps"] == 4
    assert (ddp_out / "checkpoints" / "step_2" / "random_states_1.pkl").is_file()  # one RNG state per process

    assert main([*common, "--per_device_train_batch_size", "8", "--output_dir", str(single_out)]) == 0
    single = json.loads((single_out / "results.json").read_text())
    assert sorted(os.listdir(ddp_out / "adapter")) == sorted(os.listdir(single_out / "adapter"))
    ddp_weights = load_file(ddp_out / "adapter" / "adapter_model.safetensors")
    single_weights = load_file(single_out / "adapter" / "adapter_model.safetensors")
    assert ddp_weights.keys() == single_weights.keys()
    for key, value in single_weights.items():
        torch.testing.assert_close(
            ddp_weights[key], value, rtol=1e-4, atol=1e-6, msg=f"{key}: 2 processes != 1"
        )
    # The uneven last evaluation batch must be de-duplicated across processes: same 12 rows, same score.
    assert ddp["metrics"]["validation"]["accuracy"] == single["metrics"]["validation"]["accuracy"]


def test_gradient_accumulation_matches_the_large_batch(tiny_train_models, task_files, tmp_path):
    """Batch 4 x 2 accumulation steps takes the same optimizer steps as batch 8 (dropout off, same data order)."""
    model = _without_dropout(tiny_train_models["bert"], tmp_path / "bert_no_dropout")
    train, dev = task_files("sst2", 32, 8)
    common = [
        "--task_name", "sst2", "--model_name_or_path", model, "--train_file", train, "--validation_file", dev,
        "--adapter", "{block_size: 16, target_modules: [query, value]}", "--max_train_steps", "3",
        "--learning_rate", "5e-3", "--report_to", "none",
    ]  # fmt: skip
    assert main([*common, "--per_device_train_batch_size", "8", "--output_dir", str(tmp_path / "big")]) == 0
    accumulated = [*common, "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"]
    assert main([*accumulated, "--output_dir", str(tmp_path / "acc")]) == 0
    big = load_file(tmp_path / "big" / "adapter" / "adapter_model.safetensors")
    acc = load_file(tmp_path / "acc" / "adapter" / "adapter_model.safetensors")
    for key, value in big.items():
        torch.testing.assert_close(
            acc[key], value, rtol=1e-4, atol=1e-6, msg=f"{key}: accumulation != big batch"
        )
    assert json.loads((tmp_path / "acc" / "results.json").read_text())["completed_steps"] == 3


def test_bf16_autocast_run(tiny_train_models, task_files, tmp_path, monkeypatch):
    """bf16 really runs the adapted layers in bf16 (and fp32 does not), and the trained weights stay finite.

    Mixed precision is a config value; a later run in the same process may choose another one.
    """
    from orthora.layer import OrthoLayer

    seen: list[tuple[bool, torch.dtype]] = []
    forward = OrthoLayer.forward

    def recording_forward(self, x, *args, **kwargs):
        out = forward(self, x, *args, **kwargs)
        if self.training:
            seen.append((torch.is_autocast_enabled("cpu"), out.dtype))
        return out

    monkeypatch.setattr(OrthoLayer, "forward", recording_forward)
    train, dev = task_files("sst2", 16, 8)
    common = [
        "--task_name", "sst2", "--model_name_or_path", tiny_train_models["bert"], "--train_file", train,
        "--validation_file", dev, "--adapter", "{block_size: 16, target_modules: [query, value]}",
        "--max_train_steps", "2", "--per_device_train_batch_size", "8", "--report_to", "none",
        "--learning_rate", "1e-2",
    ]  # fmt: skip
    assert main([*common, "--mixed_precision", "bf16", "--output_dir", str(tmp_path / "bf16")]) == 0
    assert json.loads((tmp_path / "bf16" / "results.json").read_text())["mixed_precision"] == "bf16"
    assert seen and set(seen) == {(True, torch.bfloat16)}, set(seen)
    weights = load_file(tmp_path / "bf16" / "adapter" / "adapter_model.safetensors")
    rotations = [v for k, v in weights.items() if "ortho_" in k]
    assert rotations and all(torch.isfinite(v).all() for v in weights.values())
    assert all(v.dtype == torch.float32 for v in rotations) and any(v.abs().max() > 0 for v in rotations)
    seen.clear()
    assert main([*common, "--mixed_precision", "no", "--output_dir", str(tmp_path / "fp32")]) == 0
    assert json.loads((tmp_path / "fp32" / "results.json").read_text())["mixed_precision"] == "no"
    assert seen and set(seen) == {(False, torch.float32)}, set(seen)
