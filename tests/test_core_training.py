"""A training smoke test: orthora alone (plus the head) learns a separable task on a tiny BERT."""

import pytest
import torch
from peft import get_peft_model
from tiny_models import tiny_bert

from orthora import OrthoConfig


def make_separable_data(n: int, seed: int):
    """Label 1: the sequence's signal words come from ids 10-14, label 0: from ids 15-19; the rest is filler."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    length = 12
    ids = torch.randint(20, 128, (n, length), generator=g)  # neutral filler
    for i in range(n):
        lo = 10 if labels[i] == 1 else 15
        pos = torch.randperm(length, generator=g)[:6]
        ids[i, pos] = torch.randint(lo, lo + 5, (6,), generator=g)
    return ids, labels


TINY = dict(hidden=64, initializer_range=0.2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def train_and_score(model, epochs: int = 4, lr: float = 1e-2) -> float:
    train_x, train_y = make_separable_data(512, seed=0)
    test_x, test_y = make_separable_data(256, seed=1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _epoch in range(epochs):
        perm = torch.randperm(len(train_x))
        for start in range(0, len(train_x), 32):
            idx = perm[start : start + 32]
            loss = model(input_ids=train_x[idx], labels=train_y[idx]).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    model.eval()
    with torch.no_grad():
        return (model(input_ids=test_x).logits.argmax(-1) == test_y).float().mean().item()


def test_tiny_bert_learns_a_separable_task_with_only_orthora_and_the_head():
    torch.manual_seed(0)
    model = get_peft_model(
        tiny_bert(**TINY),
        OrthoConfig(task_type="SEQ_CLS", target_modules=["query", "key", "value", "dense"], block_size=16),
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".ortho_" in n or "classifier" in n for n in trainable)
    accuracy = train_and_score(model)
    assert accuracy > 0.9, accuracy

    # the rotations do the work: the head alone on the same frozen model stays well below
    torch.manual_seed(0)
    head_only = tiny_bert(**TINY)
    for name, param in head_only.named_parameters():
        param.requires_grad = "classifier" in name
    assert train_and_score(head_only) < accuracy - 0.05


@pytest.mark.parametrize(("side", "fold_policy"), [("output", "always"), ("both", "never")])
def test_torch_compile_traces_without_graph_breaks_and_matches_eager(side, fold_policy):
    """``fullgraph=True`` fails on any graph break; the compiled step gives eager's loss and gradients."""
    model = get_peft_model(
        tiny_bert(hidden=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        OrthoConfig(
            task_type="SEQ_CLS",
            target_modules=["query", "value", "dense"],
            block_size=8,
            side=side,
            init_weights=False,
        ),
    )
    for module in model.modules():
        if hasattr(module, "fold_policy"):
            module.fold_policy = fold_policy
    inner = model.base_model.model.train()
    ids, labels = make_separable_data(4, seed=0)
    trainable = [p for p in inner.parameters() if p.requires_grad]

    def loss_and_grads(fn):
        loss = fn(input_ids=ids, labels=labels).loss
        grads = torch.autograd.grad(loss, trainable)
        return loss.detach(), grads

    eager_loss, eager_grads = loss_and_grads(inner)
    compiled_loss, compiled_grads = loss_and_grads(torch.compile(inner, backend="eager", fullgraph=True))
    torch.testing.assert_close(compiled_loss, eager_loss)
    for got, want in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
