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
    model = get_peft_model(base, OrthoConfig(task_type=task_type, target_modules=targets, block_size=16, side=side))
    assert sum(isinstance(m, OrthoLayer) for m in model.modules()) >= 2 * len(targets) // 2
    assert (model_output(model, batch) - reference).abs().max() < 1e-5

    model.train()
    out = model(**batch)
    out.loss.backward()
    rots = [m for m in model.modules() if isinstance(m, BlockRotation)]
    assert rots and all(r.weight.grad is not None for r in rots)
    assert any(r.weight.grad.abs().sum() > 0 for r in rots)
    frozen = [n for n, p in model.named_parameters() if "ortho_" not in n and p.grad is not None
              and "modules_to_save" not in n]
    assert not frozen, frozen[:3]

    with torch.no_grad():
        for r in rots:
            r.weight.add_(0.05 * torch.randn_like(r.weight))
    model.eval()
    adapted = model_output(model, batch).detach()
    merged = model.merge_and_unload()
    assert torch.allclose(model_output(merged, batch), adapted, atol=1e-4 * max(1.0, adapted.abs().max().item()))


def test_default_targets_cover_the_listed_architectures():
    for name, (build, task_type, _, _kind) in ARCHITECTURES.items():
        model = get_peft_model(build(), OrthoConfig(task_type=task_type, block_size=16))
        assert any(isinstance(m, OrthoLayer) for m in model.modules()), name


def test_generate_with_mixed_adapters_and_beams():
    build, task_type, targets, _ = ARCHITECTURES["bart"]
    torch.manual_seed(0)
    model = get_peft_model(build(), OrthoConfig(task_type=task_type, target_modules=targets, block_size=16))
    model.add_adapter("other", OrthoConfig(task_type=task_type, target_modules=targets, block_size=8))
    model.eval()
    ids = batch_for("s2s", batch=2)["input_ids"]
    out = model.generate(input_ids=ids, adapter_names=["default", "other"], num_beams=2, max_new_tokens=4)
    assert out.shape[0] == 2
