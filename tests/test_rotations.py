"""The pure rotation math: orthogonality, identity at zero, gradients, Cayley vs its Neumann series."""

import pytest
import torch

from orthora import rotations

EXACT = ["cayley", "exp", "householder"]
ALL = EXACT + ["cayley_neumann"]


def random_params(parametrization, num_blocks, block_size, norm, seed=0, dtype=torch.float32, reflections=2):
    g = torch.Generator().manual_seed(seed)
    if parametrization == "householder":
        p = torch.randn(num_blocks, reflections, block_size, generator=g, dtype=dtype)
    else:
        p = torch.randn(num_blocks, block_size * (block_size - 1) // 2, generator=g, dtype=dtype)
    return p / p.norm() * norm


@pytest.mark.parametrize("parametrization", EXACT)
@pytest.mark.parametrize("norm", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("block_size", [2, 8, 32])
def test_exact_maps_are_orthogonal_in_float32(parametrization, norm, block_size):
    params = random_params(parametrization, 4, block_size, norm)
    blocks = rotations.orthogonal_blocks(params, parametrization, block_size)
    assert blocks.dtype == torch.float32
    assert blocks.shape == (4, block_size, block_size)
    assert rotations.orthogonality_error(blocks) < 1e-5


@pytest.mark.parametrize("parametrization", ["cayley", "exp", "cayley_neumann"])
def test_zero_parameters_give_identity(parametrization):
    params = rotations.identity_parameters(parametrization, 3, 8)
    blocks = rotations.orthogonal_blocks(params, parametrization, 8)
    assert torch.equal(blocks, torch.eye(8).expand(3, 8, 8))


@pytest.mark.parametrize("num_reflections", [1, 2, 5, 32])
def test_householder_compact_form_equals_the_product_of_reflections(num_reflections):
    vectors = torch.randn(3, num_reflections, 8, dtype=torch.float64)
    expected = torch.eye(8, dtype=torch.float64).expand(3, 8, 8)
    for j in range(num_reflections):
        u = vectors[:, j, :] / vectors[:, j, :].norm(dim=-1, keepdim=True)
        expected = expected @ (torch.eye(8, dtype=torch.float64) - 2 * u.unsqueeze(-1) @ u.unsqueeze(-2))
    assert torch.allclose(rotations.householder(vectors), expected, atol=1e-12)


def test_householder_identity_initialisation_pairs_reflections():
    params = rotations.identity_parameters("householder", 3, 8, num_reflections=4)
    assert params.shape == (3, 4, 8)
    blocks = rotations.orthogonal_blocks(params, "householder", 8)
    assert (blocks - torch.eye(8)).abs().max() < 1e-6
    assert params.abs().sum() > 0  # random directions, so gradients are not degenerate


@pytest.mark.parametrize("norm", [0.01, 0.1, 0.3])
def test_neumann_series_approximates_the_same_cayley_rotation_not_its_transpose(norm):
    params = random_params("cayley", 4, 16, norm)
    exact = rotations.orthogonal_blocks(params, "cayley", 16)
    approx = rotations.orthogonal_blocks(params, "cayley_neumann", 16, neumann_terms=8)
    gap_same = (exact - approx).abs().max()
    gap_transposed = (exact.mT - approx).abs().max()
    assert gap_same < 1e-3 * max(1.0, norm * 10)
    if norm >= 0.1:
        assert gap_same < gap_transposed / 10


def test_neumann_converges_with_more_terms():
    params = random_params("cayley", 2, 16, 0.3)
    exact = rotations.orthogonal_blocks(params, "cayley", 16)
    errors = [
        (rotations.orthogonal_blocks(params, "cayley_neumann", 16, neumann_terms=t) - exact)
        .abs()
        .max()
        .item()
        for t in (2, 4, 8)
    ]
    assert errors[0] > errors[1] > errors[2]


def test_max_angle_bounds_the_generator_and_the_rotation():
    params = random_params("cayley", 4, 8, 50.0)
    generator = rotations.skew_symmetric(params, 8)
    constrained = rotations.constrain_generator(generator, 0.5)
    assert torch.linalg.matrix_norm(constrained).max() <= 0.5 + 1e-6
    blocks = rotations.orthogonal_blocks(params, "exp", 8, max_angle=0.5)
    assert rotations.orthogonality_error(blocks) < 1e-5
    assert (blocks - torch.eye(8)).norm(dim=(-2, -1)).max() <= 0.5 + 1e-4
    small = random_params("cayley", 4, 8, 0.01)  # inside the radius: untouched
    assert torch.allclose(
        rotations.constrain_generator(rotations.skew_symmetric(small, 8), 0.5),
        rotations.skew_symmetric(small, 8),
    )


def test_low_precision_parameters_are_upcast_before_the_map():
    params = random_params("cayley", 4, 16, 3.0).to(torch.bfloat16)
    blocks = rotations.orthogonal_blocks(params, "cayley", 16)
    assert blocks.dtype == torch.float32
    assert rotations.orthogonality_error(blocks) < 1e-5


@pytest.mark.parametrize("parametrization", ALL)
def test_gradcheck_of_parameter_to_rotation_maps(parametrization):
    params = random_params(parametrization, 2, 4, 1.0, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda p: rotations.orthogonal_blocks(p, parametrization, 4, compute_dtype=torch.float64), (params,)
    )


@pytest.mark.parametrize("parametrization", EXACT)
@pytest.mark.parametrize("shared", [False, True])
def test_gradcheck_through_the_memory_saving_block_product(parametrization, shared):
    num_blocks = 1 if shared else 3
    params = random_params(parametrization, num_blocks, 4, 1.0, dtype=torch.float64).requires_grad_()
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)

    def f(p, inp):
        blocks = rotations.orthogonal_blocks(p, parametrization, 4, compute_dtype=torch.float64)
        return rotations.rotate(inp, blocks, exact=True)

    assert torch.autograd.gradcheck(f, (params, x))


def test_gradcheck_with_max_angle():
    params = random_params("cayley", 2, 4, 3.0, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda p: rotations.orthogonal_blocks(p, "cayley", 4, max_angle=0.7, compute_dtype=torch.float64),
        (params,),
    )


def test_rotate_matches_a_dense_block_diagonal_product_and_keeps_norms():
    blocks = rotations.orthogonal_blocks(random_params("exp", 3, 4, 2.0), "exp", 4)
    x = torch.randn(2, 5, 12)
    dense = torch.block_diag(*blocks)
    y = rotations.rotate(x, blocks)
    assert torch.allclose(y, x @ dense.T, atol=1e-6)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    shared = blocks[:1]
    assert torch.allclose(
        rotations.rotate(x, shared), x @ torch.block_diag(*shared.expand(3, 4, 4)).T, atol=1e-6
    )


def test_memory_saving_backward_matches_plain_autograd():
    params = random_params("cayley", 3, 8, 1.5).requires_grad_()
    x = torch.randn(4, 24, requires_grad=True)
    upstream = torch.randn(4, 24)
    grads = []
    for exact in (True, False):
        blocks = rotations.orthogonal_blocks(params, "cayley", 8)
        (rotations.rotate(x, blocks, exact=exact) * upstream).sum().backward()
        grads.append((x.grad.clone(), params.grad.clone()))
        x.grad = None
        params.grad = None
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-4)


def test_weight_folding_equals_activation_rotation():
    out_blocks = rotations.orthogonal_blocks(random_params("cayley", 2, 3, 1.0), "cayley", 3)
    in_blocks = rotations.orthogonal_blocks(random_params("exp", 4, 2, 1.0, seed=1), "exp", 2)
    w, x = torch.randn(6, 8), torch.randn(5, 8)
    folded = rotations.rotate_weight_rows(rotations.rotate_weight_columns(w, in_blocks), out_blocks)
    direct = rotations.rotate(rotations.rotate(x, in_blocks) @ w.T, out_blocks)
    assert torch.allclose(x @ folded.T, direct, atol=1e-5)


def test_inverse_is_transpose_when_exact_and_a_solve_otherwise():
    exact = rotations.orthogonal_blocks(random_params("cayley", 2, 4, 1.0), "cayley", 4)
    assert torch.equal(rotations.invert_blocks(exact, True), exact.mT)
    approx = rotations.orthogonal_blocks(
        random_params("cayley", 2, 4, 0.8), "cayley_neumann", 4, neumann_terms=2
    )
    inv = rotations.invert_blocks(approx, False)
    assert torch.allclose(inv @ approx, torch.eye(4).expand(2, 4, 4), atol=1e-5)


def test_rotate_rejects_mismatched_widths():
    blocks = torch.eye(4).expand(3, 4, 4)
    with pytest.raises(ValueError, match="cannot act on features of width 10"):
        rotations.rotate(torch.randn(2, 10), blocks)


def test_free_parameter_counts():
    assert rotations.num_free_parameters("cayley", 32) == 496
    assert rotations.num_free_parameters("householder", 32, num_reflections=4) == 128


def test_cayley_equals_the_solve_definition_and_is_exactly_orthogonal_for_large_generators():
    for norm in (0.01, 1.0, 30.0):
        generator = rotations.skew_symmetric(random_params("cayley", 3, 16, norm, dtype=torch.float64), 16)
        eye = torch.eye(16, dtype=torch.float64)
        reference = torch.linalg.solve(eye + generator, eye - generator)
        torch.testing.assert_close(rotations.cayley(generator), reference, rtol=0, atol=1e-10)


def test_cayley_backward_matches_autograd_through_the_solve():
    generator = rotations.skew_symmetric(random_params("cayley", 4, 8, 2.0, dtype=torch.float64), 8)
    generator.requires_grad_()
    upstream = torch.randn(4, 8, 8, dtype=torch.float64)
    (ours,) = torch.autograd.grad((rotations.cayley(generator) * upstream).sum(), generator)
    eye = torch.eye(8, dtype=torch.float64)
    (reference,) = torch.autograd.grad(
        (torch.linalg.solve(eye + generator, eye - generator) * upstream).sum(), generator
    )
    torch.testing.assert_close(ours, reference)


@pytest.mark.parametrize("parametrization", ALL)
def test_blocks_stay_float32_and_orthogonal_under_bf16_autocast(parametrization):
    params = random_params(parametrization, 4, 32, 1.0).requires_grad_()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        blocks = rotations.orthogonal_blocks(params, parametrization, 32)
        blocks.sum().backward()
    assert blocks.dtype == torch.float32 and params.grad.dtype == torch.float32
    if parametrization in EXACT:
        assert rotations.orthogonality_error(blocks) < 1e-5
