"""Numerical safety: no NaN from any parametrization at large learning rates, and bounded drift over long runs."""

import pytest
import torch
from peft import get_peft_model
from torch import nn

from orthora import OrthoConfig, rotations
from orthora.layer import BlockRotation
from orthora.rotations import NEUMANN_MAX_NORM, PARAMETRIZATIONS


def tiny_mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).to(dtype)


def blocks_of(model):
    return [m.blocks() for m in model.modules() if isinstance(m, BlockRotation)]


def neumann_orthogonality_bound(terms: int) -> float:
    """``R_n = (I - (-A)^n) R`` with ``||A||_2 <= rho``, so ``|R_n^T R_n - I| <= 2 rho^n + rho^(2n)``."""
    return 2 * NEUMANN_MAX_NORM**terms + NEUMANN_MAX_NORM ** (2 * terms)


@pytest.mark.parametrize("parametrization", sorted(PARAMETRIZATIONS))
def test_large_inputs_and_learning_rate_never_give_nan(parametrization):
    """The issue's reproduction: inputs up to ~100, three SGD steps at lr 0.5 on ``loss = output.sum()``."""
    model = get_peft_model(
        tiny_mlp(),
        OrthoConfig(target_modules=["0", "2"], block_size=8, side="both", parametrization=parametrization),
    )
    x = 100 * (2 * torch.rand(64, 16, generator=torch.Generator().manual_seed(0)) - 1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).sum().backward()
        optimizer.step()
    assert all(torch.isfinite(p).all() for p in trainable)
    assert torch.isfinite(model(x)).all()
    for blocks in blocks_of(model):
        bound = 1e-5 if PARAMETRIZATIONS[parametrization].exact else neumann_orthogonality_bound(5)
        assert rotations.orthogonality_error(blocks) <= bound


@pytest.mark.parametrize("terms", [1, 2, 5, 8])
@pytest.mark.parametrize("norm", [0.0, 0.1, 3.0, 1e4])
def test_neumann_map_is_bounded_and_its_error_stays_within_the_documented_bound(terms, norm):
    g = torch.Generator().manual_seed(0)
    params = torch.randn(4, 16 * 15 // 2, generator=g)
    params = (params / params.norm() * norm).requires_grad_()
    blocks = rotations.orthogonal_blocks(params, "cayley_neumann", 16, neumann_terms=terms)
    assert rotations.orthogonality_error(blocks) <= neumann_orthogonality_bound(terms) + 1e-6
    blocks.square().sum().backward()
    assert torch.isfinite(params.grad).all()


@pytest.mark.parametrize("terms", [1, 2, 5, 8])
def test_neumann_map_is_the_cayley_rotation_minus_exactly_its_truncation_term(terms):
    """``R_n = (I - (-A)^n) R`` holds to float64 rounding, so a missing or extra series term fails by ~||A||^(n-1)."""
    g = torch.Generator().manual_seed(0)
    params = 0.02 * torch.randn(4, 16 * 15 // 2, generator=g, dtype=torch.float64)
    generator = rotations.skew_symmetric(params, 16)
    assert (
        rotations.generator_norm_bound(generator).max() < NEUMANN_MAX_NORM
    )  # the radius limit is not involved
    exact = rotations.cayley(generator)
    approx = rotations.orthogonal_blocks(
        params, "cayley_neumann", 16, neumann_terms=terms, compute_dtype=torch.float64
    )
    truncation = torch.linalg.matrix_power(-generator, terms) @ exact
    assert truncation.abs().max() > 1e-9  # the term is large enough to see
    torch.testing.assert_close(approx, exact - truncation, rtol=0, atol=1e-14)


@pytest.mark.parametrize("parametrization", ["cayley", "cayley_neumann", "exp"])
def test_gradcheck_beyond_the_safe_radius(parametrization):
    """Where the radius limit is active the map is still differentiable, with the true gradient."""
    g = torch.Generator().manual_seed(0)
    params = (30.0 * torch.randn(2, 6, generator=g, dtype=torch.float64)).requires_grad_()
    radius = PARAMETRIZATIONS[parametrization].safe_radius
    assert rotations.generator_norm_bound(rotations.skew_symmetric(params, 4)).min() > radius
    assert torch.autograd.gradcheck(
        lambda p: rotations.orthogonal_blocks(
            p, parametrization, 4, neumann_terms=3, compute_dtype=torch.float64
        ),
        (params,),
    )
