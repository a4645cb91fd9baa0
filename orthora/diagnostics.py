"""What fine-tuning changed: rotation angles, distance from the identity, weight change and hyperspherical energy.

:func:`layer_report` gives one row per adapted module and side; :func:`model_summary` aggregates the rows for the
whole model; :func:`representation_shift` compares hidden states of the base and the adapted model on a probe batch.

They work for orthora adapters (from the exact blocks ``R``), for PEFT's OFT (from its block-diagonal ``R``) and
for PEFT's LoRA, which has no ``R``: its rows carry only the quantities of the effective weight change
``W' = W + BA`` (relative change, hyperspherical energy), and ``None`` for the rotation columns.

Hyperspherical energy (the OFT paper's measure of how neurons spread on the sphere) is
``sum_{i<j} 1 / ||w_i/||w_i|| - w_j/||w_j||||`` over the rows ``w_i`` of the weight seen as ``(d_out, -1)``. It is
computed exactly, in float64 and in chunks of rows, for layers with at most ``max_neurons`` rows; larger layers (an
embedding matrix) use a fixed random sample of ``max_neurons`` rows (the same rows for the base and the adapted
weight) and scale the sampled pair mean to all ``n(n-1)/2`` pairs. Pairs closer than ``1e-12`` (duplicated
neurons) count as ``1e12``. An input-side rotation (``W' = W R``, the OFT form) rotates every row by the same
``R`` and keeps the energy exactly; an output-side rotation (``W' = R W``) mixes rows and in general changes it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from . import rotations
from .layer import OrthoLayer

__all__ = [
    "REPORT_KEYS",
    "SUMMARY_KEYS",
    "block_angles",
    "hyperspherical_energy",
    "layer_report",
    "model_summary",
    "representation_shift",
]

#: Keys of every :func:`layer_report` row (rotation columns are ``None`` for methods without a rotation).
REPORT_KEYS = (
    "module",
    "adapter",
    "side",
    "method",
    "trainable_params",
    "orthogonality_error",
    "distance_from_identity",
    "max_angle",
    "mean_angle",
    "relative_weight_change",
    "weight_norm",
    "weight_change_norm",
    "hyperspherical_energy_base",
    "hyperspherical_energy_adapted",
)

#: Keys of :func:`model_summary`.
SUMMARY_KEYS = (
    "num_rows",
    "methods",
    "trainable_params",
    "max_orthogonality_error",
    "mean_distance_from_identity",
    "max_distance_from_identity",
    "max_angle",
    "mean_angle",
    "relative_weight_change",
    "hyperspherical_energy_base",
    "hyperspherical_energy_adapted",
    "hyperspherical_energy_relative_change",
)

DEFAULT_MAX_NEURONS = 4096
_ENERGY_CHUNK = 1024
_MIN_DISTANCE = 1e-12


# ------------------------------------------------------------------------------------------------ pure functions
def block_angles(blocks: torch.Tensor) -> torch.Tensor:
    """Eigen-angles ``|arg(lambda)|`` in ``[0, pi]`` of every ``(k, b, b)`` orthogonal block, flattened to ``(k*b,)``."""
    eigenvalues = torch.linalg.eigvals(blocks.detach().to(torch.float64))
    return eigenvalues.angle().abs().reshape(-1)


def hyperspherical_energy(
    weight: torch.Tensor, max_neurons: int = DEFAULT_MAX_NEURONS, seed: int = 0
) -> float:
    """``sum_{i<j} 1/||u_i - u_j||`` over the normalised rows ``u_i`` of ``weight`` (``(n, ...)``, seen as ``(n, -1)``).

    Exact for ``n <= max_neurons``; otherwise estimated from a seeded random sample of ``max_neurons`` rows (see the
    module docstring). Computed in float64, ``_ENERGY_CHUNK`` rows at a time, so memory stays ``O(chunk * n)``.
    """
    rows = weight.detach().reshape(weight.shape[0], -1).to(torch.float64)
    n = rows.shape[0]
    if n < 2:
        return 0.0
    if n > max_neurons:
        generator = torch.Generator().manual_seed(seed)
        rows = rows[torch.randperm(n, generator=generator)[:max_neurons].to(rows.device)]
    units = rows / rows.norm(dim=1, keepdim=True).clamp_min(_MIN_DISTANCE)
    m = units.shape[0]
    total = 0.0
    for start in range(0, m, _ENERGY_CHUNK):
        chunk = units[start : start + _ENERGY_CHUNK]
        # ||u_i - u_j||^2 = 2 - 2 u_i.u_j for unit rows (float64 keeps close pairs accurate enough)
        squared = (2.0 - 2.0 * chunk @ units.T).clamp_min(_MIN_DISTANCE**2)
        inverse = squared.rsqrt()
        rows_idx = torch.arange(start, start + chunk.shape[0], device=units.device)
        keep = torch.arange(m, device=units.device)[None, :] > rows_idx[:, None]  # pairs i < j only
        total += float(inverse[keep].sum())
    if n > max_neurons:
        total *= (n * (n - 1)) / (m * (m - 1))
    return total


def _rotation_columns(blocks: torch.Tensor, num_blocks: int) -> dict[str, float]:
    """Orthogonality error, ``||R - I||_F`` of the full block-diagonal ``R`` and its eigen-angles."""
    blocks = blocks.detach().to(torch.float64)
    copies = num_blocks // blocks.shape[0]  # a shared block stands for num_blocks identical blocks
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    distance = math.sqrt(copies * float(((blocks - eye) ** 2).sum()))
    angles = block_angles(blocks)
    return {
        "orthogonality_error": float(rotations.orthogonality_error(blocks)),
        "distance_from_identity": distance,
        "max_angle": float(angles.max()),
        "mean_angle": float(angles.mean()),
    }


def _weight_columns(
    base: torch.Tensor, adapted: torch.Tensor, energy: bool, max_neurons: int
) -> dict[str, Optional[float]]:
    base = base.detach().to(torch.float64)
    adapted = adapted.detach().to(torch.float64)
    weight_norm = float(base.norm())
    change = float((adapted - base).norm())
    return {
        "relative_weight_change": change / weight_norm if weight_norm > 0 else float("nan"),
        "weight_norm": weight_norm,
        "weight_change_norm": change,
        "hyperspherical_energy_base": hyperspherical_energy(base, max_neurons) if energy else None,
        "hyperspherical_energy_adapted": hyperspherical_energy(adapted, max_neurons) if energy else None,
    }


def _empty_rotation_columns() -> dict[str, None]:
    return dict.fromkeys(("orthogonality_error", "distance_from_identity", "max_angle", "mean_angle"))


# ---------------------------------------------------------------------------------------------- per method rows
def _orthora_rows(layer: OrthoLayer, adapter: str, energy: bool, max_neurons: int) -> list[dict[str, Any]]:
    rows = []
    with torch.no_grad():
        weight, bias = layer._base_float32()
        for side, table in (("output", layer.ortho_out), ("input", layer.ortho_in)):
            if adapter not in table:
                continue
            rotation = table[adapter]
            blocks = rotation.blocks()
            out_blocks, in_blocks = (blocks, None) if side == "output" else (None, blocks)
            adapted, _ = layer._fold(weight, bias, out_blocks, in_blocks)
            # the "neurons" are rows of the (d_out, d_in, ...) weight, whatever the storage layout (Conv1D)
            row = {
                "side": side,
                "method": f"orthora-{rotation.parametrization}",
                "trainable_params": rotation.weight.numel(),
                **_rotation_columns(blocks, rotation.num_blocks),
                **_weight_columns(
                    layer._weight_out_in(weight), layer._weight_out_in(adapted), energy, max_neurons
                ),
            }
            rows.append(row)
        if adapter in layer.ortho_magnitude:  # magnitude=True: y = s * R f(x), a per-output-feature scale
            scale = layer.ortho_magnitude[adapter].weight
            adapted, _ = layer._scale_weight(weight, bias, scale)
            rows.append(
                {
                    "side": "magnitude",
                    "method": "orthora-magnitude",
                    "trainable_params": scale.numel(),
                    **_empty_rotation_columns(),
                    **_weight_columns(
                        layer._weight_out_in(weight), layer._weight_out_in(adapted), energy, max_neurons
                    ),
                }
            )
    return rows


def _peft_oft_rows(layer: nn.Module, adapter: str, energy: bool, max_neurons: int) -> list[dict[str, Any]]:
    module = layer.oft_R[adapter]
    if layer.get_base_layer().weight.dim() != 2:
        raise TypeError(
            f"diagnostics support PEFT OFT on linear layers only, got {type(layer.get_base_layer()).__name__}"
        )
    with torch.no_grad():
        dense = module.get_weight().to(torch.float64)  # block-diagonal (d_in, d_in); merge is W' = W R^T
        size = module.block_size
        num_blocks = dense.shape[0] // size
        blocks = torch.stack(
            [dense[i * size : (i + 1) * size, i * size : (i + 1) * size] for i in range(num_blocks)]
        )
        weight = layer.get_base_layer().weight.detach().to(torch.float64)
        adapted = weight @ dense.T
    return [
        {
            "side": "input",
            "method": "peft-oft",
            "trainable_params": module.weight.numel(),
            **_rotation_columns(blocks, num_blocks),
            **_weight_columns(weight, adapted, energy, max_neurons),
        }
    ]


def _peft_lora_rows(layer: nn.Module, adapter: str, energy: bool, max_neurons: int) -> list[dict[str, Any]]:
    base = layer.get_base_layer()
    with torch.no_grad():
        delta = layer.get_delta_weight(adapter).to(torch.float64)
        weight = base.weight.detach().to(torch.float64)
        if getattr(
            layer, "fan_in_fan_out", False
        ):  # GPT-2 Conv1D stores (in, out); rows must be output neurons
            weight, delta = weight.T, delta.T
    params = sum(
        p.numel()
        for table_name in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
        if adapter in getattr(layer, table_name, {})
        for p in _parameters(getattr(layer, table_name)[adapter])
    )
    return [
        {
            "side": "weight",
            "method": "peft-lora",
            "trainable_params": params,
            **_empty_rotation_columns(),
            **_weight_columns(weight, weight + delta, energy, max_neurons),
        }
    ]


def _parameters(entry: Any) -> list[torch.Tensor]:
    return list(entry.parameters()) if isinstance(entry, nn.Module) else [entry]


def _layer_adapters(layer: BaseTunerLayer, adapter_name: Optional[str]) -> list[str]:
    present = set()
    for table_name in layer.adapter_layer_names:
        table = getattr(layer, table_name, None)
        if isinstance(table, (Mapping, nn.ModuleDict, nn.ParameterDict)):
            present |= set(table.keys())
    if adapter_name is not None:
        return [adapter_name] if adapter_name in present else []
    return [a for a in layer.active_adapters if a in present]


def _method_of(layer: BaseTunerLayer) -> str:
    if isinstance(layer, OrthoLayer):
        return "orthora"
    names = set(layer.adapter_layer_names)
    if "oft_R" in names:
        return "oft"
    if "lora_A" in names:
        return "lora"
    return type(layer).__name__


_ROWS_BY_METHOD = {"orthora": _orthora_rows, "oft": _peft_oft_rows, "lora": _peft_lora_rows}


def _module_name(name: str) -> str:
    """Module names as in the plain transformers model (without PeftModel's ``base_model.model.``)."""
    prefix = "base_model.model."
    return name[len(prefix) :] if name.startswith(prefix) else name


def layer_report(
    model: nn.Module,
    adapter_name: Optional[str] = None,
    *,
    energy: bool = True,
    max_neurons: int = DEFAULT_MAX_NEURONS,
) -> list[dict[str, Any]]:
    """One row per adapted module and side (keys :data:`REPORT_KEYS`), for orthora, PEFT OFT and PEFT LoRA layers.

    ``adapter_name=None`` reports the adapters active in each layer. ``energy=False`` skips the hyperspherical
    energy (the only part whose cost grows with ``d_out^2``). Raises a ValueError naming the adapter if no layer
    holds it, and a TypeError naming the layer type for PEFT methods without a report.
    """
    rows: list[dict[str, Any]] = []
    known: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        method = _method_of(module)
        for table_name in module.adapter_layer_names:
            table = getattr(module, table_name, None)
            if isinstance(table, (Mapping, nn.ModuleDict, nn.ParameterDict)):
                known |= set(table.keys())
        adapters = _layer_adapters(module, adapter_name)
        if not adapters:
            continue
        if method not in _ROWS_BY_METHOD:
            raise TypeError(
                f"{name}: no diagnostics for {type(module).__name__}; supported are orthora, PEFT LoRA and PEFT OFT layers"
            )
        for adapter in adapters:
            if adapter in getattr(module, "merged_adapters", ()):
                raise ValueError(
                    f"{name}: adapter {adapter!r} is merged into the base weights, so the base weights are no longer "
                    "known; call unmerge_adapter() before layer_report"
                )
            for row in _ROWS_BY_METHOD[method](module, adapter, energy, max_neurons):
                rows.append({"module": _module_name(name), "adapter": adapter, **row})
    if adapter_name is not None and adapter_name not in known:
        raise ValueError(
            f"no adapted layer holds adapter {adapter_name!r}; adapters present: {sorted(known) or 'none'}"
        )
    return [{key: row[key] for key in REPORT_KEYS} for row in rows]


def _values(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [row[key] for row in rows if row.get(key) is not None]


def model_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Whole-model numbers from :func:`layer_report` rows (keys :data:`SUMMARY_KEYS`; ``None`` where undefined).

    The relative weight change is ``sqrt(sum ||W' - W||^2) / sqrt(sum ||W||^2)`` over all rows; energies are summed.
    """
    distances = _values(rows, "distance_from_identity")
    mean_angles = _values(rows, "mean_angle")
    norms = _values(rows, "weight_norm")
    changes = _values(rows, "weight_change_norm")
    energy_base = _values(rows, "hyperspherical_energy_base")
    energy_adapted = _values(rows, "hyperspherical_energy_adapted")
    total_base = sum(energy_base) if energy_base else None
    total_adapted = sum(energy_adapted) if energy_adapted else None
    return {
        "num_rows": len(rows),
        "methods": sorted({row["method"] for row in rows}),
        "trainable_params": sum(row["trainable_params"] for row in rows),
        "max_orthogonality_error": max(_values(rows, "orthogonality_error"), default=None),
        "mean_distance_from_identity": sum(distances) / len(distances) if distances else None,
        "max_distance_from_identity": max(distances, default=None),
        "max_angle": max(_values(rows, "max_angle"), default=None),
        "mean_angle": sum(mean_angles) / len(mean_angles) if mean_angles else None,
        "relative_weight_change": (
            math.sqrt(sum(c * c for c in changes)) / math.sqrt(sum(n * n for n in norms)) if norms else None
        ),
        "hyperspherical_energy_base": total_base,
        "hyperspherical_energy_adapted": total_adapted,
        "hyperspherical_energy_relative_change": (
            (total_adapted - total_base) / total_base if total_base else None
        ),
    }


# ------------------------------------------------------------------------------------------ representations
def _hidden_states(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "label")}
    outputs = model(**inputs, output_hidden_states=True)
    for key in ("hidden_states", "decoder_hidden_states"):
        states = getattr(outputs, key, None)
        if states is not None:
            return tuple(states)
    raise ValueError(
        f"{type(model).__name__} returned no hidden states with output_hidden_states=True; "
        "representation_shift needs a transformers model"
    )


@torch.no_grad()
def representation_shift(
    base_model: Optional[nn.Module], adapted_model: nn.Module, batch: Mapping[str, torch.Tensor]
) -> dict[str, Any]:
    """Cosine similarity between the base and the adapted hidden states of every layer on a probe ``batch``.

    Averaged over the non-padding tokens (``attention_mask``). ``base_model=None`` uses ``adapted_model`` with its
    adapters disabled (a PEFT model's ``disable_adapter()``), which is the right base when the adapted model was
    built in place on top of the base one. Returns ``mean_cosine`` (last layer), ``min_cosine`` (lowest token in
    the last layer) and ``per_layer_mean_cosine`` (embeddings first).
    """
    was_training = adapted_model.training
    adapted_model.eval()
    try:
        adapted = _hidden_states(adapted_model, batch)
        if base_model is None:
            if not hasattr(adapted_model, "disable_adapter"):
                raise ValueError(
                    "base_model=None needs a PEFT model (with disable_adapter()) as adapted_model"
                )
            context = adapted_model.disable_adapter()
            base_source = adapted_model
        else:
            context = nullcontext()
            base_source = base_model
            base_training = base_model.training
            base_model.eval()
        with context:
            base = _hidden_states(base_source, batch)
        if base_model is not None and base_training:
            base_model.train()
    finally:
        adapted_model.train(was_training)
    if len(base) != len(adapted):
        raise ValueError(f"base model has {len(base)} hidden-state layers, adapted model {len(adapted)}")
    mask = batch.get("attention_mask")
    per_layer = []
    last_cosines = None
    for base_states, adapted_states in zip(base, adapted, strict=True):
        cosines = torch.nn.functional.cosine_similarity(
            base_states.to(torch.float64), adapted_states.to(torch.float64), dim=-1
        )
        if mask is not None and mask.shape == cosines.shape:
            cosines = cosines[mask.to(torch.bool)]
        per_layer.append(float(cosines.mean()))
        last_cosines = cosines
    return {
        "mean_cosine": per_layer[-1],
        "min_cosine": float(last_cosines.min()),
        "per_layer_mean_cosine": per_layer,
    }
