"""Adapter arithmetic on the rotation group: geodesic interpolation, composition and linear mixing of adapters.

Orthogonal adapters form a group, so they can be combined in ways additive adapters cannot:

* ``"geodesic"``: ``R = exp(sum_i w_i log R_i)`` per block. With one adapter this is ``R^w``, the geodesic through
  the identity (``w = 0.5`` is the half-way rotation, ``w = -1`` the inverse); with several it is the weighted sum
  in the Lie algebra (the log-Euclidean combination), which is the geodesic between them when their blocks
  commute. Every result is exactly orthogonal, whatever the weights.
* ``"compose"``: the product of the ``R_i^{w_i}`` in the given order, i.e. the same map as merging the adapters one
  after the other (or activating them together).
* ``"linear"``: ``sum_i w_i p_i`` of the free parameters (PEFT's "linear"); the rotation of the sum is not a group
  operation, but it is still exactly orthogonal for the exact maps.

Where results are stored: a ``geodesic`` or ``compose`` result is an adapter with ``parametrization="exp"``,
because its generator ``log R`` is a skew-symmetric matrix that the exponential map reproduces exactly (so
Cayley, exp and Householder adapters all combine into ``exp`` adapters). One exception keeps the map: composing
Householder adapters with weight 1 each concatenates their reflections into a Householder adapter, which is exact
and needs no logarithm. ``linear`` keeps the adapters' own map. The matrix logarithm is computed in float64 from
the parameters (see :func:`log_rotation`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from peft.utils.other import ModulesToSaveWrapper

from . import rotations
from .config import OrthoConfig
from .layer import BlockRotation, OrthoLayer

if TYPE_CHECKING:
    from .model import OrthoModel

__all__ = [
    "COMBINATION_TYPES",
    "add_weighted_adapter",
    "combine_blocks",
    "exact_blocks",
    "generator_parameters",
    "log_rotation",
    "rotation_power",
]

COMBINATION_TYPES = ("geodesic", "compose", "linear")

#: A plane whose rotation angle is within this of pi (sin(theta) below it) is treated as a half-turn, whose
#: logarithm is pi times any complex structure of the plane (see :func:`log_rotation`).
_HALF_TURN_TOLERANCE = 1e-8

SIDES = (("output", "ortho_out"), ("input", "ortho_in"))
_TABLES = {**dict(SIDES), "magnitude": "ortho_magnitude"}


# ------------------------------------------------------------------------------------------------ pure functions
def log_rotation(blocks: torch.Tensor) -> torch.Tensor:
    """Principal logarithm of ``(k, b, b)`` rotations, as exactly skew-symmetric float64 generators.

    ``R`` is normal, so ``C = (R + R^T)/2`` and ``K = (R - R^T)/2`` commute; on each invariant plane ``C = cos t``
    and ``K = sin t J``, hence ``log R = Q diag(t / sin t) Q^T K`` with ``Q`` the eigenvectors of ``C``. ``sin t`` is
    read as ``||K q||`` (accurate in absolute terms) and ``t = atan2(sin t, cos t)``, so the result stays accurate
    up to angles very close to pi. Planes within ``_HALF_TURN_TOLERANCE`` of a half-turn (where ``K`` no longer
    tells the plane's orientation, and the logarithm is not unique) get ``pi J`` for a complex structure ``J`` of
    their eigenspace, so ``exp(log R) = R`` still holds to that tolerance. A block with determinant -1 (an odd
    number of Householder reflections) has no real logarithm and is refused.
    """
    r = blocks.detach().to(torch.float64)
    determinants = torch.linalg.det(r)
    if (determinants < 0).any():
        index = int(torch.nonzero(determinants < 0)[0, 0])
        raise ValueError(
            f"block {index} is a reflection (determinant -1, e.g. an odd number of Householder reflections) and "
            "has no real logarithm; only rotations can be interpolated or raised to a power"
        )
    symmetric = (r + r.mT) / 2
    skew = (r - r.mT) / 2
    cosines, basis = torch.linalg.eigh(symmetric)
    sines = (skew @ basis).norm(dim=-2)
    angles = torch.atan2(sines, cosines)
    half_turn = (cosines < 0) & (sines < _HALF_TURN_TOLERANCE)
    safe_sines = torch.where(sines > 0, sines, torch.ones_like(sines))
    gains = torch.where(sines > 0, angles / safe_sines, torch.ones_like(angles))
    gains = torch.where(half_turn, torch.zeros_like(gains), gains)
    generator = basis @ (gains.unsqueeze(-1) * basis.mT) @ skew
    for index in torch.nonzero(half_turn.any(dim=-1)).flatten().tolist():
        generator[index] += math.pi * _complex_structure(basis[index], half_turn[index], sines[index])
    return (generator - generator.mT) / 2


def _complex_structure(basis: torch.Tensor, selected: torch.Tensor, sines: torch.Tensor) -> torch.Tensor:
    """``J`` with ``J^2 = -I`` on the span of the selected eigenvectors (paired in order), zero elsewhere."""
    chosen = torch.nonzero(selected).flatten().tolist()
    if len(chosen) % 2:  # the eigenvalue -1 of a rotation is even; complete a pair split by the tolerance
        rest = [i for i in torch.argsort(sines).tolist() if i not in chosen]
        chosen.append(rest[0])
    structure = torch.zeros_like(basis)
    for first, second in zip(chosen[0::2], chosen[1::2], strict=True):
        u, v = basis[:, first], basis[:, second]
        structure += torch.outer(v, u) - torch.outer(u, v)
    return structure


def rotation_power(blocks: torch.Tensor, weight: float) -> torch.Tensor:
    """``R^w = exp(w log R)`` of ``(k, b, b)`` rotations (float64): the geodesic from ``I`` (``w=0``) to ``R``."""
    if weight == 1:
        return blocks.detach().to(torch.float64)
    return torch.linalg.matrix_exp(weight * log_rotation(blocks))


def combine_blocks(
    blocks: Sequence[torch.Tensor], weights: Sequence[float], combination_type: str, side: str = "output"
) -> torch.Tensor:
    """Combine the ``(k, b, b)`` rotations of several adapters (float64 result).

    ``geodesic``: ``exp(sum w_i log R_i)``. ``compose``: the product of the ``R_i^{w_i}`` that equals merging the
    adapters in the given order: ``R_n ... R_1`` on the output side (``W' = R_n ... R_1 W``), ``R_1 ... R_n`` on
    the input side (``W' = W R_1 ... R_n``).
    """
    if combination_type == "geodesic":
        generator = sum(w * log_rotation(b) for b, w in zip(blocks, weights, strict=True))
        return torch.linalg.matrix_exp(generator)
    if combination_type == "compose":
        product = None
        for b, w in zip(blocks, weights, strict=True):
            power = rotation_power(b, w)
            if product is None:
                product = power
            else:
                product = power @ product if side == "output" else product @ power
        return product
    raise ValueError(
        f"combine_blocks: unknown combination_type {combination_type!r}; valid: geodesic, compose"
    )


def generator_parameters(generator: torch.Tensor) -> torch.Tensor:
    """The free parameters of ``parametrization="exp"`` whose generator is ``generator`` (``(k, b, b)``, skew)."""
    block_size = generator.shape[-1]
    rows, cols = torch.triu_indices(block_size, block_size, offset=1, device=generator.device)
    return generator[:, rows, cols]


def exact_blocks(rotation: BlockRotation) -> torch.Tensor:
    """A rotation's blocks recomputed in float64 from its parameters (``(k or 1, b, b)``)."""
    return rotations.orthogonal_blocks(
        rotation.weight.detach(),
        rotation.parametrization,
        rotation.block_size,
        neumann_terms=rotation.neumann_terms,
        max_angle=rotation.max_angle,
        compute_dtype=torch.float64,
        scale=rotation.scale,
    )


# ------------------------------------------------------------------------------------------------- validation
def _layouts(tuner: OrthoModel, adapter: str) -> dict[tuple[str, str], tuple[int, int]]:
    """(module, side) -> (num_blocks, block_size) of every rotation of ``adapter``."""
    layout = {}
    for name, module in tuner.model.named_modules():
        if isinstance(module, OrthoLayer):
            for side, table_name in SIDES:
                table = getattr(module, table_name)
                if adapter in table:
                    layout[(name, side)] = (table[adapter].num_blocks, table[adapter].block_size)
    return layout


def _check_layouts(tuner: OrthoModel, adapters: Sequence[str]) -> None:
    reference = _layouts(tuner, adapters[0])
    for other in adapters[1:]:
        layout = _layouts(tuner, other)
        for key in sorted(set(reference) | set(layout)):
            module, side = key
            if key not in layout or key not in reference:
                has, lacks = (adapters[0], other) if key in reference else (other, adapters[0])
                raise ValueError(
                    f"cannot combine adapters {adapters[0]!r} and {other!r}: {module} ({side} side) is rotated by "
                    f"{has!r} but not by {lacks!r}; adapters need the same block layout (same target modules and side)"
                )
            if layout[key] != reference[key]:
                (k0, b0), (k1, b1) = reference[key], layout[key]
                raise ValueError(
                    f"cannot combine adapters {adapters[0]!r} and {other!r}: {module} ({side} side) has {k0} blocks "
                    f"of {b0} in {adapters[0]!r} but {k1} blocks of {b1} in {other!r}; adapters need the same block "
                    "layout"
                )


_LINEAR_MAP_FIELDS = (
    "parametrization",
    "num_reflections",
    "block_share",
    "max_angle",
    "neumann_terms",
    "generator_scale",
    "magnitude",
)


def _check_request(
    tuner: OrthoModel,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str,
) -> list[OrthoConfig]:
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(
            f"unknown combination_type {combination_type!r} for orthora adapters; valid: {', '.join(COMBINATION_TYPES)}"
        )
    adapters, weights = list(adapters), list(weights)
    if not adapters:
        raise ValueError("add_weighted_adapter needs at least one adapter")
    if len(weights) != len(adapters):
        raise ValueError(
            f"got {len(weights)} weights for {len(adapters)} adapters; give one weight per adapter"
        )
    for weight in weights:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"weights must be finite numbers, got {weight!r}")
    if adapter_name in tuner.peft_config:
        raise ValueError(
            f"adapter {adapter_name!r} already exists; choose another name or delete_adapter({adapter_name!r}) first"
        )
    missing = [a for a in adapters if a not in tuner.peft_config]
    if missing:
        raise ValueError(f"unknown adapter(s) {missing}; adapters present: {sorted(tuner.peft_config)}")
    configs = [tuner.peft_config[a] for a in adapters]
    for adapter, config in zip(adapters, configs, strict=True):
        if not isinstance(config, OrthoConfig):
            raise ValueError(f"adapter {adapter!r} is a {type(config).__name__}, not an orthora adapter")
        if combination_type != "linear" and config.parametrization == "cayley_neumann":
            raise ValueError(
                f"adapter {adapter!r} uses parametrization='cayley_neumann', which is only approximately orthogonal; "
                f"{combination_type} needs exact rotations (load it with parametrization='cayley', the exact map "
                "the series approximates)"
            )
    if combination_type == "compose":
        scaled = [a for a, c in zip(adapters, configs, strict=True) if c.magnitude]
        if scaled:
            raise ValueError(
                f"compose cannot combine adapters with magnitude=True ({scaled}): s2 R2 s1 R1 is not of the form s R; "
                "use combination_type='geodesic' or 'linear'"
            )
    if combination_type == "linear":
        for field in _LINEAR_MAP_FIELDS:
            values = {a: getattr(c, field) for a, c in zip(adapters, configs, strict=True)}
            if len(set(values.values())) > 1:
                raise ValueError(
                    f"linear combination needs the same {field} for every adapter, got {values}; "
                    "use combination_type='geodesic' to combine different maps"
                )
    _check_layouts(tuner, adapters)
    for name, module in tuner.model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            owners = [a for a in adapters if a in module.modules_to_save]
            if len(owners) > 1:
                raise ValueError(
                    f"adapters {owners} each have their own {name} (modules_to_save), and trained heads cannot be "
                    "combined; load the adapters without modules_to_save and attach heads yourself "
                    "(see docs/arithmetic.md)"
                )
    return configs


# ------------------------------------------------------------------------------------------------ the operation
def _result_config(
    configs: list[OrthoConfig], adapters: list[str], weights: list[float], kind: str
) -> OrthoConfig:
    base = configs[0]
    shared = all(c.block_share for c in configs)
    if kind == "linear":
        return dataclasses.replace(base, init_weights=True)
    if (
        kind == "compose"
        and all(c.parametrization == "householder" for c in configs)
        and all(w == 1 for w in weights)
    ):
        reflections = sum(c.num_reflections for c in configs)
        # an odd total cannot start at the identity (init_weights=True refuses it); the values are overwritten anyway
        return dataclasses.replace(
            base, num_reflections=reflections, block_share=shared, init_weights=reflections % 2 == 0
        )
    return dataclasses.replace(
        base,
        parametrization="exp",
        max_angle=None,
        block_share=shared,
        init_weights=True,
        magnitude=any(c.magnitude for c in configs),
    )


def _expanded(blocks: torch.Tensor, num_blocks: int, keep_shared: bool) -> torch.Tensor:
    return blocks if keep_shared else blocks.expand(num_blocks, -1, -1)


def _combined_parameters(
    rotations_in: list[BlockRotation],
    weights: list[float],
    kind: str,
    side: str,
    config: OrthoConfig,
    where: str = "",
) -> torch.Tensor:
    """The new adapter's free parameters for one layer side (float64)."""
    if kind == "linear":
        return sum(
            w * r.weight.detach().to(torch.float64) for r, w in zip(rotations_in, weights, strict=True)
        )
    shared = config.block_share
    num_blocks = rotations_in[0].num_blocks
    if config.parametrization == "householder":  # compose of Householder adapters, weight 1 each
        vectors = [_expanded(r.weight.detach().to(torch.float64), num_blocks, shared) for r in rotations_in]
        # merged in order: output side R_n ... R_1 = H(v_n...) ... H(v_1...), input side R_1 ... R_n
        ordered = vectors[::-1] if side == "output" else vectors
        return torch.cat(ordered, dim=1)
    blocks = [_expanded(exact_blocks(r), num_blocks, shared) for r in rotations_in]
    combined = combine_blocks(blocks, weights, kind, side)
    scale = config.scale_for(combined.shape[-1])
    parameters = generator_parameters(log_rotation(combined)) / scale  # the map multiplies them by its scale
    stored = rotations.orthogonal_blocks(
        parameters,
        config.parametrization,
        combined.shape[-1],
        max_angle=config.max_angle,
        compute_dtype=torch.float64,
        scale=scale,
    )
    error = float((stored - combined).abs().max())
    if error > 1e-6:  # e.g. a generator beyond the map's safe radius, which the map would scale down
        raise ValueError(
            f"{where}: the combined rotation cannot be stored as a parametrization={config.parametrization!r} adapter (it would differ by "
            f"{error:.1e}); combine with smaller weights"
        )
    return parameters


def _combined_magnitude(
    scales: list[torch.Tensor | None], weights: list[float], kind: str, where: str
) -> torch.Tensor:
    """Per-feature scales ``s`` (``magnitude=True``; None = an adapter without one, i.e. ``s = 1``), combined like
    the rotations: ``exp(sum w log s)`` on the geodesic (positive scales form a group too), ``sum w s`` for linear."""
    reference = next(s for s in scales if s is not None)
    values = [torch.ones_like(reference) if s is None else s.detach() for s in scales]
    values = [v.to(torch.float64) for v in values]
    if kind == "linear":
        return sum(w * v for v, w in zip(values, weights, strict=True))
    if any((v <= 0).any() for v in values):
        raise ValueError(
            f"{where}: a magnitude has entries <= 0, which have no logarithm; use combination_type='linear'"
        )
    return torch.exp(sum(w * torch.log(v) for v, w in zip(values, weights, strict=True)))


def add_weighted_adapter(
    tuner: OrthoModel,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "geodesic",
) -> None:
    """Create ``adapter_name`` from ``adapters`` combined with ``weights`` (PEFT's ``add_weighted_adapter``).

    Everything is validated and computed before the model is touched; the new adapter is inactive and frozen, as
    PEFT's LoRA leaves it. A head in ``modules_to_save`` is copied when exactly one input adapter has one.
    """
    adapters, weights = list(adapters), [float(w) for w in weights]
    configs = _check_request(tuner, adapters, weights, adapter_name, combination_type)
    new_config = _result_config(configs, adapters, weights, combination_type)
    new_parameters: dict[tuple[str, str], torch.Tensor] = {}
    for name, module in tuner.model.named_modules():
        if not isinstance(module, OrthoLayer):
            continue
        for side, table_name in SIDES:
            table = getattr(module, table_name)
            if adapters[0] in table:
                inputs = [table[a] for a in adapters]
                new_parameters[(name, side)] = _combined_parameters(
                    inputs, weights, combination_type, side, new_config, f"{name} ({side} side)"
                )
        if any(a in module.ortho_magnitude for a in adapters):
            scales = [
                module.ortho_magnitude[a].weight if a in module.ortho_magnitude else None for a in adapters
            ]
            new_parameters[(name, "magnitude")] = _combined_magnitude(scales, weights, combination_type, name)

    from .model import discard_adapter

    tuner.peft_config[adapter_name] = new_config
    try:
        tuner.inject_adapter(tuner.model, adapter_name)
        modules = dict(tuner.model.named_modules())
        for (name, side), parameters in new_parameters.items():
            table = getattr(modules[name], _TABLES[side])
            with torch.no_grad():
                table[adapter_name].weight.copy_(parameters.to(table[adapter_name].weight.dtype))
            table[adapter_name].weight.requires_grad_(False)
        for module in tuner.model.modules():
            if isinstance(module, ModulesToSaveWrapper):
                owners = [a for a in adapters if a in module.modules_to_save]
                if owners:
                    head = copy.deepcopy(module.modules_to_save[owners[0]]).requires_grad_(False)
                    module.modules_to_save[adapter_name] = head
    except BaseException:
        discard_adapter(tuner.model, adapter_name)
        for module in tuner.model.modules():
            if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
                del module.modules_to_save[adapter_name]
        raise
