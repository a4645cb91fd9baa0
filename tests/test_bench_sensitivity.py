"""The rotation-sensitivity probe (orthora.bench.sensitivity): the angle it sets is the angle the layers apply."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_models import tiny_bert

from orthora import OrthoConfig
from orthora.bench import sensitivity
from orthora.layer import BlockRotation


@pytest.mark.parametrize("generator_scale", [1.0, "auto"])
def test_set_rotation_angle_turns_every_block_by_exactly_theta(generator_scale):
    config = OrthoConfig(
        side="both",
        target_modules=["query", "dense"],
        parametrization="exp",
        block_size=8,
        generator_scale=generator_scale,
    )
    model = get_peft_model(tiny_bert(), config)
    count = sensitivity.set_rotation_angle(model, 0.2, torch.Generator().manual_seed(0))
    rotations = [m for m in model.modules() if isinstance(m, BlockRotation)]
    assert count == sum(m.weight.shape[0] for m in rotations) > 0
    with torch.no_grad():
        for module in rotations:
            blocks = module.blocks().double()
            eye = torch.eye(module.block_size, dtype=blocks.dtype)
            torch.testing.assert_close(
                blocks @ blocks.transpose(-1, -2), eye.expand_as(blocks), atol=1e-5, rtol=0
            )
            angles = (
                torch.linalg.eigvals(blocks).angle().abs().amax(-1)
            )  # the largest plane angle of each block
            torch.testing.assert_close(angles, torch.full_like(angles, 0.2), atol=1e-5, rtol=0)


def test_set_rotation_angle_refuses_maps_whose_angle_it_cannot_set():
    model = get_peft_model(
        tiny_bert(), OrthoConfig(target_modules=["query"], parametrization="cayley", block_size=8)
    )
    with pytest.raises(ValueError, match="needs parametrization='exp', got 'cayley'"):
        sensitivity.set_rotation_angle(model, 0.1, torch.Generator().manual_seed(0))


def test_summary_table_has_one_row_per_layer_set_and_angle():
    rows = [
        {
            "side": side,
            "layers": layers,
            "theta": theta,
            "seed": seed,
            "sts_drop": 1.0,
            "token_shift": 0.002,
            "token_cka": 0.003,
        }
        for side in sensitivity.SIDES
        for layers in sensitivity.LAYER_SETS
        for theta in (0.1, 0.3)
        for seed in (0, 1)
    ]
    table = sensitivity.summary_markdown({"rows": rows})
    assert table.count("\n") == 2 + len(sensitivity.LAYER_SETS) * 2
    assert "| writers | 0.3 | 1.00 / 2.0 / 3.0 | 1.00 / 2.0 / 3.0 |" in table


def test_linear_cka_sees_geometry_not_coordinates():
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q, _ = torch.linalg.qr(
        torch.randn(16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    )
    assert sensitivity.linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0, abs=1e-9)  # rotated and scaled: same
    squashed = x.clone()
    squashed[:, 8:] *= 0.05  # half of the directions nearly collapsed: another geometry
    assert sensitivity.linear_cka(x, squashed) < 0.8
