"""Householder rotations applied in factored form ``I - U^T C`` (``2·N·d·r`` instead of ``N·d·b``): the same outputs
and gradients as the dense blocks, on every side and path, and a cost model that picks them only when cheaper."""

from __future__ import annotations

import peft
import pytest
import torch
from tiny_models import _llama, batch_for
from torch import nn

import orthora
from orthora import OrthoLayer, rotations

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("shared", [False, True], ids=["per-block", "shared"])
def test_rotate_factored_equals_dense_blocks_in_float64(shared):
    torch.manual_seed(0)
    vectors = torch.randn(1 if shared else 3, 4, 8, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 2, 24, dtype=torch.float64, requires_grad=True)
    weights = torch.randn_like(x)
    results = []
    for factored in (True, False):
        if factored:
            y = rotations.rotate_factored(x, *rotations.householder_factors(vectors))
        else:
            y = rotations.rotate(x, rotations.householder(vectors))
        x_grad, v_grad = torch.autograd.grad((y * weights).sum(), (x, vectors))
        results.append((y, x_grad, v_grad))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda x, v: rotations.rotate_factored(x, *rotations.householder_factors(v)), (x, vectors)
    )
    with torch.no_grad():  # the no-autograd branch
        torch.testing.assert_close(
            rotations.rotate_factored(x, *rotations.householder_factors(vectors)), results[1][0]
        )


def test_rotate_factored_under_bf16_autocast_matches_dense():
    """bf16 activations, float32 factors: within bf16 rounding of the exact result, like the dense path, with
    float32 parameter gradients."""
    torch.manual_seed(0)
    vectors = torch.randn(4, 2, 16, requires_grad=True)
    x = torch.randn(64, 64).to(torch.bfloat16).requires_grad_()
    weights = torch.randn(64, 64)  # a loss that is not rotation-invariant, unlike sum(y**2)

    def run(factored: bool, autocast: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            inputs = x if autocast else x.double()
            v = vectors if autocast else vectors.double()
            if factored:
                y = rotations.rotate_factored(inputs, *rotations.orthogonal_factors(v, v.dtype))
            else:
                y = rotations.rotate(
                    inputs, rotations.orthogonal_blocks(v, "householder", 16, compute_dtype=v.dtype)
                )
        return (y, *torch.autograd.grad((y.float() * weights).sum(), (x, vectors)))

    exact = run(False, autocast=False)
    for factored in (True, False):
        got = run(factored, autocast=True)
        assert got[0].dtype == torch.bfloat16 and got[2].dtype == torch.float32
        for value, reference in zip(got, exact, strict=True):
            error = (value.double() - reference.double()).norm() / reference.double().norm()
            assert error < 1e-2, (factored, error)


def test_rotate_factored_rejects_a_wrong_width():
    units, coefficients = rotations.householder_factors(torch.randn(3, 2, 8))
    with pytest.raises(ValueError, match="rotation of width 3x8 cannot act on features of width 16"):
        rotations.rotate_factored(torch.randn(2, 16), units, coefficients)


def test_cost_model():
    # dense: folding wins exactly when tokens exceed the input width (output side), as before
    assert rotations.folding_is_cheaper(1025, 1024, 1024, 32, None)
    assert not rotations.folding_is_cheaper(1024, 1024, 1024, 32, None)
    # factored Householder: 8·r + overhead < 3·b, whatever the token count (measured: wins at b >= 128 only)
    assert rotations.factored_is_cheaper(256, 8) and rotations.factored_is_cheaper(128, 16)
    assert not rotations.factored_is_cheaper(64, 2) and not rotations.factored_is_cheaper(128, 32)
    assert rotations.rotation_step_cost(10, 64, 256, 8) == 10 * 64 * (
        8 * 8 + rotations.FACTORED_PASS_OVERHEAD
    )
    assert rotations.rotation_step_cost(10, 64, 32, 2) == 3 * 10 * 64 * 32
    # with 8 reflections per 256-block the factored rotation beats folding even at 4096 tokens on a 1024 width
    assert rotations.folding_is_cheaper(4096, 1024, 1024, 256, None)
    assert not rotations.folding_is_cheaper(4096, 1024, 1024, 256, None, out_reflections=8)


def _loss_and_grads(model, batch, autocast: bool = False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b, rtol=1e-5, atol=1e-7):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    assert a[1].keys() == b[1].keys() and a[1]
    for name, grad in a[1].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(b[1][name], grad, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("checkpointing", [None, "non-reentrant", "reentrant"])
@pytest.mark.parametrize("side", ["output", "input", "both"])
def test_factored_layers_match_dense_blocks(side, checkpointing, monkeypatch):
    monkeypatch.setattr(OrthoLayer, "fold_policy", "never")
    config = orthora.OrthoConfig(
        target_modules=TARGETS, block_size=16, side=side, parametrization="householder", init_weights=False
    )
    torch.manual_seed(0)
    model = peft.get_peft_model(_llama(), config)
    model.train()
    rotation = next(m for m in model.modules() if isinstance(m, orthora.layer.BlockRotation))
    assert rotation.factored and not rotation.factored_is_cheaper  # tiny blocks: "always" forces the path
    monkeypatch.setattr(OrthoLayer, "factor_policy", "always")
    if checkpointing:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"}
        )
        model.enable_input_require_grads()
    batch = batch_for("lm", batch=2, length=12)
    calls = []
    real = rotations.rotate_factored
    monkeypatch.setattr(rotations, "rotate_factored", lambda *a: calls.append(1) or real(*a))
    factored = _loss_and_grads(model, batch)
    assert calls
    monkeypatch.setattr(OrthoLayer, "factor_policy", "never")
    calls.clear()
    _assert_same(factored, _loss_and_grads(model, batch))
    assert not calls
    monkeypatch.setattr(OrthoLayer, "factor_policy", "always")
    with torch.no_grad():  # evaluation (cached factors) too
        model.eval()
        logits = model(**batch).logits
        monkeypatch.setattr(OrthoLayer, "factor_policy", "never")
        torch.testing.assert_close(model(**batch).logits, logits, rtol=1e-5, atol=1e-6)


def test_factored_path_choice_and_fallbacks(monkeypatch):
    """The cost model picks the path ("auto"); module dropout keeps dense blocks; Conv2d channels go factored."""
    for reflections, expected in ((8, True), (80, False)):  # 8·8 + 192 < 3·256 < 8·80 + 192
        config = orthora.OrthoConfig(
            target_modules=["0"], block_size=256, parametrization="householder", num_reflections=reflections
        )
        model = peft.get_peft_model(nn.Sequential(nn.Linear(256, 256)), config)
        called = []
        real = rotations.rotate_factored
        monkeypatch.setattr(
            rotations, "rotate_factored", lambda *a, real=real, called=called: called.append(1) or real(*a)
        )
        model(torch.randn(3, 256))
        monkeypatch.setattr(rotations, "rotate_factored", real)
        assert bool(called) == expected, reflections

    conv = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1))
    conv_model = peft.get_peft_model(
        conv,
        orthora.OrthoConfig(
            target_modules=["0"],
            block_size=16,
            side="both",
            parametrization="householder",
            init_weights=False,
        ),
    )
    x = torch.randn(2, 16, 5, 5, requires_grad=True)
    weights = torch.randn(2, 32, 5, 5)  # not rotation-invariant, unlike sum(y**2)
    outputs = []
    for policy in ("always", "never"):
        monkeypatch.setattr(OrthoLayer, "factor_policy", policy)
        y = conv_model(x)
        outputs.append(
            (
                y,
                *torch.autograd.grad(
                    (y * weights).sum(), [x, *(p for p in conv_model.parameters() if p.requires_grad)]
                ),
            )
        )
    for got, want in zip(*outputs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    monkeypatch.setattr(OrthoLayer, "factor_policy", "always")
    dropout = orthora.OrthoConfig(
        target_modules=TARGETS, block_size=16, parametrization="householder", module_dropout=0.5
    )
    model = peft.get_peft_model(_llama(), dropout)
    model.train()
    called = []
    monkeypatch.setattr(rotations, "rotate_factored", lambda *a: called.append(1))
    model(**batch_for("lm", batch=1, length=5)).loss.backward()
    assert not called
