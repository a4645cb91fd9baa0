"""PEFT's adapter dtype contract, on every way an adapter gets into a model.

PEFT's rule for each of its methods: with ``autocast_adapter_dtype=True`` (the default) adapter parameters are
float32; with ``False`` they keep the base model's dtype. The blocks are still built in float32 from them.
"""

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import batch_for, tiny_bert

from orthora import OrthoConfig, rotations
from orthora.layer import BlockRotation

BASE_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def config():
    return OrthoConfig(target_modules=["query", "value"], block_size=8, side="both")


def adapter_params(model, adapter_name):
    found = [
        param
        for name, param in model.named_parameters()
        if f".ortho_out.{adapter_name}." in name or f".ortho_in.{adapter_name}." in name
    ]
    assert found, f"no parameters of adapter {adapter_name!r}"
    return found


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    """A trained-looking (non-identity) float32 adapter on disk, and its parameters."""
    model = get_peft_model(tiny_bert(hidden=32), config())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BlockRotation):
                # divided by the generator scale: the same rotation whatever generator_scale is
                module.weight.add_(0.2 / module.scale * torch.randn(module.weight.shape, generator=g))
    path = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(path)
    return path, {k: v.detach().clone() for k, v in model.state_dict().items() if "ortho_" in k}


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("base_dtype", BASE_DTYPES, ids=str)
def test_adapter_dtype_follows_autocast_adapter_dtype_on_every_route(
    base_dtype, autocast, low_cpu_mem_usage, saved_adapter
):
    expected = torch.float32 if autocast else base_dtype
    path, saved = saved_adapter
    kwargs = {"autocast_adapter_dtype": autocast, "low_cpu_mem_usage": low_cpu_mem_usage}

    # get_peft_model and add_adapter (with low_cpu_mem_usage the new parameters are on the meta device)
    model = get_peft_model(tiny_bert(hidden=32).to(base_dtype), config(), **kwargs)
    model.add_adapter("added", config(), **kwargs)
    for name in ("default", "added"):
        assert {p.dtype for p in adapter_params(model, name)} == {expected}, name

    # PeftModel.from_pretrained and load_adapter: the loaded values arrive, in the contract's dtype
    loaded = PeftModel.from_pretrained(tiny_bert(hidden=32).to(base_dtype), path, **kwargs)
    loaded.load_adapter(path, "second", **kwargs)
    for name in ("default", "second"):
        assert {p.dtype for p in adapter_params(loaded, name)} == {expected}, name
        assert all(p.device.type == "cpu" for p in adapter_params(loaded, name))
    state = loaded.state_dict()
    for key, value in saved.items():
        torch.testing.assert_close(
            state[key].float(), value, atol=1e-2 if expected != torch.float32 else 0, rtol=0
        )
        second = key.replace(".default.", ".second.")
        assert torch.equal(state[second], state[key])

    # whatever the parameter dtype, the blocks are built in float32 and stay orthogonal, and the model runs
    for module in loaded.modules():
        if isinstance(module, BlockRotation):
            blocks = module.blocks()
            assert blocks.dtype == torch.float32
            assert rotations.orthogonality_error(blocks) < 1e-5
    out = loaded(**{k: v for k, v in batch_for("cls", batch=2).items() if k != "labels"})
    assert out.logits.dtype == base_dtype and torch.isfinite(out.logits).all()


@pytest.mark.parametrize("base_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_parameters_train_and_stay_orthogonal(base_dtype):
    """With autocast off, a bf16/fp16 parameter still gives float32 orthogonal blocks and a finite gradient."""
    model = get_peft_model(tiny_bert(hidden=32).to(base_dtype), config(), autocast_adapter_dtype=False)
    model.train()
    batch = batch_for("cls", batch=2)
    model(**batch).loss.backward()
    rotation = next(m for m in model.modules() if isinstance(m, BlockRotation))
    assert rotation.weight.dtype == base_dtype
    assert rotation.weight.grad is not None and rotation.weight.grad.dtype == base_dtype
    assert torch.isfinite(rotation.weight.grad).all() and rotation.weight.grad.abs().sum() > 0
