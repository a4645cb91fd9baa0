"""The parametrization table: each entry's declared properties match what its map actually does."""

import pytest
import torch

from orthora import OrthoConfig, rotations
from orthora.rotations import PARAMETRIZATIONS


@pytest.mark.parametrize("name", sorted(PARAMETRIZATIONS))
def test_table_entry_matches_its_map(name):
    spec = PARAMETRIZATIONS[name]
    block_size, num_blocks, reflections = 6, 3, 4
    init = spec.identity_init(num_blocks, block_size, reflections)
    assert init.shape == spec.param_shape(num_blocks, block_size, reflections)
    assert init[0].numel() == spec.num_params(block_size, reflections)
    eye = torch.eye(block_size).expand(num_blocks, -1, -1)
    assert (rotations.orthogonal_blocks(init, name, block_size, neumann_terms=3) - eye).abs().max() < 1e-6
    random = spec.random_init(num_blocks, block_size, reflections, generator=torch.Generator().manual_seed(0))
    blocks = rotations.orthogonal_blocks(random, name, block_size, neumann_terms=3)
    assert (blocks - eye).abs().max() > 1e-3  # random_init really moves away from the identity
    # 'exact' is a promise of machine-precision orthogonality, and only exact maps make it
    assert (rotations.orthogonality_error(blocks) < 1e-5) == spec.exact
    assert OrthoConfig(parametrization=name, target_modules=["x"]).is_exact == spec.exact


def test_unknown_parametrization_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid values are cayley, cayley_neumann, exp, householder"):
        rotations.orthogonal_blocks(torch.zeros(1, 1), "givens", 2)


def test_max_angle_is_refused_for_maps_without_a_generator():
    with pytest.raises(ValueError, match="max_angle bounds a skew-symmetric generator.*householder"):
        OrthoConfig(parametrization="householder", max_angle=0.1, target_modules=["x"])
