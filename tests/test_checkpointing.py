"""Gradient checkpointing recomputes each decoder layer's forward during backward; orthora's custom backward paths
(the folded matmul and the activation rotation, output and input side) must then give the gradients they give
without checkpointing, with the non-reentrant and the reentrant implementation alike."""

from __future__ import annotations

import peft
import pytest
import torch
from tiny_models import _llama, batch_for

import orthora
from orthora import OrthoLayer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _gradients(config: orthora.OrthoConfig, checkpointing: bool, use_reentrant: bool, autocast: bool = False):
    torch.manual_seed(0)
    model = peft.get_peft_model(
        _llama(), config
    )  # init_weights=False: random rotations, non-trivial gradients
    calls = []
    for module in model.modules():
        if isinstance(module, OrthoLayer):
            module.register_forward_hook(lambda *_: calls.append(1))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        if (
            use_reentrant
        ):  # reentrant checkpoints need an input that requires grad (the frozen embedding has none)
            model.enable_input_require_grads()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**batch_for("lm", batch=2, length=40)).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, len(calls)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("fold", ["always", "never"], ids=["fold-path", "rotate-path"])
@pytest.mark.parametrize("side", ["output", "input", "both"])
@pytest.mark.parametrize("parametrization", ["cayley", "householder"])
def test_checkpointing_gives_the_same_gradients(parametrization, side, fold, use_reentrant, monkeypatch):
    monkeypatch.setattr(OrthoLayer, "fold_policy", fold)
    config = orthora.OrthoConfig(
        target_modules=TARGETS,
        block_size=16,
        side=side,
        parametrization=parametrization,
        init_weights=False,
        magnitude=False,  # rotations only (the magnitude has its own test below)
    )
    loss, grads, calls = _gradients(config, checkpointing=False, use_reentrant=use_reentrant)
    loss_ckpt, grads_ckpt, calls_ckpt = _gradients(config, checkpointing=True, use_reentrant=use_reentrant)
    # adapted layers really ran again in backward (non-reentrant stops early once the saved tensors are back)
    assert calls_ckpt == 2 * calls if use_reentrant else calls < calls_ckpt <= 2 * calls
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads.keys() == grads_ckpt.keys() and len(grads) == 2 * len(TARGETS) * (2 if side == "both" else 1)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("parametrization", ["exp", "cayley_neumann"])
def test_checkpointing_other_maps(parametrization):
    """exp (its own backward) and the approximate cayley_neumann (always the rotate path) under recomputation."""
    config = orthora.OrthoConfig(
        target_modules=TARGETS,
        block_size=16,
        side="both",
        parametrization=parametrization,
        init_weights=False,
    )
    loss, grads, _ = _gradients(config, checkpointing=False, use_reentrant=False)
    loss_ckpt, grads_ckpt, _ = _gradients(config, checkpointing=True, use_reentrant=False)
    torch.testing.assert_close(loss_ckpt, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("fold", ["always", "never"], ids=["fold-path", "rotate-path"])
def test_checkpointing_with_magnitude(fold, monkeypatch):
    """The per-output-feature magnitude (scaled activations or folded weights) under recomputation."""
    monkeypatch.setattr(OrthoLayer, "fold_policy", fold)
    config = orthora.OrthoConfig(
        target_modules=TARGETS, block_size=16, side="both", magnitude=True, init_weights=False
    )
    loss, grads, _ = _gradients(config, checkpointing=False, use_reentrant=False)
    loss_ckpt, grads_ckpt, _ = _gradients(config, checkpointing=True, use_reentrant=False)
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads.keys() == grads_ckpt.keys() and len(grads) == 2 * len(TARGETS) * 3  # out, in, magnitude
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize(
    ("fold", "side"),
    [
        *[("always", side) for side in ("output", "input", "both")],
        *[("never", side) for side in ("output", "input", "both")],
    ],
)
def test_checkpointing_under_bf16_autocast(fold, side, monkeypatch):
    """Mixed precision as accelerate runs it (float32 weights, bf16 autocast): same gradients with recomputation."""
    monkeypatch.setattr(OrthoLayer, "fold_policy", fold)
    config = orthora.OrthoConfig(target_modules=TARGETS, block_size=16, side=side, init_weights=False)
    loss, grads, _ = _gradients(config, checkpointing=False, use_reentrant=False, autocast=True)
    loss_ckpt, grads_ckpt, _ = _gradients(config, checkpointing=True, use_reentrant=False, autocast=True)
    torch.testing.assert_close(loss_ckpt, loss)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name  # adapters stay float32 under autocast
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)
