"""Bad input gets an error that names the cause, and a failure leaves the model as it was."""

import json
import shutil

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import batch_for, tiny_bert
from torch import nn

from orthora import OrthoConfig
from orthora.config import DEFAULT_BLOCK_SIZE_BY_SIDE, FORMAT_VERSION
from orthora.layer import OrthoLayer


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def assert_unchanged(model, before):
    state, types = before
    assert [type(m) for m in model.modules()] == types
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], v) for k, v in state.items())


def test_block_size_that_does_not_divide_names_layer_width_and_valid_sizes():
    base = tiny_bert(hidden=48)  # query: 48 -> 48, intermediate: 48 -> 96
    before = snapshot(base)
    with pytest.raises(ValueError) as info:
        get_peft_model(base, OrthoConfig(target_modules=["query"], block_size=20, side="output"))
    message = str(info.value)
    assert "bert.encoder.layer.0.attention.self.query" in message
    assert "block_size=20 does not divide the output width 48" in message
    assert "[1, 2, 3, 4, 6, 8, 12, 16, 24, 48]" in message
    assert "nothing was changed" in message
    assert_unchanged(base, before)


def test_partial_failure_modifies_nothing():
    base = tiny_bert(hidden=48)
    before = snapshot(base)
    # query (48) accepts 16, intermediate.dense (96 out) accepts 16 too, but its input side (48) with num_blocks=5 fails
    with pytest.raises(ValueError, match="num_blocks=5 does not divide the input width 48"):
        get_peft_model(
            base, OrthoConfig(target_modules=["query", "intermediate.dense"], num_blocks=5, side="input")
        )
    assert_unchanged(base, before)
    assert not any(isinstance(m, OrthoLayer) for m in base.modules())


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("half", "adapter_name 'half' is the name of a torch.nn.Module attribute"),
        ("to", "adapter_name 'to' is the name of a torch.nn.Module attribute"),
        ("a.b", "adapter_name 'a.b' contains '.'"),
        ("__base__", "adapter_name '__base__' is reserved"),
    ],
)
def test_adapter_names_modules_cannot_hold_are_refused_up_front(name, text):
    base = tiny_bert()
    before = snapshot(base)
    with pytest.raises(ValueError, match=text):
        get_peft_model(base, OrthoConfig(target_modules=["query"], block_size=16), adapter_name=name)
    assert_unchanged(base, before)
    model = get_peft_model(base, OrthoConfig(target_modules=["query"], block_size=16))
    before = snapshot(model)
    with pytest.raises(ValueError, match=text):
        model.add_adapter(name, OrthoConfig(target_modules=["query"], block_size=16))
    assert_unchanged(model, before)
    assert name not in model.peft_config


def test_block_size_and_num_blocks_both_or_neither():
    with pytest.raises(
        ValueError, match="set exactly one of block_size and num_blocks, got block_size=16 and num_blocks=4"
    ):
        OrthoConfig(block_size=16, num_blocks=4)
    with pytest.raises(ValueError, match="set exactly one of block_size and num_blocks; both are None"):
        OrthoConfig(block_size=None, num_blocks=None)
    assert OrthoConfig(num_blocks=4).block_size is None
    # the default block size follows the side (LoRA r=8's budget), as a plain int (it serialises as one)
    for side, expected in DEFAULT_BLOCK_SIZE_BY_SIDE.items():
        default = OrthoConfig(side=side).block_size
        assert default == expected and type(default) is int
    assert OrthoConfig(side="both", block_size=32).block_size == 32  # a typed size is kept
    assert OrthoConfig().block_size == DEFAULT_BLOCK_SIZE_BY_SIDE[OrthoConfig().side]


@pytest.mark.parametrize(
    "field, value, valid",
    [
        ("side", "left", "output, input, both"),
        ("parametrization", "givens", "cayley, cayley_neumann, exp, householder"),
        ("bias", "some", "none, all, ortho_only"),
    ],
)
def test_unknown_choices_name_the_value_and_the_valid_ones(field, value, valid):
    with pytest.raises(ValueError, match=f"unknown {field}='{value}'; valid values are {valid}"):
        OrthoConfig(**{field: value})


@pytest.mark.parametrize(
    "kwargs, text",
    [
        ({"block_size": 0}, "block_size must be a positive integer, got 0"),
        ({"num_blocks": -2}, "num_blocks must be a positive integer, got -2"),
        ({"neumann_terms": 0}, "neumann_terms must be a positive integer"),
        ({"parametrization": "householder", "num_reflections": 3}, "num_reflections=3 is odd"),
        ({"max_angle": 0.0}, "max_angle must be a positive number"),
        ({"module_dropout": 1.0}, r"module_dropout must be in \[0, 1\)"),
        ({"format_version": 99}, "format version 99"),
    ],
)
def test_invalid_numbers(kwargs, text):
    with pytest.raises(ValueError, match=text):
        OrthoConfig(**kwargs)


def test_target_modules_that_match_nothing():
    base = tiny_bert()
    with pytest.raises(ValueError, match=r"Target modules \{'not_a_layer'\} not found in the base model"):
        get_peft_model(base, OrthoConfig(target_modules=["not_a_layer"]))
    assert not any(isinstance(m, OrthoLayer) for m in base.modules())


def test_unsupported_layer_type_is_named():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(8)
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            return self.lin(self.norm(x))

    net = Net()
    with pytest.raises(
        ValueError, match="norm: unsupported layer type LayerNorm; orthora supports torch.nn.Linear"
    ):
        get_peft_model(net, OrthoConfig(target_modules=["norm", "lin"], block_size=4))
    assert isinstance(net.lin, nn.Linear)


def test_unsupported_layer_options():
    conv = nn.Sequential(nn.Conv2d(8, 8, 3, groups=2))
    with pytest.raises(ValueError, match=r"0: grouped convolutions \(groups=2\)"):
        get_peft_model(conv, OrthoConfig(target_modules=["0"], block_size=4))
    emb = nn.Sequential(nn.Embedding(10, 8))
    with pytest.raises(ValueError, match="side='input' is not supported for nn.Embedding"):
        get_peft_model(emb, OrthoConfig(target_modules=["0"], block_size=4, side="input"))


def test_no_default_targets_for_an_unknown_architecture():
    with pytest.raises(ValueError, match="no default target_modules for model_type='custom'"):
        get_peft_model(nn.Sequential(nn.Linear(8, 8)), OrthoConfig(block_size=4))


def _saved_adapter(tmp_path, **kwargs):
    model = get_peft_model(tiny_bert(), OrthoConfig(target_modules=["query", "value"], **kwargs))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_loading_an_adapter_with_other_shapes_fails_and_leaves_the_model_as_it_was(tmp_path):
    path = _saved_adapter(tmp_path, block_size=16, side="output")
    # same module names, different width: the 16-blocks do not fit a hidden size of 48
    shutil.copy(path / "adapter_model.safetensors", tmp_path / "weights")
    cfg = (path / "adapter_config.json").read_text().replace('"block_size": 16', '"block_size": 8')
    (path / "adapter_config.json").write_text(cfg)
    base = tiny_bert()
    before = snapshot(base)
    with pytest.raises(ValueError) as info:
        PeftModel.from_pretrained(base, path)
    message = str(info.value)
    assert "does not fit this base model" in message
    assert "attention.self.query.ortho_out.default.weight: checkpoint (4, 120) vs model (8, 28)" in message
    assert "left as it was" in message
    assert_unchanged(base, before)


def test_loading_a_second_adapter_that_does_not_fit_keeps_the_first(tmp_path):
    good = _saved_adapter(tmp_path, block_size=16)
    bad_dir = tmp_path / "bad"
    shutil.copytree(good, bad_dir)
    cfg = (bad_dir / "adapter_config.json").read_text().replace('"block_size": 16', '"block_size": 8')
    (bad_dir / "adapter_config.json").write_text(cfg)
    model = PeftModel.from_pretrained(tiny_bert(), good)
    batch = batch_for("cls")
    expected = model(input_ids=batch["input_ids"]).logits
    with pytest.raises(ValueError, match="does not fit this base model"):
        model.load_adapter(bad_dir, adapter_name="other")
    assert "other" not in model.peft_config
    assert not any(".other" in n for n, _ in model.named_parameters())
    assert torch.equal(model(input_ids=batch["input_ids"]).logits, expected)


@pytest.mark.parametrize(
    "damage, reason",
    [  # the reasons are safetensors' own reader's
        (lambda data: data[: len(data) - 10], "file not fully covered"),
        (lambda data: data + b"\0" * 10, "file not fully covered"),
        (lambda data: data[:5], "header too small; 5 bytes on disk"),
        (lambda data: b"\xff" * 8 + data[8:], "header too large"),
        (lambda data: data[:8] + b"{not json" + data[17:], "invalid JSON in header"),
    ],
)
def test_truncated_or_corrupt_adapter_file_is_named_before_the_model_is_touched(tmp_path, damage, reason):
    path = _saved_adapter(tmp_path, block_size=16)
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    base = tiny_bert()
    before = snapshot(base)
    with pytest.raises(ValueError) as info:
        PeftModel.from_pretrained(base, path)
    assert str(weights) in str(info.value)
    assert "corrupt or truncated" in str(info.value) and reason in str(info.value)
    assert_unchanged(base, before)


def test_a_newer_adapter_format_asks_for_an_upgrade(tmp_path):
    path = _saved_adapter(tmp_path, block_size=16)
    saved = json.loads((path / "adapter_config.json").read_text())
    assert saved["format_version"] == FORMAT_VERSION
    (path / "adapter_config.json").write_text(json.dumps({**saved, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(ValueError, match=f"format version {FORMAT_VERSION + 1}.*upgrade orthora"):
        PeftModel.from_pretrained(tiny_bert(), path)


def test_mixed_batch_needs_one_name_per_sample():
    model = get_peft_model(tiny_bert(), OrthoConfig(target_modules=["query"], block_size=16)).eval()
    with pytest.raises(ValueError, match="got 2 adapter names for a batch of 3 samples"):
        model(input_ids=batch_for("cls")["input_ids"], adapter_names=["default", "default"])
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(input_ids=batch_for("cls")["input_ids"], adapter_names=["default"] * 3)


def test_merging_into_non_float_weights_is_refused_and_changes_nothing():
    model = get_peft_model(tiny_bert(), OrthoConfig(target_modules=["query"], block_size=16))
    layer = next(m for m in model.modules() if isinstance(m, OrthoLayer))
    base = layer.get_base_layer()
    base.weight = nn.Parameter(torch.zeros_like(base.weight, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match="cannot merge into Linear weights of dtype torch.int8"):
        layer.merge()
    assert not layer.merged and torch.equal(base.weight, torch.zeros_like(base.weight))


def test_is_trainable_loading_makes_rotations_trainable(tmp_path):
    path = _saved_adapter(tmp_path, block_size=16)
    frozen = PeftModel.from_pretrained(tiny_bert(), path)
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = PeftModel.from_pretrained(tiny_bert(), path, is_trainable=True)
    names = [n for n, p in trainable.named_parameters() if p.requires_grad]
    assert names and all(".ortho_" in n for n in names)


def test_loading_onto_a_wrong_base_leaves_the_task_head_unwrapped(tmp_path):
    """PEFT wraps modules_to_save (the classifier) before any weight is read; a refused load must undo that too."""
    from peft import PeftModel, get_peft_model
    from peft.utils.other import ModulesToSaveWrapper
    from transformers import BertConfig, BertForSequenceClassification

    import orthora

    def bert(hidden: int) -> BertForSequenceClassification:
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=50,
            hidden_size=hidden,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=2 * hidden,
            num_labels=2,
        )
        return BertForSequenceClassification(config)

    trained = get_peft_model(
        bert(32), orthora.OrthoConfig(task_type="SEQ_CLS", target_modules=["query"], block_size=16)
    )
    trained.save_pretrained(tmp_path)
    other = bert(64)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="does not fit this base model"):
        PeftModel.from_pretrained(other, tmp_path)
    assert not any(isinstance(m, (ModulesToSaveWrapper, orthora.OrthoLayer)) for m in other.modules())
    after = other.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
