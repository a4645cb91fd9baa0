"""Adapter arithmetic on the rotation group: orthora.arithmetic and OrthoModel.add_weighted_adapter."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import batch_for, tiny_bert

import orthora
from orthora import arithmetic, rotations
from orthora.layer import OrthoLayer

TARGETS = ["query", "value"]


def _config(**kwargs) -> orthora.OrthoConfig:
    """A random adapter on the output side without magnitude (what `_blocks` reads), unless a test says otherwise."""
    kwargs.setdefault("target_modules", TARGETS)
    kwargs.setdefault("block_size", 16)
    kwargs.setdefault("init_weights", False)
    kwargs.setdefault("side", "output")
    kwargs.setdefault("magnitude", False)
    return orthora.OrthoConfig(**kwargs)


def _model(first: dict | None = None, **others: dict):
    """A tiny BERT with adapter 'a' (random rotation) and one more adapter per keyword (no heads: task_type None)."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_bert(), _config(**(first or {})), adapter_name="a")
    for name, kwargs in others.items():
        torch.manual_seed(len(name) + 1)
        model.add_adapter(name, _config(**kwargs))
    return model.eval()


def _layers(model) -> list[OrthoLayer]:
    return [m for m in model.modules() if isinstance(m, OrthoLayer)]


def _blocks(model, name: str, side: str = "output") -> list[torch.Tensor]:
    table = "ortho_out" if side == "output" else "ortho_in"
    return [arithmetic.exact_blocks(getattr(layer, table)[name]) for layer in _layers(model)]


def _logits(model, adapter: str) -> torch.Tensor:
    model.set_adapter(adapter)
    with torch.no_grad():
        return model(**batch_for("cls")).logits


def _assert_blocks_close(left: list[torch.Tensor], right: list[torch.Tensor], atol: float = 1e-5) -> None:
    for a, b in zip(left, right, strict=True):
        torch.testing.assert_close(*torch.broadcast_tensors(a, b), atol=atol, rtol=0)


def _assert_orthogonal(model, name: str, side: str = "output") -> None:
    table = "ortho_out" if side == "output" else "ortho_in"
    for layer in _layers(model):
        assert rotations.orthogonality_error(getattr(layer, table)[name].blocks()) < 1e-5


# ------------------------------------------------------------------------------------------------- pure functions
def test_log_inverts_exp_below_pi_and_exp_inverts_log():
    generator = rotations.skew_symmetric(0.3 * torch.randn(6, 28, dtype=torch.float64), 8)
    torch.testing.assert_close(arithmetic.log_rotation(torch.linalg.matrix_exp(generator)), generator)
    rotation = torch.linalg.matrix_exp(
        rotations.skew_symmetric(3 * torch.randn(6, 28, dtype=torch.float64), 8)
    )
    torch.testing.assert_close(torch.linalg.matrix_exp(arithmetic.log_rotation(rotation)), rotation)


@pytest.mark.parametrize("gap", [0.0, 1e-12, 1e-9, 1e-6, 1e-3])
def test_log_of_a_rotation_near_a_half_turn(gap):
    """At an eigen-angle pi the skew part vanishes; the log must still give back R (in a random basis)."""
    generator = torch.zeros(1, 6, 6, dtype=torch.float64)
    generator[0, 0, 1], generator[0, 2, 3] = torch.pi - gap, torch.pi - gap  # two planes at the same angle
    generator[0, 4, 5] = 0.4
    basis, _ = torch.linalg.qr(
        torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    )
    rotation = basis @ torch.linalg.matrix_exp(generator - generator.mT) @ basis.T
    log = arithmetic.log_rotation(rotation)
    torch.testing.assert_close(log, -log.mT)
    torch.testing.assert_close(torch.linalg.matrix_exp(log), rotation, atol=1e-8, rtol=0)


def test_log_refuses_a_reflection():
    reflection = torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64))[None]
    with pytest.raises(ValueError, match="block 0 is a reflection"):
        arithmetic.log_rotation(reflection)


# ------------------------------------------------------------------------------------------------------ geodesic
@pytest.mark.parametrize("parametrization", ["cayley", "exp", "householder"])
def test_weight_zero_is_identity_and_weight_one_reproduces_the_adapter(parametrization):
    model = _model({"parametrization": parametrization})
    model.add_weighted_adapter(["a"], [0.0], "zero", combination_type="geodesic")
    model.add_weighted_adapter(["a"], [1.0], "one", combination_type="geodesic")
    eye = torch.eye(16, dtype=torch.float64)
    _assert_blocks_close(_blocks(model, "zero"), [eye[None]] * len(_layers(model)))
    _assert_blocks_close(_blocks(model, "one"), _blocks(model, "a"))
    torch.testing.assert_close(_logits(model, "one"), _logits(model, "a"), atol=1e-5, rtol=0)
    with model.disable_adapter():
        base = model(**batch_for("cls")).logits
    torch.testing.assert_close(_logits(model, "zero"), base, atol=1e-5, rtol=0)
    assert (
        model.peft_config["one"].parametrization == "exp"
    )  # stored as an exp adapter whatever the input map


@pytest.mark.parametrize("parametrization", ["cayley", "householder"])
def test_geodesic_midpoint_composed_with_itself_is_the_full_rotation(parametrization):
    model = _model({"parametrization": parametrization, "side": "both"})
    model.add_weighted_adapter(["a"], [0.5], "halfway", combination_type="geodesic")
    model.add_weighted_adapter(["halfway", "halfway"], [1, 1], "twice", combination_type="compose")
    for side in ("output", "input"):
        _assert_blocks_close(_blocks(model, "twice", side), _blocks(model, "a", side))
        half = _blocks(model, "halfway", side)[0]
        assert (half - torch.eye(16)).norm() > 0.1  # really a different rotation
    torch.testing.assert_close(_logits(model, "twice"), _logits(model, "a"), atol=1e-5, rtol=0)


def test_negative_weight_gives_the_inverse():
    model = _model({"side": "both"})
    model.add_weighted_adapter(["a"], [-1.0], "inverse", combination_type="geodesic")
    model.add_weighted_adapter(["a", "inverse"], [1, 1], "undone", combination_type="compose")
    for side in ("output", "input"):
        _assert_blocks_close(_blocks(model, "inverse", side), [b.mT for b in _blocks(model, "a", side)])
        _assert_blocks_close(_blocks(model, "undone", side), [torch.eye(16, dtype=torch.float64)[None]] * 4)


def test_two_commuting_adapters_interpolate_on_their_geodesic():
    """With R_b = R_a^2 the combination (1 - t) log R_a + t log R_b is R_a^(1 + t), for t beyond [0, 1] too."""
    model = _model()
    model.add_weighted_adapter(["a"], [2.0], "b", combination_type="geodesic")
    model.add_weighted_adapter(["a", "b"], [-0.5, 1.5], "walk", combination_type="geodesic")
    model.add_weighted_adapter(["a"], [2.5], "expected", combination_type="geodesic")
    _assert_blocks_close(_blocks(model, "walk"), _blocks(model, "expected"))


@pytest.mark.parametrize("kind", ["geodesic", "compose", "linear"])
@pytest.mark.parametrize("weights", [(0.3, 0.7), (-0.5, 1.5), (1.5, -0.5), (2.0, 1.0)])
def test_every_result_is_orthogonal(kind, weights):
    model = _model({"side": "both"}, b={"side": "both"})
    model.add_weighted_adapter(["a", "b"], list(weights), "mix", combination_type=kind)
    for side in ("output", "input"):
        _assert_orthogonal(model, "mix", side)


# ------------------------------------------------------------------------------------------------------- compose
def test_compose_equals_running_the_adapters_one_after_the_other():
    model = _model({"side": "both"}, b={"side": "both", "parametrization": "exp"})
    model.add_weighted_adapter(["a", "b"], [1, 1], "ab", combination_type="compose")
    model.base_model.set_adapter(["a", "b"])
    with torch.no_grad():
        stacked = model(**batch_for("cls")).logits
    torch.testing.assert_close(_logits(model, "ab"), stacked, atol=1e-5, rtol=0)
    assert model.peft_config["ab"].parametrization == "exp"


def test_compose_of_householder_adapters_stays_householder():
    model = _model({"parametrization": "householder"}, b={"parametrization": "householder"})
    model.add_weighted_adapter(["a", "b"], [1, 1], "ab", combination_type="compose")
    config = model.peft_config["ab"]
    assert config.parametrization == "householder" and config.num_reflections == 4
    expected = [
        b @ a for a, b in zip(_blocks(model, "a"), _blocks(model, "b"), strict=True)
    ]  # output: R_b R_a
    _assert_blocks_close(_blocks(model, "ab"), expected)


# -------------------------------------------------------------------------------------------------------- linear
def test_linear_is_the_weighted_sum_of_parameters():
    model = _model(b={})
    model.add_weighted_adapter(["a", "b"], [0.25, -2.0], "lin", combination_type="linear")
    for layer in _layers(model):
        expected = 0.25 * layer.ortho_out["a"].weight - 2.0 * layer.ortho_out["b"].weight
        torch.testing.assert_close(layer.ortho_out["lin"].weight, expected)
    assert model.peft_config["lin"].parametrization == "cayley"


# --------------------------------------------------------------------------------------- like any other adapter
def test_combined_adapter_saves_loads_and_merges(tmp_path):
    model = _model({"parametrization": "householder"}, b={"side": "output"})
    model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "mix", combination_type="geodesic")
    assert not any(
        p.requires_grad for n, p in model.named_parameters() if ".mix." in n
    )  # frozen, like PEFT's
    expected = _logits(model, "mix")
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "mix", adapter_name="mix").eval()
    assert loaded.peft_config["mix"].parametrization == "exp"
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch_for("cls")).logits, expected, atol=1e-5, rtol=0)
        merged = loaded.merge_and_unload()
        torch.testing.assert_close(merged(**batch_for("cls")).logits, expected, atol=1e-4, rtol=0)
    assert not any(isinstance(m, OrthoLayer) for m in merged.modules())


def test_single_head_is_copied_and_two_heads_are_refused():
    torch.manual_seed(0)
    model = get_peft_model(tiny_bert(), _config(task_type="SEQ_CLS"), adapter_name="a").eval()
    model.add_weighted_adapter(["a"], [1.0], "copy", combination_type="geodesic")
    torch.testing.assert_close(_logits(model, "copy"), _logits(model, "a"), atol=1e-5, rtol=0)
    model.add_adapter("b", _config(task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match=r"\['a', 'b'\] each have their own classifier"):
        model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "mix")
    assert "mix" not in model.peft_config


# -------------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("other", "message"),
    [
        ({"block_size": 32}, r"query \(output side\) has 4 blocks of 16 in 'a' but 2 blocks of 32 in 'b'"),
        ({"side": "input"}, r"query \(input side\) is rotated by 'b' but not by 'a'"),
    ],
)
def test_mismatched_block_layouts_are_named(other, message):
    model = _model(b=other)
    with pytest.raises(ValueError, match=message):
        model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "mix", combination_type="geodesic")
    assert "mix" not in model.peft_config and all("mix" not in layer.ortho_out for layer in _layers(model))


def test_different_targets_are_named():
    torch.manual_seed(0)
    model = get_peft_model(tiny_bert(), _config(), adapter_name="a")
    model.add_adapter("b", _config(target_modules=["query"]))
    with pytest.raises(ValueError, match=r"value \(output side\) is rotated by 'a' but not by 'b'"):
        model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "mix", combination_type="geodesic")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ((["a"], [1.0], "x", "svd"), "unknown combination_type 'svd'.*geodesic, compose, linear"),
        ((["a"], [1.0, 2.0], "x", "geodesic"), "2 weights for 1 adapters"),
        ((["a"], [float("nan")], "x", "geodesic"), "finite numbers"),
        ((["a"], [1.0], "a", "geodesic"), "adapter 'a' already exists"),
        ((["zzz"], [1.0], "x", "geodesic"), r"unknown adapter\(s\) \['zzz'\]"),
        ((["a", "n"], [1.0, 1.0], "x", "geodesic"), "'n' uses parametrization='cayley_neumann'"),
        ((["a", "n"], [1.0, 1.0], "x", "linear"), "same parametrization"),
    ],
)
def test_bad_requests_are_refused_before_anything_changes(call, message):
    model = _model(n={"parametrization": "cayley_neumann"})
    before = set(model.peft_config)
    with pytest.raises(ValueError, match=message):
        model.add_weighted_adapter(*call)
    assert set(model.peft_config) == before


def test_odd_householder_reflections_cannot_be_interpolated():
    model = _model({"parametrization": "householder", "num_reflections": 1})
    with pytest.raises(ValueError, match="reflection"):
        model.add_weighted_adapter(["a"], [0.5], "halfway", combination_type="geodesic")
    model.add_weighted_adapter(
        ["a", "a"], [1, 1], "square", combination_type="compose"
    )  # exact product: fine
    _assert_blocks_close(_blocks(model, "square"), [torch.eye(16, dtype=torch.float64)[None]] * 4)


def test_a_result_the_exp_map_would_scale_down_is_refused():
    """32 random reflections give large angles in a random basis: log R exceeds the exp map's safe radius."""
    torch.manual_seed(0)
    config = orthora.OrthoConfig(
        target_modules=["query"],
        block_size=32,
        parametrization="householder",
        num_reflections=32,
        init_weights=False,
        side="output",
    )
    model = get_peft_model(tiny_bert(), config, adapter_name="a")
    with pytest.raises(ValueError, match=r"layer.0.attention.self.query \(output side\).*cannot be stored"):
        model.add_weighted_adapter(["a"], [1.0], "copy", combination_type="geodesic")
    assert "copy" not in model.peft_config


def test_generator_scale_is_honoured_by_inputs_and_result():
    """With generator_scale='auto' the map multiplies the parameters; the combined adapter must undo that."""
    model = _model({"generator_scale": "auto", "side": "both"})
    model.add_weighted_adapter(["a"], [1.0], "one", combination_type="geodesic")
    model.add_weighted_adapter(["a"], [0.5], "halfway", combination_type="geodesic")
    model.add_weighted_adapter(["halfway", "halfway"], [1, 1], "twice", combination_type="compose")
    assert model.peft_config["one"].generator_scale == "auto"
    for side in ("output", "input"):
        _assert_blocks_close(_blocks(model, "one", side), _blocks(model, "a", side))
        _assert_blocks_close(_blocks(model, "twice", side), _blocks(model, "a", side))
    torch.testing.assert_close(_logits(model, "one"), _logits(model, "a"), atol=1e-5, rtol=0)


def _with_random_magnitude(model, name: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for layer in _layers(model):
        scale = layer.ortho_magnitude[name].weight
        with torch.no_grad():
            scale.copy_(0.5 + torch.rand(scale.shape, generator=generator))


def test_magnitudes_follow_the_geodesic_and_compose_refuses_them():
    model = _model({"magnitude": True}, b={"magnitude": True})
    _with_random_magnitude(model, "a", 1)
    _with_random_magnitude(model, "b", 2)
    model.add_weighted_adapter(["a"], [1.0], "one", combination_type="geodesic")
    torch.testing.assert_close(_logits(model, "one"), _logits(model, "a"), atol=1e-5, rtol=0)
    model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "mid", combination_type="geodesic")
    model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "lin", combination_type="linear")
    for layer in _layers(model):
        s_a, s_b = layer.ortho_magnitude["a"].weight, layer.ortho_magnitude["b"].weight
        torch.testing.assert_close(layer.ortho_magnitude["mid"].weight, (s_a * s_b).sqrt())
        torch.testing.assert_close(layer.ortho_magnitude["lin"].weight, (s_a + s_b) / 2)
    with pytest.raises(
        ValueError, match=r"compose cannot combine adapters with magnitude=True \(\['a', 'b'\]\)"
    ):
        model.add_weighted_adapter(["a", "b"], [1, 1], "ab", combination_type="compose")


def test_the_riemannian_geodesic_between_two_adapters_from_inverse_compose_and_power():
    """R_a (R_a^T R_b)^t on both sides, built only from add_weighted_adapter calls (the recipe in the docs)."""
    t = 0.3
    model = _model({"side": "both"}, b={"side": "both"})
    model.add_weighted_adapter(["a"], [-1.0], "a_inv", combination_type="geodesic")
    model.add_weighted_adapter(["a_inv", "b"], [1, 1], "a_to_b", combination_type="compose")
    model.add_weighted_adapter(["a_to_b"], [t], "part", combination_type="geodesic")
    model.add_weighted_adapter(["a", "part"], [1, 1], "walk", combination_type="compose")
    for side in ("output", "input"):
        expected = [
            a @ arithmetic.rotation_power(a.mT @ b, t)
            for a, b in zip(_blocks(model, "a", side), _blocks(model, "b", side), strict=True)
        ]
        _assert_blocks_close(_blocks(model, "walk", side), expected)
