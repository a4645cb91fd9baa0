"""The quality sweep's methods: which adapters it benchmarks, at which budget tier, and where their LR grids start.

`method_table` sizes LoRA, OFT, BOFT, HRA and orthora to LoRA r=8's budget on MiniLM's real layer shapes (and a
half tier); `resolve_method` adds bracketed variants (``orthora[side=both]``) without adding them to the table. A
method's `QualityMethod.fingerprint` hashes its fully resolved adapter config, so runs of an older default never mix
with the current one.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Sequence
from typing import Any

from orthora.config import OrthoConfig
from orthora.train.adapters import build_adapter_config

from .budgets import MethodSpec, matched_methods, targeted_widths, trainable_params
from .models import minilm_path

#: where each method's learning-rate grid starts (three neighbours on `orthora.bench.quality_plan.LR_LADDER`)
DEFAULT_START_LRS = (3e-4, 1e-3, 3e-3)


@dataclasses.dataclass(frozen=True)
class QualityMethod:
    """A benchmarked method: its adapter config (``spec``), budget tier and where its LR grid starts."""

    name: str
    spec: MethodSpec
    tier: str  # "matched" (LoRA r=8's budget) or "half"
    start_lrs: tuple[float, ...] = DEFAULT_START_LRS

    @functools.cached_property
    def resolved_config(self) -> dict[str, Any]:
        """The adapter config this method trains with, every default filled in (targets and task left out)."""
        config = build_adapter_config(self.spec.kind, dict(self.spec.kwargs), task_type=None).to_dict()
        for key in (
            "target_modules",
            "task_type",
            "base_model_name_or_path",
            "revision",
            "inference_mode",
            "peft_version",
            "format_version",  # the file layout, not the method: a new layout must not orphan finished runs
        ):
            config.pop(key, None)
        return json.loads(json.dumps(config, sort_keys=True, default=str))

    @functools.cached_property
    def fingerprint(self) -> str:
        """A short hash of `resolved_config`: runs of an older default (e.g. ``orthora`` before a default changed)
        have another fingerprint, so they are never mixed with the current one."""
        return hashlib.sha1(json.dumps(self.resolved_config, sort_keys=True).encode()).hexdigest()[:8]


def parse_method_name(name: str) -> tuple[str, dict[str, Any]]:
    """``"orthora[side=output,block_size=16]"`` -> ``("orthora", {"side": "output", "block_size": 16})``.

    The bracket form benchmarks a variant without adding it to the table; values are parsed as JSON when they can be.
    """
    if "[" not in name:
        return name, {}
    if not name.endswith("]"):
        raise ValueError(f"method {name!r}: a variant is written base[key=value,...]")
    base, body = name[:-1].split("[", 1)
    kwargs: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in body.split(","))):
        if "=" not in item:
            raise ValueError(f"method {name!r}: {item!r} is not key=value")
        key, raw = (s.strip() for s in item.split("=", 1))
        try:
            kwargs[key] = json.loads(raw)
        except json.JSONDecodeError:
            kwargs[key] = raw
    return base, kwargs


def method_table(targets: Sequence[str]) -> dict[str, QualityMethod]:
    """The benchmarked methods on ``targets``, sized by `orthora.bench.budgets` on MiniLM's real layer shapes.

    ``orthora`` is ``OrthoConfig()`` exactly as shipped (only ``target_modules`` is set), so the table measures the
    default users get; ``orthora-output`` is the method's original output-side form.
    """
    widths = minilm_widths(targets)
    matched = _peers(matched_methods(widths, 32))
    half = _peers(matched_methods(widths, 16, "small"))
    default_block = OrthoConfig().block_size
    table = [
        QualityMethod("lora", _renamed(matched["lora"], "lora"), "matched"),
        QualityMethod("oft", _renamed(matched["oft"], "oft"), "matched"),
        QualityMethod("boft", _renamed(matched["boft"], "boft"), "matched") if "boft" in matched else None,
        QualityMethod("hra", _renamed(matched["hra"], "hra"), "matched"),
        QualityMethod("orthora", MethodSpec("orthora", "orthora", {}), "matched"),
        QualityMethod(  # the default's rotation on the output side, at LoRA r=8's budget like the others
            "orthora-output",
            MethodSpec("orthora-output", "orthora", {"side": "output", "block_size": 32, "magnitude": False}),
            "matched",
        ),
        QualityMethod("lora-half", _renamed(half["lora"], "lora-half"), "half"),
        QualityMethod("oft-half", _renamed(half["oft"], "oft-half"), "half"),
        QualityMethod(  # the default with half its block size: half its parameters
            "orthora-half", MethodSpec("orthora-half", "orthora", {"block_size": default_block // 2}), "half"
        ),
    ]
    return {m.name: dataclasses.replace(m, start_lrs=start_lrs(m.spec)) for m in table if m is not None}


def _peers(specs: Sequence[MethodSpec]) -> dict[str, MethodSpec]:
    """The PEFT peers among `matched_methods`' specs, keyed by method (OFT in PEFT's default Cayley-Neumann form)."""
    out = {}
    for spec in specs:
        if spec.kind in ("lora", "hra", "boft") or spec.name == "oft-cayley_neumann":
            out[spec.kind] = spec
    return out


def _renamed(spec: MethodSpec, name: str) -> MethodSpec:
    return MethodSpec(name, spec.kind, dict(spec.kwargs))


def resolve_method(name: str, targets: Sequence[str]) -> QualityMethod:
    """A table method, or a bracketed variant of one (``orthora[side=both]``), with a clear error otherwise."""
    table = method_table(targets)
    base, extra = parse_method_name(name)
    if base not in table:
        raise ValueError(
            f"unknown quality method {base!r}; valid: {', '.join(table)} (or base[key=value,...])"
        )
    method = table[base]
    if not extra:
        return method
    spec = MethodSpec(name, method.spec.kind, {**method.spec.kwargs, **extra})
    return QualityMethod(name, spec, method.tier, start_lrs(spec))


def start_lrs(spec: MethodSpec) -> tuple[float, ...]:
    """Where a method's LR grid starts: one ladder step higher for rotations with ``generator_scale="auto"`` (the
    default), which turn ~10x less per unit of learning rate than a raw generator."""
    config = build_adapter_config(spec.kind, dict(spec.kwargs), task_type=None)
    if getattr(config, "generator_scale", None) == "auto":
        return tuple(float(f"{lr * 10 / 3:.0e}") for lr in DEFAULT_START_LRS)
    return DEFAULT_START_LRS


def minilm_widths(targets: Sequence[str]) -> list[tuple[int, int]]:
    """``(d_in, d_out)`` of the MiniLM linears ``targets`` select: its config built on the meta device (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(AutoConfig.from_pretrained(minilm_path()))
    return targeted_widths(model, list(targets))


def adapter_params(method: QualityMethod, targets: Sequence[str]) -> int | None:
    """The method's adapter parameters on MiniLM's ``targets`` (heads excluded), counted on instantiated layers."""
    return trainable_params(method.spec, minilm_widths(targets))
