"""orthora under FSDP2 with two CPU processes on gloo, and the shipped FSDP / DeepSpeed accelerate configs.

torch's FSDP2 (``fully_shard``) runs on CPU with gloo: two processes must train, gather the full adapter, save it,
and resume from a sharded checkpoint to the adapter one process trains (tests/fsdp_two_process.py). accelerate
(1.15) applies its FSDP plugin only on accelerator devices, so on CPU its FSDP config must fail with a clear
message instead of silently running plain data parallel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fsdp_two_process
import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from test_train_distributed import _free_port

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = REPO / "configs" / "accelerate"


def _env() -> dict:
    paths = [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths)), "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1"}  # fmt: skip


def _torchrun(out: Path, *extra: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         str(REPO / "tests" / "fsdp_two_process.py"), str(out), *extra],
        env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.slow  # two 2-process launches (~50 s on 2 busy cores)
def test_fsdp2_two_cpu_processes_train_save_resume_match_one_process(tmp_path):
    _torchrun(tmp_path / "fsdp")
    checkpoint = tmp_path / "fsdp" / "checkpoint"
    assert sorted(p.name for p in checkpoint.glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]  # one per rank
    shards = json.loads((tmp_path / "fsdp" / "shards.json").read_text())
    rotations = {n: shapes for n, shapes in shards.items() if ".ortho_" in n}
    assert len(rotations) == 2 * 2 * len(fsdp_two_process.TARGETS)
    for name, (full, local) in shards.items():  # every parameter, frozen or trained, is split along dim 0
        assert local == [-(-full[0] // 2), *full[1:]] or local == [full[0] // 2, *full[1:]], (
            name,
            full,
            local,
        )
    assert rotations["base_model.model.model.layers.0.self_attn.q_proj.ortho_out.default.weight"] == [
        [4, 120],
        [2, 120],
    ]  # 4 blocks of 16x16 (120 free parameters each): 2 blocks per rank
    _torchrun(tmp_path / "fsdp", "--resume")
    fsdp_two_process.train(tmp_path / "single", fsdp=False)

    single = load_file(tmp_path / "single" / "adapter" / "adapter_model.safetensors")
    assert len(single) == 2 * 2 * len(fsdp_two_process.TARGETS)  # 2 layers x (in, out) rotations
    for run in ("adapter", "adapter-resumed"):
        sharded = load_file(tmp_path / "fsdp" / run / "adapter_model.safetensors")
        assert sharded.keys() == single.keys()
        for key, value in single.items():
            assert value.abs().max() > 0, key  # trained away from the identity (zero parameters)
            torch.testing.assert_close(
                sharded[key], value, rtol=1e-4, atol=1e-6, msg=f"{run} {key}: FSDP != 1 process"
            )


def test_fsdp_and_deepspeed_configs_parse():
    fsdp = load_config_from_file(str(ACCELERATE_CONFIGS / "fsdp.yaml"))
    assert fsdp.distributed_type == DistributedType.FSDP and fsdp.fsdp_config["fsdp_use_orig_params"] is True
    assert fsdp.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # the saved adapter is gathered
    zero2 = load_config_from_file(str(ACCELERATE_CONFIGS / "deepspeed_zero2.yaml"))
    assert zero2.distributed_type == DistributedType.DEEPSPEED and zero2.deepspeed_config["zero_stage"] == 2


def _launch(config: str, tmp_path: Path, train_args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / config),
         "--num_processes", "2", "--main_process_port", str(_free_port()), str(REPO / "scripts" / "finetune.py"),
         *train_args, "--output_dir", str(tmp_path / "out")],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _train_args(tiny_train_models, task_files) -> list[str]:
    train, dev = task_files("sst2", 16, 8)
    return ["--task_name", "sst2", "--model_name_or_path", tiny_train_models["bert"], "--train_file", train,
            "--validation_file", dev, "--max_train_steps", "1", "--report_to", "none"]  # fmt: skip


def test_fsdp_config_launches_and_refuses_cpu_clearly(tiny_train_models, task_files, tmp_path):
    """Two processes start under the FSDP config; on CPU the engine names the problem before loading a model."""
    done = _launch("fsdp.yaml", tmp_path, _train_args(tiny_train_models, task_files))
    assert done.returncode != 0
    assert "accelerate applies its FSDP plugin only on accelerator devices" in done.stderr, done.stderr[
        -3000:
    ]
    assert "configs/accelerate/cpu_ddp.yaml" in done.stderr
    assert not (tmp_path / "out").exists()


def test_deepspeed_config_launch_needs_deepspeed(tiny_train_models, task_files, tmp_path):
    """The DeepSpeed config reaches accelerate's DeepSpeed launcher, which asks for the deepspeed package."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        done = _launch("deepspeed_zero2.yaml", tmp_path, _train_args(tiny_train_models, task_files))
        assert done.returncode != 0 and "DeepSpeed is not installed" in done.stderr, done.stderr[-3000:]
    else:  # installed: the launcher must get past that check (a CPU machine then fails later, in DeepSpeed)
        done = _launch("deepspeed_zero2.yaml", tmp_path, _train_args(tiny_train_models, task_files))
        assert "DeepSpeed is not installed" not in done.stderr
