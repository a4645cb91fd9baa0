"""Every listed architecture runs forward + backward with orthora, starts at the identity and merges exactly."""

import pytest
import torch
from peft import get_peft_model
from tiny_models import ARCHITECTURES, batch_for, model_output

from orthora import OrthoConfig
from orthora.layer import BlockRotation, OrthoLayer


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("side, fold", [("output", "never"), ("both", "always")])
def test_architecture_forward_backward_merge(name, side, fold, monkeypatch):
    monkeypatch.setattr(OrthoLayer, "fold_policy", fold)
    build, task_type, targets, kind = ARCHITECTURES[name]
    torch.manual_seed(0)
    base = build().eval()
    batch = batch_for(kind)
    reference = model_output(base, batch).detach()
    model = get_peft_model(
        base, OrthoConfig(task_type=task_type, target_modules=targets, block_size=16, side=side)
    )
    assert sum(isinstance(m, OrthoLayer) for m in model.modules()) >= 2 * len(targets) // 2
    assert (model_output(model, batch) - reference).abs().max() < 1e-5

    model.train()
    out = model(**batch)
    out.loss.backward()
    rots = {n: m for n, m in model.named_modules() if isinstance(m, BlockRotation)}
    assert rots and all(r.weight.grad is not None for r in rots.values())
    no_gradient = [n for n, r in rots.items() if not r.weight.grad.abs().sum() > 0]
    assert not no_gradient, f"targeted modules without a gradient: {no_gradient}"
    frozen = [
        n
        for n, p in model.named_parameters()
        if "ortho_" not in n and p.grad is not None and "modules_to_save" not in n
    ]
    assert not frozen, frozen[:3]

    with torch.no_grad():
        for r in rots.values():
            r.weight.add_(0.05 / r.scale * torch.randn_like(r.weight))  # the same rotation at every scale
    model.eval()
    adapted = model_output(model, batch).detach()
    merged = model.merge_and_unload()
    assert torch.allclose(
        model_output(merged, batch), adapted, atol=1e-4 * max(1.0, adapted.abs().max().item())
    )


def test_default_targets_cover_the_listed_architectures():
    for name, (build, task_type, _, _kind) in ARCHITECTURES.items():
        model = get_peft_model(build(), OrthoConfig(task_type=task_type, block_size=16))
        assert any(isinstance(m, OrthoLayer) for m in model.modules()), name


@pytest.mark.parametrize("name", ["bart", "gpt2"])
def test_generate_with_mixed_adapters_and_beams(name):
    """Each row of a mixed-adapter beam search equals generating that row alone with its own adapter."""
    build, task_type, targets, kind = ARCHITECTURES[name]
    targets = [*targets, "lm_head"]  # a tiny random model generates one token whatever its attention does
    torch.manual_seed(0)
    model = get_peft_model(build(), OrthoConfig(task_type=task_type, target_modules=targets, block_size=16))
    model.add_adapter("other", OrthoConfig(task_type=task_type, target_modules=targets, block_size=8))
    with torch.no_grad():  # non-identity adapters, as after training, so each adapter changes the generation
        for r in (m for m in model.modules() if isinstance(m, BlockRotation)):
            r.weight.add_(0.5 / r.scale * torch.randn_like(r.weight))  # the same rotation at every scale
    model.eval()
    ids = batch_for(kind, batch=3, length=6, seed=1)["input_ids"]
    names = ["default", "other", "__base__"]
    settings = {
        "num_beams": 3,
        "max_new_tokens": 5,
        "min_new_tokens": 5,
        "do_sample": False,
        "pad_token_id": 0,
    }
    mixed = model.generate(input_ids=ids, adapter_names=names, **settings)
    alone = {}
    for adapter in ("default", "other", "__base__"):
        for row in range(3):
            if adapter == "__base__":
                with model.disable_adapter():
                    alone[adapter, row] = model.generate(input_ids=ids[row : row + 1], **settings)[0]
            else:
                model.set_adapter(adapter)
                alone[adapter, row] = model.generate(input_ids=ids[row : row + 1], **settings)[0]
    for row, adapter in enumerate(names):
        assert torch.equal(mixed[row], alone[adapter, row]), (row, adapter)
    # the adapters really differ, so a mix-up of rows and adapters would be caught
    assert any(not torch.equal(alone["default", r], alone["other", r]) for r in range(3))
    assert any(not torch.equal(alone["default", r], alone["__base__", r]) for r in range(3))
