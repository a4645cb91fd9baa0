"""Matched trainable-parameter budgets: every method sized to orthora's budget at one block size.

orthora's budget is counted from the parametrization's free parameters per block (`orthora.rotations`), never from a
formula written again here; PEFT's methods are sized to it, and `trainable_params` counts what PEFT really
instantiates on each distinct layer shape (BOFT, for one, silently changes its config without its CUDA extension).
"""

from __future__ import annotations

import collections
import functools
import json
import warnings
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from orthora.rotations import PARAMETRIZATIONS, get_parametrization
from orthora.train.adapters import build_adapter_config

#: the exact orthogonal maps (every target row of the cost profiles), from orthora's parametrization table
EXACT = tuple(name for name, spec in PARAMETRIZATIONS.items() if spec.exact)

#: named method sets for ``--methods``
METHOD_SETS = {
    "small": [
        "lora",
        "orthora-cayley-output",
        "orthora-householder-output",
        "oft-cayley_neumann",
        "oft-cayley",
    ],
    "targets": [
        "lora",
        "orthora-cayley-output",
        "orthora-exp-output",
        "orthora-householder-output",
        "orthora-cayley-input",
        "oft-cayley_neumann",
        "oft-cayley",
    ],
    "smoke": ["lora", "orthora-cayley-output", "oft-cayley"],
    "peers": ["lora", "orthora-cayley-output", "orthora-householder-output", "hra", "boft"],
    "pair": ["lora", "orthora-cayley-output"],
    "sides": ["lora", "orthora-cayley-output", "orthora-cayley-input", "orthora-cayley-both", "orthora"],
    "llm": [
        "lora",
        *(f"orthora-{p}-{side}" for p in EXACT for side in ("output", "input")),
        "oft-cayley_neumann",
        "oft-cayley",
    ],
}

Widths = list[tuple[int, int]]


@dataclass
class MethodSpec:
    """One adapter configuration: ``kind`` is orthora or a PEFT method name, ``kwargs`` go to its config class."""

    name: str
    kind: str
    kwargs: dict = field(default_factory=dict)


def targeted_widths(model: nn.Module, targets: list[str]) -> Widths:
    """``(d_in, d_out)`` of every linear layer the targets select, to size matched budgets."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            out.append((module.in_features, module.out_features))
    return out


def peft_config(method: MethodSpec, targets: list[str]) -> Any:
    """The adapter config of ``method`` on ``targets``, through the training engine's method table."""
    return build_adapter_config(
        method.kind, {**method.kwargs, "target_modules": list(targets)}, task_type=None
    )


def orthora_budget(
    widths: Widths,
    block_size: int,
    parametrization: str = "cayley",
    side: str = "output",
    num_reflections: int = 2,
) -> int:
    """Trainable parameters of orthora on ``widths``: the table's free parameters per block times blocks."""
    per_block = get_parametrization(parametrization).num_params(block_size, num_reflections)
    total = 0
    for d_in, d_out in widths:
        rotated = {"output": (d_out,), "input": (d_in,), "both": (d_in, d_out)}[side]
        total += sum(d // block_size * per_block for d in rotated)
    return total


@functools.cache
def _layer_trainable_params(kind: str, kwargs_json: str, d_in: int, d_out: int) -> int | None:
    """Trainable parameters the method really creates on one ``d_in -> d_out`` linear (None: config invalid)."""
    from peft import get_peft_model

    import orthora  # noqa: F401  (registers the method with PEFT)

    layer = nn.Sequential()
    layer.add_module("proj", nn.Linear(d_in, d_out))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(
                layer, peft_config(MethodSpec(kind, kind, json.loads(kwargs_json)), ["proj"])
            )
    except (ValueError, RuntimeError):
        return None
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def trainable_params(method: MethodSpec, widths: Widths) -> int | None:
    """``method``'s trainable parameters over ``widths``, counted on instantiated layers (one per distinct shape)."""
    key = json.dumps(method.kwargs, sort_keys=True)
    total = 0
    for (d_in, d_out), n in collections.Counter(widths).items():
        per = _layer_trainable_params(method.kind, key, d_in, d_out)
        if per is None:
            return None
        total += n * per
    return total


def boft_trainable_params(widths: Widths, block: int, factors: int) -> int | None:
    """BOFT's trainable parameters over ``widths`` (None when PEFT refuses the config on some shape)."""
    kwargs = dict(boft_block_size=block, boft_n_butterfly_factor=factors)
    return trainable_params(MethodSpec("boft", "boft", kwargs), widths)


def _even(x: float) -> int:
    return max(2, 2 * round(x / 2))


def closest_boft(widths: Widths, budget: float) -> tuple[int, int] | None:
    """The (block, butterfly factors) pair whose instantiated trainable-parameter count is closest to ``budget``."""
    best = None
    for bb in (2, 4, 8, 16, 32, 64):
        for n in (1, 2, 3):
            if not all(i % (bb * 2 ** (n - 1)) == 0 for i, _ in widths):
                continue
            count = boft_trainable_params(widths, bb, n)
            if count is None:
                continue
            err = abs(count - budget)
            if best is None or err < best[0]:
                best = (err, bb, n)
    return None if best is None else best[1:]


def matched_methods(widths: Widths, block_size: int, which: str = "all") -> list[MethodSpec]:
    """Methods at (approximately) orthora's trainable-parameter budget with ``block_size`` on the output side.

    Budget P = sum_d d_out (b-1)/2. LoRA r = round(P / sum(d_in + d_out)); OFT uses the same block size (its
    budget is d_in (b-1)/2, equal when sum d_in = sum d_out); HRA r = even(P / sum d_in); Householder reflections =
    even(P / sum d_out); side="both" uses block b/2 on each side; BOFT: the (block, butterfly factors) pair whose
    *instantiated* PEFT layers have the trainable-parameter count closest to P (PEFT stores full b'xb' blocks and
    silently drops to one butterfly factor when its CUDA extension is unavailable, so a formula would be wrong).
    """
    if which != "all" and which not in METHOD_SETS:
        raise ValueError(f"unknown method set {which!r}; valid: all, {', '.join(METHOD_SETS)}")
    b = block_size
    sum_in = sum(i for i, _ in widths)
    sum_out = sum(o for _, o in widths)
    budget = orthora_budget(widths, b)
    lora_r = max(1, round(budget / (sum_in + sum_out)))
    hra_r = _even(budget / sum_in)
    per_reflection = get_parametrization("householder").num_params(b, num_reflections=1)
    refl = _even(budget / (sum_out // b) / per_reflection)  # reflections per block at the same budget
    half = max(2, b // 2)

    def ortho(p: str, side: str = "output", bs: int = b, **kw: Any) -> MethodSpec:
        return MethodSpec(
            f"orthora-{p}-{side}",
            "orthora",
            dict(parametrization=p, side=side, block_size=bs, magnitude=False, **kw),  # rotations alone
        )

    methods = {
        "lora": MethodSpec(
            f"lora-r{lora_r}", "lora", dict(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0)
        ),
        # the default OrthoConfig() as shipped, whatever b is
        "orthora": MethodSpec("orthora", "orthora", {}),
        "orthora-cayley-output": ortho("cayley"),
        "orthora-cayley_neumann-output": ortho("cayley_neumann"),
        "orthora-exp-output": ortho("exp"),
        "orthora-householder-output": ortho("householder", num_reflections=refl),
        "orthora-cayley-input": ortho("cayley", "input"),
        "orthora-cayley-both": ortho("cayley", "both", half),
        "orthora-exp-input": ortho("exp", "input"),
        "orthora-householder-input": ortho("householder", "input", num_reflections=refl),
        "orthora-cayley_neumann-input": ortho("cayley_neumann", "input"),
        "orthora-exp-both": ortho("exp", "both", half),
        "orthora-householder-both": ortho("householder", "both", half, num_reflections=_even(refl / 2)),
        "orthora-cayley_neumann-both": ortho("cayley_neumann", "both", half),
        "oft-cayley_neumann": MethodSpec(
            "oft-cayley_neumann", "oft", dict(r=0, oft_block_size=b, use_cayley_neumann=True)
        ),
        "oft-cayley": MethodSpec("oft-cayley", "oft", dict(r=0, oft_block_size=b, use_cayley_neumann=False)),
        "hra": MethodSpec(f"hra-r{hra_r}", "hra", dict(r=hra_r)),
    }
    boft = closest_boft(widths, budget) if which in ("all", "peers") else None
    if boft is not None:
        methods["boft"] = MethodSpec(
            f"boft-b{boft[0]}n{boft[1]}",
            "boft",
            dict(boft_block_size=boft[0], boft_n_butterfly_factor=boft[1]),
        )
    names = list(methods) if which == "all" else METHOD_SETS[which]
    return [methods[m] for m in names if m in methods]
