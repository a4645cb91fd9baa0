"""Adapter state stays consistent: rollback, partial merges, double merge/unmerge, names that already exist.

Every test compares a checksum of the base weights before and after, so a rotation left in the weights is caught.
"""

import hashlib
import warnings

import pytest
import torch
from peft import get_peft_model, inject_adapter_in_model
from tiny_models import batch_for, tiny_bert

from orthora import OrthoConfig
from orthora.layer import BlockRotation, OrthoLayer
from orthora.model import discard_adapter

TARGETS = ["query", "value", "intermediate.dense"]


def config(side="both", **kwargs):
    return OrthoConfig(target_modules=TARGETS, block_size=8, side=side, init_weights=False, **kwargs)


def base_weights(model) -> dict[str, torch.Tensor]:
    """Every weight and bias of the base model (inside orthora layers: the wrapped base layer's)."""
    return {
        name.replace(".base_layer", "").removeprefix("base_model.model."): param.detach().clone()
        for name, param in model.named_parameters()
        if ".ortho_" not in name
    }


def checksum(weights: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].float().numpy().tobytes())
    return digest.hexdigest()


def assert_close_weights(now, before, atol=1e-5):
    assert now.keys() == before.keys()
    worst = max((now[k] - before[k]).abs().max().item() for k in before)
    assert worst < atol, f"base weights moved by {worst}"


def layers(model):
    return [m for m in model.modules() if isinstance(m, OrthoLayer)]


@pytest.fixture
def ids():
    return batch_for("cls", batch=3, length=7)["input_ids"]


@pytest.fixture(params=["never", "always"])
def fold_policy(request, monkeypatch):
    monkeypatch.setattr(OrthoLayer, "fold_policy", request.param)
    return request.param


def two_adapter_model():
    torch.manual_seed(0)
    base = tiny_bert(hidden=32)
    original = base_weights(base)
    model = get_peft_model(base, config(), adapter_name="a")
    model.add_adapter("b", config())
    model.base_model.set_adapter(["a", "b"])
    model.eval()
    return model, original


def test_discarding_a_merged_adapter_unmerges_it_first(ids):
    model, original = two_adapter_model()
    with model.disable_adapter():
        reference = model(input_ids=ids).logits
    model.merge_adapter(["a", "b"])
    discard_adapter(
        model.base_model.model, "a"
    )  # a is merged *under* b: b is unmerged, a undone, b re-merged
    assert all("a" not in layer.merged_adapters for layer in layers(model))
    assert all(layer.merged_adapters == ["b"] for layer in layers(model))
    model.unmerge_adapter()
    assert_close_weights(base_weights(model), original)
    discard_adapter(model.base_model.model, "b")
    assert not layers(model)
    torch.testing.assert_close(model.base_model.model(input_ids=ids).logits, reference, atol=1e-5, rtol=0)


def test_deleting_a_merged_adapter_is_refused_and_changes_nothing():
    model, _ = two_adapter_model()
    model.merge_adapter(["a"])
    merged = checksum(base_weights(model))
    with pytest.raises(ValueError, match=r"Cannot delete adapter\(s\) \['a'\] while they are merged"):
        model.delete_adapter("a")
    assert checksum(base_weights(model)) == merged
    assert all(layer.merged_adapters == ["a"] for layer in layers(model))


def test_partly_merged_active_adapters_give_the_unmerged_result_or_refuse(ids, fold_policy):
    model, original = two_adapter_model()
    expected = model(input_ids=ids).logits  # both active, none merged: R_b R_a W R_a R_b
    # merged adapters that come first in the active order compose correctly with the unmerged rest
    model.merge_adapter(["a"])
    torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)
    model.unmerge_adapter()
    assert_close_weights(base_weights(model), original)
    # b merged under an unmerged a cannot be composed (rotations do not commute): refuse, naming both
    model.merge_adapter(["b"])
    merged = checksum(base_weights(model))
    with pytest.raises(
        ValueError, match=r"active adapters \['a', 'b'\] are merged as \['b'\].*do not commute"
    ):
        model(input_ids=ids)
    assert checksum(base_weights(model)) == merged
    model.unmerge_adapter()
    assert_close_weights(base_weights(model), original)


def test_merging_twice_warns_and_changes_nothing_and_unmerging_an_unmerged_model_is_a_noop(ids):
    model, original = two_adapter_model()
    before = checksum(base_weights(model))
    with pytest.warns(UserWarning, match="Already unmerged"):
        model.unmerge_adapter()
    assert checksum(base_weights(model)) == before
    model.merge_adapter()
    once = checksum(base_weights(model))
    output = model(input_ids=ids).logits
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()
    assert checksum(base_weights(model)) == once
    torch.testing.assert_close(model(input_ids=ids).logits, output)
    model.unmerge_adapter()
    assert_close_weights(base_weights(model), original)


def test_adding_an_adapter_under_an_existing_name_is_refused_and_changes_nothing(tmp_path):
    model, original = two_adapter_model()
    model.merge_adapter(["a"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="Adapter with name 'a' already exists"):
        model.add_adapter("a", config())
    with pytest.raises(ValueError, match="orthora adapter 'a' already exists in .*query; delete it first"):
        inject_adapter_in_model(config(), model.base_model.model, adapter_name="a")
    model.unmerge_adapter()
    model.merge_adapter(["a"])
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.allclose(now[k], v, atol=1e-6) for k, v in state.items())
    # loading new weights into a merged adapter would make its unmerge undo the wrong rotation
    other = get_peft_model(tiny_bert(hidden=32), config(), adapter_name="a")
    other.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="orthora adapter 'a' is merged.*unmerge_adapter"):
        model.load_adapter(tmp_path / "a", adapter_name="a")
    model.unmerge_adapter()
    assert_close_weights(base_weights(model), original)


def test_a_failure_midway_through_injection_rolls_back_the_modules_already_injected(monkeypatch):
    """Simulate a failure (e.g. out of memory) after some layers were already wrapped: nothing may remain."""
    model, original = two_adapter_model()
    model.merge_adapter(["a"])
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_types = [type(m) for m in model.modules()]
    real_init = BlockRotation.__init__
    calls = []

    def failing_init(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("simulated out of memory")
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(BlockRotation, "__init__", failing_init)
    with pytest.raises(RuntimeError, match="simulated out of memory"):
        model.add_adapter("c", config())
    assert len(calls) == 4  # three rotations were created (in two layers) before the failure
    assert "c" not in model.peft_config
    assert not any(".c." in name for name, _ in model.named_parameters())
    assert [type(m) for m in model.modules()] == before_types
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in before_state.items())
    # and on a model without adapters the base layers come back
    monkeypatch.setattr(BlockRotation, "__init__", real_init)
    plain = tiny_bert(hidden=32)
    before = checksum(base_weights(plain))
    types = [type(m) for m in plain.modules()]
    calls.clear()
    monkeypatch.setattr(BlockRotation, "__init__", failing_init)
    with pytest.raises(RuntimeError, match="simulated out of memory"):
        get_peft_model(plain, config())
    assert [type(m) for m in plain.modules()] == types
    assert checksum(base_weights(plain)) == before
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.unmerge_adapter()
    assert_close_weights(base_weights(model), original)


def test_fan_in_fan_out_is_not_an_option_and_old_configs_with_it_still_load(tmp_path, ids):
    """GPT-2's Conv1D layout is read from the layer type; the flag was never read, so it is gone."""
    with pytest.raises(TypeError, match="fan_in_fan_out"):
        OrthoConfig(target_modules=TARGETS, fan_in_fan_out=True)
    model, _ = two_adapter_model()
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "a" / "adapter_config.json"
    config_file.write_text(config_file.read_text().replace('"bias":', '"fan_in_fan_out": false, "bias":', 1))
    from peft import PeftModel

    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        loaded = PeftModel.from_pretrained(tiny_bert(hidden=32), tmp_path / "a", adapter_name="a").eval()
    model.base_model.set_adapter("a")
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
