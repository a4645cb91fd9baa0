"""orthora as a PEFT method: identity at init, merge/unmerge, save/load, adapters API, layer types."""

import copy
import os

import pytest
import torch
from peft import AutoPeftModelForSequenceClassification, PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import batch_for, tiny_bert
from torch import nn
from transformers.pytorch_utils import Conv1D

import orthora
from orthora import OrthoConfig, rotations
from orthora.layer import BlockRotation, OrthoLayer

PARAMETRIZATIONS = ["cayley", "cayley_neumann", "exp", "householder"]
SIDES = ["output", "input", "both"]
TARGETS = ["query", "value", "intermediate.dense", "output.dense"]


def randomize(model, scale=0.3, seed=1):
    """Move every rotation's generator by ``scale`` x noise (divided by the generator scale, so the rotations are
    the same whatever ``generator_scale`` is; for Householder the scale only divides the vectors' length)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BlockRotation):
                module.weight.add_(scale / module.scale * torch.randn(module.weight.shape, generator=g))


def rotation_modules(model):
    return [m for m in model.modules() if isinstance(m, BlockRotation)]


def logits(model, batch):
    return model(input_ids=batch["input_ids"]).logits


@pytest.fixture
def batch():
    return batch_for("cls", batch=4, length=11)


@pytest.fixture(params=["never", "always"])
def fold_policy(request, monkeypatch):
    """Run a test with rotations applied to activations and with rotations folded into the weights."""
    monkeypatch.setattr(OrthoLayer, "fold_policy", request.param)
    return request.param


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_identity_merge_unmerge_and_orthogonality(side, parametrization, batch, fold_policy):
    base = tiny_bert()
    reference = logits(base, batch)
    base_weights = {k: v.clone() for k, v in base.state_dict().items()}
    cfg = OrthoConfig(target_modules=TARGETS, block_size=16, side=side, parametrization=parametrization)
    model = get_peft_model(base, cfg).eval()

    # identity at initialisation
    assert (logits(model, batch) - reference).abs().max() < 1e-6

    # random rotations: exactly orthogonal for the exact maps (the Neumann series needs a small generator)
    randomize(model, scale=0.02 if parametrization == "cayley_neumann" else 0.3)
    for rot in rotation_modules(model):
        err = rotations.orthogonality_error(rot.blocks())
        assert err < (1e-5 if cfg.is_exact else 1e-2)
    adapted = logits(model, batch)
    assert (adapted - reference).abs().max() > 1e-4

    # merged == unmerged
    model.merge_adapter()
    merged = logits(model, batch)
    assert (merged - adapted).abs().max() <= 1e-4 * adapted.abs().max()
    # unmerge restores the base weights
    model.unmerge_adapter()
    restored = model.get_base_model().state_dict()
    for key, value in base_weights.items():
        candidates = [k for k in restored if k.replace(".base_layer", "") == key]
        assert candidates, key
        assert (restored[candidates[0]] - value).abs().max() < 1e-5, key


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_optimizer_step_changes_outputs_and_keeps_orthogonality(parametrization, batch, fold_policy):
    model = get_peft_model(
        tiny_bert(),
        OrthoConfig(target_modules=TARGETS, block_size=16, parametrization=parametrization, side="both"),
    )
    model.train()
    before = logits(model.eval(), batch).detach()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    loss = model(**batch).loss
    loss.backward()
    grads = [r.weight.grad for r in rotation_modules(model)]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    opt.step()
    after = logits(model.eval(), batch).detach()
    assert (after - before).abs().max() > 1e-4
    if parametrization != "cayley_neumann":
        for rot in rotation_modules(model):
            assert rotations.orthogonality_error(rot.blocks()) < 1e-5


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("bias", ["none", "all"])
def test_folded_and_activation_paths_give_the_same_loss_and_gradients(side, bias, batch, monkeypatch):
    grads = {}
    for policy in ("never", "always"):
        monkeypatch.setattr(OrthoLayer, "fold_policy", policy)
        model = get_peft_model(
            tiny_bert(), OrthoConfig(target_modules=TARGETS, block_size=16, side=side, bias=bias)
        )
        randomize(model)
        model.train()
        torch.manual_seed(0)
        loss = model(**batch).loss
        loss.backward()
        grads[policy] = (
            loss.item(),
            {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad},
        )
    (loss_a, ga), (loss_b, gb) = grads["never"], grads["always"]
    assert abs(loss_a - loss_b) < 1e-5
    assert ga.keys() == gb.keys() and len(ga) > 0
    for name in ga:
        assert torch.allclose(ga[name], gb[name], atol=1e-5, rtol=1e-4), name


def test_auto_policy_folds_only_when_cheaper(monkeypatch):
    model = get_peft_model(tiny_bert(), OrthoConfig(target_modules=["query"], block_size=16))
    layer = next(m for m in model.modules() if isinstance(m, OrthoLayer))
    calls = []
    monkeypatch.setattr(rotations, "folded_linear", lambda *a: calls.append(1) or torch.zeros(1))
    layer(torch.randn(1, 10, 64))  # 10 tokens < 64 input features: rotate activations
    assert calls == []
    layer(torch.randn(2, 40, 64))  # 80 tokens > 64: fold
    assert calls == [1]


def test_usage_from_the_readme(tmp_path, batch):
    base = tiny_bert()
    model = get_peft_model(base, orthora.OrthoConfig(task_type="SEQ_CLS", target_modules=["query", "value"]))
    model.print_trainable_parameters()
    randomize(model)
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    expected = logits(model.eval(), batch)
    model.save_pretrained(tmp_path / "out")

    config_text = (tmp_path / "out" / "adapter_config.json").read_text()
    assert '"peft_type": "ORTHORA"' in config_text
    tensors = load_file(tmp_path / "out" / "adapter_model.safetensors")
    # only adapter tensors (rotations) and the trained head (modules_to_save of SEQ_CLS)
    assert all(".ortho_" in k or ".classifier." in k for k in tensors), list(tensors)
    # one tensor per targeted module (query, value x 2 layers) for each table the default config fills
    config = model.peft_config["default"]
    tables = {"output": ["ortho_out"], "input": ["ortho_in"], "both": ["ortho_out", "ortho_in"]}[config.side]
    tables += ["ortho_magnitude"] if config.magnitude else []
    for table in tables:
        assert sum(f".{table}." in k for k in tensors) == 4, table
    assert sum(".ortho_" in k for k in tensors) == 4 * len(tables)
    assert not any("embeddings" in k or "attention.output" in k for k in tensors)

    again = PeftModel.from_pretrained(tiny_bert(), tmp_path / "out")
    assert torch.equal(logits(again, batch), expected)
    merged = again.merge_and_unload()
    assert not any(isinstance(m, OrthoLayer) for m in merged.modules())
    assert type(merged).__name__ == "BertForSequenceClassification"
    assert torch.allclose(logits(merged, batch), expected, atol=1e-5)


def test_adapter_file_is_small_and_holds_only_adapter_tensors(tmp_path):
    config = OrthoConfig(target_modules=["query"], block_size=8, side="output", magnitude=False)
    model = get_peft_model(tiny_bert(), config)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert set(tensors) == {
        f"base_model.model.bert.encoder.layer.{i}.attention.self.query.ortho_out.weight" for i in range(2)
    }
    assert tensors[next(iter(tensors))].shape == (8, 28)


def test_auto_peft_model_and_transformers_load_adapter(tmp_path, batch):
    base_dir = tmp_path / "base"
    tiny_bert().save_pretrained(base_dir)
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(base_dir).eval()
    model = get_peft_model(
        base, OrthoConfig(task_type="SEQ_CLS", target_modules=["query", "value"], block_size=16)
    )
    randomize(model)
    expected = logits(model.eval(), batch)
    model.save_pretrained(tmp_path / "adapter")

    auto = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter").eval()
    assert torch.allclose(logits(auto, batch), expected, atol=1e-6)

    plain = AutoModelForSequenceClassification.from_pretrained(base_dir).eval()
    plain.load_adapter(str(tmp_path / "adapter"))
    assert torch.allclose(logits(plain, batch), expected, atol=1e-6)


def test_multiple_adapters_set_delete_disable_and_mixed_batches(batch):
    base = tiny_bert()
    reference = logits(base, batch)
    model = get_peft_model(base, OrthoConfig(target_modules=["query", "value"], block_size=16))
    randomize(model, seed=1)
    model.add_adapter("second", OrthoConfig(target_modules=["query", "value"], block_size=8, side="input"))
    # the added adapter is inactive and frozen until selected
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".second." in n)
    model.set_adapter("second")
    assert all(p.requires_grad for n, p in model.named_parameters() if ".second." in n)
    randomize(model, seed=2)
    model.eval()
    out_second = logits(model, batch)
    model.set_adapter("default")
    out_default = logits(model, batch)
    assert (out_default - out_second).abs().max() > 1e-4

    with model.disable_adapter():
        assert torch.allclose(logits(model, batch), reference, atol=1e-6)

    names = ["default", "second", "__base__", "default"]
    mixed = model(input_ids=batch["input_ids"], adapter_names=names).logits
    assert torch.allclose(mixed[0], out_default[0], atol=1e-5)
    assert torch.allclose(mixed[1], out_second[1], atol=1e-5)
    assert torch.allclose(mixed[2], reference[2], atol=1e-5)
    assert torch.allclose(mixed[3], out_default[3], atol=1e-5)
    with pytest.raises(ValueError, match="non-existing adapter"):
        model(input_ids=batch["input_ids"], adapter_names=["nope"] * 4)

    model.delete_adapter("second")
    assert not any(".second" in n for n, _ in model.named_parameters())
    assert torch.allclose(logits(model, batch), out_default, atol=1e-6)

    unloaded = model.unload()
    assert torch.allclose(logits(unloaded, batch), reference, atol=1e-6)


def test_two_adapters_merged_together_match_their_composition(batch):
    model = get_peft_model(tiny_bert(), OrthoConfig(target_modules=TARGETS, block_size=16, side="both"))
    model.add_adapter(
        "b", OrthoConfig(target_modules=TARGETS, block_size=8, side="both", parametrization="exp")
    )
    randomize(model)
    model.base_model.set_adapter(["default", "b"])
    model.eval()
    composed = logits(model, batch)
    model.merge_adapter(["default", "b"])
    assert torch.allclose(logits(model, batch), composed, atol=1e-4)
    model.unmerge_adapter()
    assert torch.allclose(logits(model, batch), composed, atol=1e-4)


def test_bias_options_and_modules_to_save(tmp_path):
    model = get_peft_model(
        tiny_bert(),
        OrthoConfig(
            target_modules=["query"], block_size=16, bias="ortho_only", modules_to_save=["classifier"]
        ),
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("query.base_layer.bias") for n in trainable)
    assert any("classifier" in n for n in trainable)
    assert not any("value" in n for n in trainable)
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert any(k.endswith("query.base_layer.bias") for k in keys)


def test_layers_to_transform_and_exclude_modules():
    model = get_peft_model(
        tiny_bert(),
        OrthoConfig(
            target_modules=["query", "value"], block_size=16, layers_to_transform=[1], layers_pattern="layer"
        ),
    )
    adapted = {n for n, m in model.named_modules() if isinstance(m, OrthoLayer)}
    assert adapted == {
        f"base_model.model.bert.encoder.layer.1.attention.self.{t}" for t in ("query", "value")
    }
    model = get_peft_model(
        tiny_bert(),
        OrthoConfig(
            target_modules=["query", "value"],
            block_size=16,
            exclude_modules=["bert.encoder.layer.0.attention.self.value"],
        ),
    )
    adapted = {
        n.split("model.bert.encoder.")[1] for n, m in model.named_modules() if isinstance(m, OrthoLayer)
    }
    assert adapted == {
        "layer.0.attention.self.query",
        "layer.1.attention.self.query",
        "layer.1.attention.self.value",
    }


def test_default_target_modules_and_all_linear():
    model = get_peft_model(tiny_bert(), OrthoConfig(block_size=16))
    adapted = sorted(n.rsplit(".", 1)[1] for n, m in model.named_modules() if isinstance(m, OrthoLayer))
    assert adapted == ["query", "query", "value", "value"]
    model = get_peft_model(
        tiny_bert(), OrthoConfig(task_type="SEQ_CLS", target_modules="all-linear", block_size=16)
    )
    adapted = [n for n, m in model.named_modules() if isinstance(m, OrthoLayer)]
    assert len(adapted) == 13  # 6 linears x 2 layers + the pooler; not the classification head
    assert not any("classifier" in n for n in adapted)


def test_block_share_and_num_blocks_parameter_counts():
    layout = {"target_modules": ["query"], "side": "output", "magnitude": False}  # one rotation per layer
    shared = get_peft_model(tiny_bert(), OrthoConfig(**layout, block_size=16, block_share=True))
    per_block = get_peft_model(tiny_bert(), OrthoConfig(**layout, num_blocks=4))
    n_shared = sum(p.numel() for n, p in shared.named_parameters() if p.requires_grad)
    n_block = sum(p.numel() for n, p in per_block.named_parameters() if p.requires_grad)
    assert n_shared == 2 * 120 and n_block == 2 * 4 * 120


def test_eval_mode_caches_rotations_until_parameters_change(batch):
    model = get_peft_model(tiny_bert(), OrthoConfig(target_modules=["query"], block_size=16)).eval()
    rot = rotation_modules(model)[0]
    with torch.no_grad():
        first = rot.blocks()
        assert rot.blocks() is first  # cached
        rot.weight.add_(0.1)
        second = rot.blocks()
    assert second is not first and not torch.equal(second, first)
    model.train()
    assert rot.blocks().grad_fn is not None  # training: a fresh graph each forward


def test_module_dropout_replaces_blocks_by_identity_only_in_training():
    model = get_peft_model(
        tiny_bert(), OrthoConfig(target_modules=["query"], block_size=8, module_dropout=0.5)
    )
    randomize(model)
    rot = rotation_modules(model)[0]
    model.train()
    torch.manual_seed(0)
    blocks = rot.forward_blocks()
    is_eye = [(b - torch.eye(8)).abs().max().item() < 1e-7 for b in blocks]
    assert 0 < sum(is_eye) < len(is_eye)
    model.eval()
    assert torch.equal(rot.forward_blocks(), rot.blocks())


def test_bf16_model_keeps_float32_orthogonal_rotations(batch, fold_policy):
    model = get_peft_model(tiny_bert().to(torch.bfloat16), OrthoConfig(target_modules=TARGETS, block_size=16))
    rot = rotation_modules(model)[0]
    assert rot.weight.dtype == torch.float32
    randomize(model, scale=3.0)
    assert rotations.orthogonality_error(rot.blocks()) < 1e-5
    model.train()
    out = model(**batch)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert rot.weight.grad is not None and torch.isfinite(rot.weight.grad).all()


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, kernel_size=(3, 2), dilation=(2, 1), padding=1)
        self.proj = Conv1D(8, 8)  # GPT-2 style: weight (in, out)
        self.emb = nn.Embedding(10, 8)

    def forward(self, images, ids):
        feat = self.conv(images).mean(dim=(-1, -2))
        return self.proj(feat) + self.emb(ids)


@pytest.mark.parametrize("side", ["output", "input", "both"])
def test_conv2d_dilated_nonsquare_conv1d_and_embedding_layers(side):
    torch.manual_seed(0)
    net = ConvNet().eval()
    images, ids = torch.randn(3, 4, 9, 7), torch.tensor([1, 2, 3])
    reference = net(images, ids)
    targets = ["conv", "proj"] + (["emb"] if side == "output" else [])
    # GPT-2's Conv1D (weight stored as (in, out)) is recognised by its type: no fan_in_fan_out flag to set
    model = get_peft_model(copy.deepcopy(net), OrthoConfig(target_modules=targets, block_size=4, side=side))
    assert torch.allclose(model(images, ids), reference, atol=1e-6)
    randomize(model)
    adapted = model(images, ids)
    assert (adapted - reference).abs().max() > 1e-3
    model.merge_adapter()
    assert torch.allclose(model(images, ids), adapted, atol=1e-5)
    model.unmerge_adapter()
    assert torch.allclose(model.get_base_model().conv.base_layer.weight, net.conv.weight, atol=1e-5)
    merged = model.merge_and_unload()
    assert isinstance(merged.conv, nn.Conv2d) and isinstance(merged.proj, Conv1D)
    assert torch.allclose(merged(images, ids), adapted, atol=1e-5)


def test_hf_trainer_trains_an_orthora_model(tmp_path):
    """The loss on the training data goes down, and only the rotations and the (saved) head change."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (32, 8), generator=g)
    labels = (ids[:, 0] > 64).long()
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})
    model = get_peft_model(
        tiny_bert(), OrthoConfig(task_type="SEQ_CLS", target_modules=["query", "value"], block_size=16)
    )

    def training_loss():
        model.eval()
        with torch.no_grad():
            return model(input_ids=ids, labels=labels).loss.item()

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_before = training_loss()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        num_train_epochs=4,
        learning_rate=5e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
    )
    Trainer(model=model, args=args, train_dataset=data).train()
    assert training_loss() < loss_before - 0.05
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed, "nothing was trained"
    assert all(".ortho_" in n or ".modules_to_save." in n for n in changed), sorted(changed)[:5]
    assert any(".ortho_" in n for n in changed) and any(".modules_to_save." in n for n in changed)
    model.save_pretrained(tmp_path / "adapter")
    assert os.path.exists(tmp_path / "adapter" / "adapter_model.safetensors")
