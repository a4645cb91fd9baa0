"""What a block rotation keeps and what it changes in one layer: the numbers behind the docs' index figure.

For a linear layer ``y = W x + b`` a rotation on the output side (``W' = R W``) keeps the geometry of the layer's
outputs (every length and every angle between two tokens' outputs), while a rotation on the input side
(``W' = W R``) keeps the geometry of the layer's neurons (the rows of ``W``: their lengths and the angles between
them). An additive low-rank update of the same size keeps neither. ``rotation_effect`` measures all three on real
weights and inputs, so the figure shows measured numbers, not a sketch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .rotations import get_parametrization, skew_symmetric


def random_block_rotation(
    width: int, block_size: int, angle: float = 0.5, parametrization: str = "cayley", seed: int = 0
) -> torch.Tensor:
    """A dense ``width x width`` block-diagonal rotation whose blocks come from orthora's own parametrization.

    ``angle`` is the spectral norm of each block's skew generator after the map's gain, i.e. roughly the largest
    rotation angle (radians) inside a block, as a trained adapter might reach.
    """
    if width % block_size:
        raise ValueError(f"block_size={block_size} does not divide width={width}")
    spec = get_parametrization(parametrization)
    if not spec.uses_generator:
        raise ValueError(f"parametrization={parametrization!r}: use a generator-based map (cayley, exp)")
    generator = torch.Generator().manual_seed(seed)
    num_blocks = width // block_size
    params = torch.randn(spec.param_shape(num_blocks, block_size), generator=generator, dtype=torch.float64)
    skew_norm = torch.linalg.matrix_norm(skew_symmetric(params, block_size), ord=2).amax()
    params = params * (angle / (spec.generator_gain * skew_norm))
    blocks = spec.build(params, block_size)
    return torch.block_diag(*blocks)


def low_rank_update(weight: torch.Tensor, rank: int, frobenius: float, seed: int = 0) -> torch.Tensor:
    """A LoRA-shaped update ``B A`` of the given rank, scaled to the given Frobenius norm."""
    generator = torch.Generator().manual_seed(seed)
    b = torch.randn(weight.shape[0], rank, generator=generator, dtype=weight.dtype)
    a = torch.randn(rank, weight.shape[1], generator=generator, dtype=weight.dtype)
    delta = b @ a
    return delta * (frobenius / torch.linalg.matrix_norm(delta))


def pairwise_cosines(rows: torch.Tensor) -> torch.Tensor:
    """Cosine of every pair of rows (upper triangle, flattened)."""
    unit = torch.nn.functional.normalize(rows, dim=-1)
    gram = unit @ unit.T
    i, j = torch.triu_indices(len(rows), len(rows), offset=1)
    return gram[i, j]


@dataclass
class RotationEffect:
    """Pairwise cosines before and after one change of a layer: between token outputs and between neurons."""

    name: str
    weight_change: float  # ||W' - W||_F / ||W||_F
    tokens_before: torch.Tensor
    tokens_after: torch.Tensor
    neurons_before: torch.Tensor
    neurons_after: torch.Tensor

    @property
    def token_geometry_error(self) -> float:
        return float((self.tokens_after - self.tokens_before).abs().max())

    @property
    def neuron_geometry_error(self) -> float:
        return float((self.neurons_after - self.neurons_before).abs().max())


def rotation_effect(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    inputs: torch.Tensor,
    block_size: int = 32,
    angle: float = 0.5,
    lora_rank: int = 8,
    seed: int = 0,
) -> list[RotationEffect]:
    """Output-side rotation, input-side rotation and a same-size low-rank update of one layer, measured.

    ``weight`` is ``(d_out, d_in)``, ``inputs`` ``(tokens, d_in)``. Each row of the result compares the layer's
    outputs on ``inputs`` and its neurons (rows of the weight) before and after the change.
    """
    weight, inputs = weight.double(), inputs.double()
    bias = torch.zeros(weight.shape[0], dtype=torch.float64) if bias is None else bias.double()
    r_out = random_block_rotation(weight.shape[0], block_size, angle, seed=seed)
    r_in = random_block_rotation(weight.shape[1], block_size, angle, seed=seed + 1)
    outputs = inputs @ weight.T + bias
    changes = {
        "rotation, output side (R W)": (r_out @ weight, r_out @ bias),
        "rotation, input side (W R)": (weight @ r_in, bias),
    }
    size = float(torch.linalg.matrix_norm(changes["rotation, output side (R W)"][0] - weight))
    changes[f"additive rank-{lora_rank} update, same size"] = (
        weight + low_rank_update(weight, lora_rank, size, seed),
        bias,
    )
    effects = []
    for name, (new_weight, new_bias) in changes.items():
        effects.append(
            RotationEffect(
                name=name,
                weight_change=float(
                    torch.linalg.matrix_norm(new_weight - weight) / torch.linalg.matrix_norm(weight)
                ),
                tokens_before=pairwise_cosines(outputs),
                tokens_after=pairwise_cosines(inputs @ new_weight.T + new_bias),
                neurons_before=pairwise_cosines(weight),
                neurons_after=pairwise_cosines(new_weight),
            )
        )
    return effects
