"""OrthoConfig(generator_scale=..., magnitude=...): identity at init, exact merge/unmerge, save/load, semantics."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import orthora
from orthora import rotations
from orthora.layer import OrthoLayer

PARAMETRIZATIONS = ("cayley", "exp", "householder")


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _perturb(model: nn.Module) -> None:
    """Move every adapter parameter away from its initial value (rotations and magnitudes)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ortho_" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("side", ["output", "input", "both"])
@pytest.mark.parametrize("scale", [1.0, "auto", 0.1])
def test_identity_at_init_and_exact_merge_with_magnitude_and_scale(parametrization, side, scale):
    x = torch.randn(40, 16)  # 40 tokens > d_in: the fold path; the rotate path is checked below
    base = MLP()
    reference = base(x)
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    config = orthora.OrthoConfig(
        target_modules=["up", "down"],
        block_size=8,
        side=side,
        parametrization=parametrization,
        generator_scale=scale,
        magnitude=True,
    )
    model = get_peft_model(base, config)
    torch.testing.assert_close(model(x), reference, atol=1e-6, rtol=0)  # identity rotation, unit magnitude
    _perturb(model)
    adapted = model(x)
    assert (adapted - reference).abs().max() > 1e-2
    OrthoLayer.fold_policy = "never"
    try:
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)  # rotate path = fold path
    finally:
        OrthoLayer.fold_policy = "auto"
    model.merge_adapter()
    torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    for key, value in model.get_base_model().state_dict().items():
        if "base_layer" in key:
            plain = key.replace("base_layer.", "")
            torch.testing.assert_close(value, weights[plain], atol=1e-5, rtol=1e-5)


def test_magnitude_saves_loads_and_merges_into_a_plain_model(tmp_path):
    x = torch.randn(5, 16)
    config = orthora.OrthoConfig(
        target_modules=["up", "down"], block_size=8, magnitude=True, generator_scale="auto"
    )
    model = get_peft_model(MLP(), config)
    _perturb(model)
    expected = model(x)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(MLP(), tmp_path)
    assert loaded.peft_config["default"].magnitude and loaded.peft_config["default"].generator_scale == "auto"
    torch.testing.assert_close(loaded(x), expected, atol=1e-6, rtol=0)
    merged = loaded.merge_and_unload()
    assert isinstance(merged.up, nn.Linear)
    torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("saved_as", ["number", "auto"])
def test_an_adapter_saved_before_a_default_changed_loads_as_it_was_trained(tmp_path, saved_as):
    """PEFT writes every field, so a field is missing from a file only when the file predates it: a format-1 adapter
    without ``generator_scale`` and ``magnitude`` was trained at scale 1 without a magnitude and must load so, not
    with today's defaults ("auto", True)."""
    x = torch.randn(5, 16)
    config = orthora.OrthoConfig(
        target_modules=["up", "down"], block_size=8, generator_scale=1.0, magnitude=False
    )
    model = get_peft_model(MLP(), config)
    _perturb(model)
    expected = model(x)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["format_version"] == orthora.config.FORMAT_VERSION and saved["generator_scale"] == 1.0
    del saved["generator_scale"], saved["magnitude"]
    if saved_as == "number":  # a file of format 1, written before the field existed
        saved["format_version"] = 1
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    loaded = PeftModel.from_pretrained(MLP(), tmp_path)
    scale, magnitude = loaded.peft_config["default"].generator_scale, loaded.peft_config["default"].magnitude
    if saved_as == "number":
        assert scale == 1.0 and type(scale) is float and magnitude is False
        torch.testing.assert_close(loaded(x), expected)
    else:  # today's format without the keys: today's defaults
        assert scale == "auto" and type(scale) is str and magnitude is True
        assert (loaded(x) - expected).abs().max() > 1e-3
    assert (
        orthora.OrthoConfig().generator_scale == "auto" and type(orthora.OrthoConfig().generator_scale) is str
    )
    assert orthora.OrthoConfig().magnitude is True
    assert orthora.OrthoConfig.check_kwargs(format_version=1) == {
        "generator_scale": 1.0,
        "magnitude": False,
        "format_version": 1,
    }
    # what a file holds wins
    assert orthora.OrthoConfig.check_kwargs(generator_scale=0.5)["generator_scale"] == 0.5
    assert orthora.OrthoConfig.check_kwargs()["generator_scale"] == 1.0  # no format_version: the first format


def test_magnitude_adds_one_parameter_per_output_feature_and_can_change_norms():
    plain = get_peft_model(MLP(), orthora.OrthoConfig(target_modules=["up"], block_size=8, magnitude=False))
    scaled = get_peft_model(MLP(), orthora.OrthoConfig(target_modules=["up"], block_size=8, magnitude=True))
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(scaled) - count(plain) == 32
    layer = scaled.base_model.model.up
    with torch.no_grad():
        layer.ortho_magnitude["default"].weight.fill_(2.0)
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), 2 * layer.get_base_layer()(x))


@pytest.mark.parametrize("parametrization", ["cayley", "exp", "cayley_neumann"])
def test_generator_scale_multiplies_the_generator(parametrization):
    params = 0.05 * torch.randn(3, 28, generator=torch.Generator().manual_seed(0))
    scaled = rotations.orthogonal_blocks(params, parametrization, 8, scale=0.25)
    direct = rotations.orthogonal_blocks(0.25 * params, parametrization, 8)
    torch.testing.assert_close(scaled, direct)


def _max_angle(blocks: torch.Tensor) -> float:
    """The largest eigen-angle (radians) of any block: how far the rotation turned some plane."""
    return float(torch.linalg.eigvals(blocks.double()).angle().abs().max())


@pytest.mark.parametrize("parametrization", ["cayley", "exp", "householder"])
def test_auto_scale_makes_one_adam_step_the_same_angle_for_every_block_size(parametrization):
    """The point of 'auto': one Adam step of learning rate lr turns a block by ~lr radians (up to a factor of a few),
    for b = 8 and b = 128 alike and for every map; unscaled skew generators turn ~sqrt(b) times more."""
    lr = 1e-3

    def angle_after_one_step(block_size: int, scale) -> float:
        config = orthora.OrthoConfig(
            block_size=block_size, parametrization=parametrization, generator_scale=scale
        )
        layer = orthora.BlockRotation(block_size * 4, 4, block_size, config)
        optimizer = torch.optim.Adam(layer.parameters(), lr=lr)
        target = torch.randn(4, block_size, block_size, generator=torch.Generator().manual_seed(block_size))
        (layer.blocks() * target).sum().backward()
        optimizer.step()
        with torch.no_grad():
            return _max_angle(layer.blocks())

    small, large = angle_after_one_step(8, "auto"), angle_after_one_step(128, "auto")
    assert 0.5 * lr < small < 4 * lr and 0.5 * lr < large < 4 * lr
    assert 0.4 < large / small < 2.5
    if parametrization != "householder":
        raw_small, raw_large = angle_after_one_step(8, 1.0), angle_after_one_step(128, 1.0)
        assert raw_large / raw_small > 2.5  # ~sqrt(128 / 8) = 4 without the scale


def test_householder_scale_divides_the_initial_vectors_and_keeps_the_identity():
    config = orthora.OrthoConfig(block_size=8, parametrization="householder", generator_scale=0.1)
    torch.manual_seed(0)
    scaled = orthora.BlockRotation(16, 2, 8, config)
    torch.manual_seed(0)
    unscaled = orthora.OrthoConfig(block_size=8, parametrization="householder", generator_scale=1.0)
    plain = orthora.BlockRotation(16, 2, 8, unscaled)
    torch.testing.assert_close(scaled.weight, plain.weight / 0.1)
    torch.testing.assert_close(scaled.blocks(), torch.eye(8).expand(2, 8, 8), atol=1e-6, rtol=0)


@pytest.mark.parametrize("value", [0, -1.0, math.inf, "fast", True, None])
def test_bad_generator_scale_is_refused(value):
    with pytest.raises(ValueError, match="generator_scale must be a positive number or 'auto'"):
        orthora.OrthoConfig(generator_scale=value)


def test_bad_magnitude_is_refused():
    with pytest.raises(ValueError, match="magnitude must be True or False"):
        orthora.OrthoConfig(magnitude="yes")


def test_unmerge_refuses_a_magnitude_at_zero_and_leaves_the_weights_alone():
    model = get_peft_model(MLP(), orthora.OrthoConfig(target_modules=["up"], block_size=8, magnitude=True))
    layer = model.base_model.model.up
    with torch.no_grad():
        layer.ortho_magnitude["default"].weight[3] = 0.0
    model.merge_adapter()
    merged = layer.get_base_layer().weight.clone()
    with pytest.raises(ValueError, match="magnitude has entries at 0"):
        model.unmerge_adapter()
    torch.testing.assert_close(layer.get_base_layer().weight, merged)
    assert layer.merged_adapters == ["default"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_magnitude_follows_the_adapter_dtype_contract(dtype):
    config = orthora.OrthoConfig(target_modules=["up"], block_size=8, magnitude=True)
    as_float32 = get_peft_model(MLP().to(dtype), config)
    assert as_float32.base_model.model.up.ortho_magnitude["default"].weight.dtype == torch.float32
    config = orthora.OrthoConfig(target_modules=["up"], block_size=8, magnitude=True)
    native = get_peft_model(MLP().to(dtype), config, autocast_adapter_dtype=False)
    assert native.base_model.model.up.ortho_magnitude["default"].weight.dtype == dtype
