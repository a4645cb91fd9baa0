"""Run ``orthora-finetune`` in this process and SIGKILL it at a chosen point (driven by test_reliability_kill.py).

``python kill_driver.py optimizer N -- ARGS``: killed when the N-th optimizer step starts (mid training step).
``python kill_driver.py save FILE_NAME N -- ARGS``: the N-th write of a safetensors file named FILE_NAME stops after
half of its bytes reach the disk, then the process is killed (mid checkpoint or mid adapter write).
"""

from __future__ import annotations

import os
import signal
import sys

import accelerate.utils.other
import peft.peft_model
import safetensors.torch
import torch

from orthora.train.cli import main


def kill_now() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at_optimizer_step(count: int) -> None:
    original = torch.optim.AdamW.step
    calls = [0]

    def step(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == count:
            kill_now()
        return original(self, *args, **kwargs)

    torch.optim.AdamW.step = step


def kill_mid_write(file_name: str, count: int) -> None:
    original = safetensors.torch.save_file
    calls = [0]

    def save_file(tensors, filename, metadata=None):
        if os.path.basename(str(filename)) == file_name:
            calls[0] += 1
            if calls[0] == count:
                data = safetensors.torch.save(tensors, metadata=metadata)
                with open(filename, "wb") as handle:
                    handle.write(data[: len(data) // 2])
                    handle.flush()
                    os.fsync(handle.fileno())
                kill_now()
        return original(tensors, filename, metadata=metadata)

    # accelerate (checkpoints) and PEFT (adapters) bind save_file at import time
    accelerate.utils.other.safe_save_file = save_file
    peft.peft_model.safe_save_file = save_file


if __name__ == "__main__":
    separator = sys.argv.index("--")
    point, args = sys.argv[1:separator], sys.argv[separator + 1 :]
    if point[0] == "optimizer":
        kill_at_optimizer_step(int(point[1]))
    else:
        kill_mid_write(point[1], int(point[2]))
    sys.exit(main(args))
