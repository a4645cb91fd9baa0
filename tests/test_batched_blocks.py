"""Batched block construction: one call per (parametrization, block size, dtype, device) per forward must give the
same outputs and parameter gradients as every layer building its own blocks, on every path a forward can take."""

from __future__ import annotations

import peft
import pytest
import torch
from tiny_models import _llama, batch_for

import orthora
from orthora import OrthoLayer, rotations
from orthora.model import OrthoModel

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(config: orthora.OrthoConfig, seed: int = 0):
    torch.manual_seed(seed)
    return peft.get_peft_model(_llama(), config)


def _count_builds(monkeypatch) -> list[int]:
    """Record the number of blocks of every orthogonal_blocks call the layers make."""
    calls: list[int] = []
    for name in ("orthogonal_blocks", "orthogonal_factors"):  # dense blocks, or factored Householder
        real = getattr(rotations, name)

        def counting(params, *args, real=real, **kwargs):
            calls.append(params.shape[0])
            return real(params, *args, **kwargs)

        monkeypatch.setattr(rotations, name, counting)
    return calls


def _loss_and_grads(model, batched: bool, monkeypatch, batch=None, autocast: bool = False):
    monkeypatch.setattr(OrthoModel, "batch_block_construction", batched)
    batch = batch or batch_for("lm", batch=2, length=12)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _assert_same(a, b):
    loss_a, grads_a = a
    loss_b, grads_b = b
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-7)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, grad in grads_a.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("fold", ["always", "never"], ids=["fold-path", "rotate-path"])
@pytest.mark.parametrize("side", ["output", "input", "both"])
@pytest.mark.parametrize("parametrization", ["cayley", "exp", "householder", "cayley_neumann"])
def test_batched_construction_gives_the_same_loss_and_gradients(parametrization, side, fold, monkeypatch):
    monkeypatch.setattr(OrthoLayer, "fold_policy", fold)
    config = orthora.OrthoConfig(
        target_modules=TARGETS, block_size=16, side=side, parametrization=parametrization, init_weights=False
    )
    model = _model(config)
    model.train()
    per_layer = _loss_and_grads(model, False, monkeypatch)
    calls = _count_builds(monkeypatch)
    batched = _loss_and_grads(model, True, monkeypatch)
    _assert_same(per_layer, batched)
    rotations_count = len(TARGETS) * 2 * (2 if side == "both" else 1)
    total_blocks = sum(
        r.weight.shape[0]
        for m in model.modules()
        if isinstance(m, OrthoLayer)
        for r in m._rotations("default")
        if r
    )
    # every layer's blocks in one call per group (the 64- and 32-wide and the 128-wide rotations share block 16)
    assert len(calls) == 1 and calls[0] == total_blocks, (calls, rotations_count)


def test_batched_construction_with_checkpointing_and_autocast(monkeypatch):
    """Non-reentrant checkpointing recomputes each decoder layer in backward from the batched blocks; reentrant
    checkpointing runs layers without autograd first, so they build their own graph when recomputed."""
    config = orthora.OrthoConfig(target_modules=TARGETS, block_size=16, side="both", init_weights=False)
    for use_reentrant in (False, True):
        for autocast in (False, True):
            model = _model(config)
            model.train()
            reference = _loss_and_grads(model, False, monkeypatch, autocast=autocast)
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": use_reentrant}
            )
            if use_reentrant:
                model.enable_input_require_grads()
            _assert_same(reference, _loss_and_grads(model, True, monkeypatch, autocast=autocast))


def test_cache_follows_optimizer_steps_and_backward_passes(monkeypatch):
    """Training steps with and without batching stay identical (the cache sees every parameter update), and a
    forward after a backward (the batched graph is freed) or straight through the inner model still trains."""
    config = orthora.OrthoConfig(target_modules=TARGETS, block_size=16, init_weights=False)
    finals = []
    for batched in (False, True):
        monkeypatch.setattr(OrthoModel, "batch_block_construction", batched)
        model = _model(config)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for step in range(3):
            batch = batch_for("lm", batch=2, length=10, seed=step)
            optimizer.zero_grad()
            loss = model(**batch).loss + model(**batch_for("lm", batch=2, length=10, seed=step + 7)).loss
            loss.backward()  # two forwards, one backward: both use this step's blocks
            optimizer.step()
        # no optimizer step between: a second backward through a new forward must not reuse the freed graph
        model(**batch).loss.backward()
        model.base_model.model(**batch).loss.backward()  # the inner model directly (no batched build)
        finals.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, value in finals[0].items():
        torch.testing.assert_close(finals[1][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_eval_merge_multiple_adapters_and_mixed_batches(monkeypatch):
    """no_grad / eval forwards, a merged adapter next to an unmerged one, and per-sample adapters in one batch."""
    torch.manual_seed(0)
    model = peft.get_peft_model(
        _llama(), orthora.OrthoConfig(target_modules=TARGETS, block_size=16, init_weights=False)
    )
    model.add_adapter(
        "other", orthora.OrthoConfig(target_modules=TARGETS, block_size=16, side="input", init_weights=False)
    )
    model.base_model.set_adapter(["default", "other"])
    batch = batch_for("lm", batch=2, length=12)
    model.train()
    reference = _loss_and_grads(model, False, monkeypatch, batch=batch)
    _assert_same(reference, _loss_and_grads(model, True, monkeypatch, batch=batch))
    assert any(k.endswith("other.weight") for k in reference[1])
    model.eval()
    with torch.no_grad():
        monkeypatch.setattr(OrthoModel, "batch_block_construction", False)
        logits = model(**batch).logits
        monkeypatch.setattr(OrthoModel, "batch_block_construction", True)
        torch.testing.assert_close(model(**batch).logits, logits)
    # after a training forward, an eval forward without autograd reads the same blocks
    model.train()
    model(**batch).loss.backward()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, logits, rtol=1e-5, atol=1e-6)
    # merge the first adapter: the forward applies only the second one on top of the merged weights
    model.base_model.merge_adapter(["default"])
    model.train()
    reference = _loss_and_grads(model, False, monkeypatch, batch=batch)
    _assert_same(reference, _loss_and_grads(model, True, monkeypatch, batch=batch))
    assert all(".other." in name for name in reference[1]), list(reference[1])
    model.base_model.unmerge_adapter()
    # mixed batch (eval mode, with autograd): each sample its own adapter
    model.eval()
    model.base_model.set_adapter("default")
    names = ["default", "__base__"]
    outputs = []
    for batched in (False, True):
        monkeypatch.setattr(OrthoModel, "batch_block_construction", batched)
        outputs.append(model(**{k: v for k, v in batch.items() if k != "labels"}, adapter_names=names).logits)
    torch.testing.assert_close(outputs[1], outputs[0])


def test_checkpoint_recomputation_after_the_batched_graph_is_gone(monkeypatch):
    """Two forwards, backward of the second first: the first one's recomputation finds the batched graph freed and
    builds its own blocks, which non-reentrant checkpointing accepts only because construction is not part of
    what it recomputes (layer.saved_outside_checkpoints)."""
    config = orthora.OrthoConfig(target_modules=TARGETS, block_size=16, side="both", init_weights=False)
    results = []
    for batched in (False, True):
        monkeypatch.setattr(OrthoModel, "batch_block_construction", batched)
        model = _model(config)
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        first = model(**batch_for("lm", batch=2, length=12, seed=1)).loss
        second = model(**batch_for("lm", batch=2, length=12, seed=2)).loss
        second.backward()
        first.backward()
        results.append(
            (first.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        )
    _assert_same(*results)
