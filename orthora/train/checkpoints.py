"""Checkpoint folders on disk: their layout, which one to resume from, and whether it fits this run.

A checkpoint is ``output_dir/checkpoints/step_N``, written by accelerate into ``.step_N.tmp`` and renamed into place
only once complete (``progress.json`` marks it as orthora's), so a folder named ``step_N`` is always whole. Since a
checkpoint holds only the trainable tensors and is loaded with ``strict=False``, its tensor names and shapes are
checked against the run before loading: a gap would otherwise silently keep a tensor at its initial value. The
collective saving and loading itself stays with accelerate in the engine.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from .atomic_files import fsync_path, fsync_tree, write_json_atomic
from .config import ConfigError, TrainConfig

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
#: written last into a checkpoint folder; its presence marks the folder as a complete orthora checkpoint
PROGRESS_FILE = "progress.json"
_STEP_DIR = re.compile(r"step_(\d+)")


def _numbered_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every ``step_N`` entry under ``root``, oldest first (temporary ``.step_N.tmp`` ignored)."""
    return sorted((int(m.group(1)), p) for p in root.glob("step_*") if (m := _STEP_DIR.fullmatch(p.name)))


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step under ``output_dir/checkpoints`` (temporary folders ignored)."""
    steps = [(step, p) for step, p in _numbered_checkpoints(Path(output_dir) / CHECKPOINTS_DIR) if p.is_dir()]
    return max(steps)[1] if steps else None


def resolve_resume_dir(config: TrainConfig) -> Path | None:
    """The checkpoint ``config.resume_from_checkpoint`` names (``latest``: the newest, if any), checked to exist."""
    if not config.resume_from_checkpoint:
        return None
    if config.resume_from_checkpoint == "latest":
        latest = find_latest_checkpoint(config.output_dir)
        if latest is None:
            logger.warning(
                "resume_from_checkpoint=latest: no checkpoint in %s, starting from scratch", config.output_dir
            )
        return latest
    path = Path(config.resume_from_checkpoint)
    if not path.is_dir():
        raise ConfigError(
            f"resume_from_checkpoint {config.resume_from_checkpoint!r} is not a checkpoint folder"
        )
    if not (path / PROGRESS_FILE).is_file():
        raise ConfigError(
            f"resume_from_checkpoint {config.resume_from_checkpoint!r} holds no orthora checkpoint ({PROGRESS_FILE})"
        )
    return path


def checkpoint_folders(output_dir: str | os.PathLike, step: int) -> tuple[Path, Path]:
    """(the temporary folder accelerate writes the checkpoint of ``step`` into, the folder it is renamed to)."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    return root / f".step_{step}.tmp", root / f"step_{step}"


def publish_checkpoint(tmp: Path, final: Path, completed_steps: int, keep: int | None) -> None:
    """Mark the saved ``tmp`` complete, rename it durably to ``final``, and delete all but the newest ``keep``.

    Main process only, after every process has finished writing ``tmp``.
    """
    write_json_atomic(tmp / PROGRESS_FILE, {"completed_steps": completed_steps})
    fsync_tree(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_path(final.parent)
    if keep:
        for _, old in _numbered_checkpoints(final.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def check_checkpoint_tensors(checkpoint: Path, trainable: dict[str, torch.Tensor]) -> None:
    """Refuse a checkpoint whose weights are not exactly the ``trainable`` tensors of this run.

    The checkpoint holds only trainable tensors, so it is loaded with ``strict=False``, which would silently
    keep a missing tensor at its initial value.
    """
    files = sorted(checkpoint.glob("model*.safetensors"))
    if not files:
        if sorted(checkpoint.glob("pytorch_model*.bin")):
            files = sorted(checkpoint.glob("pytorch_model*.bin"))
        else:
            return  # a sharded FSDP/DeepSpeed state: accelerate checks it when loading
    saved: dict[str, tuple[int, ...]] = {}
    for file in files:
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), framework="pt") as handle:
                    for key in handle.keys():
                        saved[key.removeprefix("module.")] = tuple(handle.get_slice(key).get_shape())
            except Exception as err:  # safetensors raises its own error types for a damaged file
                raise ConfigError(
                    f"checkpoint file {file} is unreadable ({err}); resume from another one"
                ) from None
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
            saved.update({k.removeprefix("module."): tuple(v.shape) for k, v in state.items()})
    missing = sorted(set(trainable) - set(saved))
    unexpected = sorted(set(saved) - set(trainable))
    reshaped = sorted(k for k in set(saved) & set(trainable) if saved[k] != tuple(trainable[k].shape))
    if missing or unexpected or reshaped:
        details = []
        if missing:
            details.append(f"{len(missing)} trainable tensor(s) missing, e.g. {missing[0]}")
        if unexpected:
            details.append(f"{len(unexpected)} tensor(s) this run does not have, e.g. {unexpected[0]}")
        if reshaped:
            key = reshaped[0]
            details.append(
                f"{len(reshaped)} tensor(s) with another shape, e.g. {key}: checkpoint {saved[key]} vs run "
                f"{tuple(trainable[key].shape)}"
            )
        raise ConfigError(
            f"checkpoint {checkpoint} does not match this run's adapter ({'; '.join(details)}); resume with the "
            "adapter config it was saved with, or start without resume_from_checkpoint"
        )
