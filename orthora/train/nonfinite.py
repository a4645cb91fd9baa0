"""Guards against NaN/Inf in training: find a non-finite step, say where it came from, stop or skip, never save one.

A non-finite loss or gradient would otherwise be stepped into the weights and written to every later adapter and
checkpoint. The training loop asks `nonfinite_problem` once per optimizer step (one all-reduce, one host sync), hands
a problem to `handle_nonfinite` (which applies ``on_nonfinite``), and calls `check_finite_before_saving` before any
adapter or checkpoint is written, so what is on disk is always from before the bad step.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss or a gradient became NaN/Inf (``on_nonfinite=stop``), or a tensor about to be saved is not finite."""


def nonfinite_problem(
    accelerator: Accelerator,
    model: torch.nn.Module,
    trainable: dict[str, torch.nn.Parameter],
    window_loss: torch.Tensor,
    batch: dict[str, torch.Tensor],
    step: int,
) -> str | None:
    """None when optimizer step ``step``'s loss and gradients are finite on every process, else what is wrong.

    One all-reduce of two flags and one host sync per step. Under fp16 the gradient scaler already skips steps
    with non-finite gradients (and lowers its scale), so only the loss is checked there; DeepSpeed keeps its own.
    """
    flags = [~torch.isfinite(window_loss)]
    check_grads = accelerator.scaler is None and accelerator.distributed_type != DistributedType.DEEPSPEED
    grads = [p.grad for p in trainable.values() if p.grad is not None] if check_grads else []
    if grads:
        flags.append(~torch.isfinite(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]).sum()))
    if not accelerator.reduce(torch.stack(flags).float(), "sum").any():
        return None
    parts = []
    if not torch.isfinite(window_loss):
        parts.append(f"the loss is {window_loss.item()}")
        module = None
        if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            try:  # a best-effort diagnosis: it must never hide the report itself
                module = first_nonfinite_module(accelerator.unwrap_model(model), batch)
            except Exception as err:
                logger.warning("could not re-run the batch to locate the non-finite output: %s", err)
        if module:
            parts.append(f"the first non-finite output comes from module {module}")
    bad = [n for n, p in trainable.items() if p.grad is not None and not torch.isfinite(p.grad).all()]
    if bad:
        modules = sorted({n.rsplit(".", 1)[0] for n in bad})
        more = f" and {len(modules) - 3} more" if len(modules) > 3 else ""
        parts.append(f"non-finite gradients in module(s) {', '.join(modules[:3])}{more}")
    if not parts:
        parts.append("another process saw a non-finite loss or gradient")
    return f"step {step}: " + "; ".join(parts)


def first_nonfinite_module(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> str | None:
    """Re-run ``batch`` and name the first module (in execution order) whose output holds a NaN or Inf."""
    names = {module: name for name, module in model.named_modules()}
    found: list[str] = []

    def tensors_of(output: Any) -> list[torch.Tensor]:
        if isinstance(output, torch.Tensor):
            return [output]
        values = (
            output.values()
            if isinstance(output, dict)
            else output
            if isinstance(output, (tuple, list))
            else ()
        )
        return [t for t in values if isinstance(t, torch.Tensor)]

    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        if not found and any(
            t.is_floating_point() and not torch.isfinite(t).all() for t in tensors_of(output)
        ):
            found.append(names.get(module) or type(module).__name__)

    handles = [module.register_forward_hook(hook) for module in model.modules()]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def handle_nonfinite(problem: str, on_nonfinite: str) -> None:
    """Raise `TrainingDiverged` (``on_nonfinite=stop``: nothing more is written), else warn that the step is skipped."""
    if on_nonfinite == "skip":
        logger.warning("%s; this step's update was skipped (on_nonfinite=skip)", problem)
        return
    raise TrainingDiverged(
        f"{problem}. Training stopped (on_nonfinite=stop); the adapter and checkpoints on disk are from before "
        "this step. Lower the learning rate, check the data, or set on_nonfinite=skip."
    )


def check_finite_before_saving(trainable: dict[str, torch.nn.Parameter], what: str, step: int) -> None:
    """Refuse to write ``what`` (an adapter or checkpoint at ``step``) when a trainable tensor is NaN/Inf."""
    bad = [n for n, p in trainable.items() if not torch.isfinite(p.detach()).all()]
    if bad:
        raise TrainingDiverged(
            f"step {step}: refusing to save the {what}: {len(bad)} trainable tensor(s) are not finite, e.g. {bad[0]}"
        )
