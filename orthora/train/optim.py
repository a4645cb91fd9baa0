"""Optimizer parameter groups for adapter training, usable with any loop, the HF Trainer or accelerate.

The task head (PEFT's ``modules_to_save`` copies, e.g. a classifier) can train at its own learning rate: a fast head
next to a slow adapter pushes the pretrained encoder much less for about the same task score (docs/benchmarks.md,
"Results so far").
"""

from __future__ import annotations

from typing import Any, Optional

import torch

#: parameter-name fragments that get no weight decay (biases and normalisation weights)
NO_DECAY = ("bias", "layernorm", "layer_norm", "norm.weight")
#: the name fragment of PEFT's trainable copies of whole modules (``modules_to_save``: the task head)
HEAD_MARKER = ".modules_to_save."


def parameter_groups(
    model: torch.nn.Module, *, weight_decay: float = 0.0, head_learning_rate: Optional[float] = None
) -> list[dict[str, Any]]:
    """AdamW-style groups of ``model``'s trainable parameters.

    Weight decay is off for biases and norms; with ``head_learning_rate`` the head's groups carry that ``lr`` and
    the others take the optimizer's. A learning-rate scheduler then scales every group's peak rate alike.

    >>> optimizer = torch.optim.AdamW(parameter_groups(model, head_learning_rate=1e-2), lr=1e-3)  # doctest: +SKIP
    """
    if head_learning_rate is not None and head_learning_rate <= 0:
        raise ValueError(f"head_learning_rate must be positive or None, got {head_learning_rate}")
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not any(k in name.lower() for k in NO_DECAY)
        head = head_learning_rate is not None and HEAD_MARKER in name
        groups.setdefault((decay, head), []).append(param)
    return [
        {
            "params": params,
            "weight_decay": weight_decay if decay else 0.0,
            **({"lr": head_learning_rate} if head else {}),
        }
        for (decay, head), params in sorted(groups.items(), key=lambda item: (not item[0][0], item[0][1]))
    ]
