"""orthora.train.parameter_groups: every trainable parameter once, the head at its own rate, no decay on norms."""

from __future__ import annotations

import pytest
from peft import get_peft_model
from tiny_models import tiny_bert

from orthora import OrthoConfig
from orthora.train import parameter_groups


def _model():
    return get_peft_model(
        tiny_bert(), OrthoConfig(task_type="SEQ_CLS", target_modules=["query"], block_size=16, magnitude=True)
    )


def test_head_parameters_alone_get_the_head_rate():
    model = _model()
    names = {id(p): n for n, p in model.named_parameters()}
    groups = parameter_groups(model, weight_decay=0.1, head_learning_rate=1e-2)
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable) and len(grouped) == len(set(grouped))  # each exactly once
    for group in groups:
        in_head = {".modules_to_save." in names[id(p)] for p in group["params"]}
        assert len(in_head) == 1, "a group mixes head and adapter parameters"
        assert ("lr" in group) == in_head.pop()
        assert group.get("lr", 1e-2) == 1e-2
        decays = {not any(k in names[id(p)].lower() for k in ("bias", "norm")) for p in group["params"]}
        assert decays == {group["weight_decay"] == 0.1}
    assert any("lr" in g for g in groups) and any("lr" not in g for g in groups)


def test_without_a_head_rate_no_group_overrides_the_optimizer_rate():
    groups = parameter_groups(_model(), weight_decay=0.0)
    assert len(groups) == 2 and all("lr" not in g for g in groups)  # decayed, then not decayed


def test_a_bad_head_rate_is_refused():
    with pytest.raises(ValueError, match="head_learning_rate must be positive or None, got 0"):
        parameter_groups(_model(), head_learning_rate=0)
