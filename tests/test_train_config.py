"""TrainConfig, YAML loading, command-line overrides, adapter building, and the shipped configs (no training)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orthora.train import ConfigError, TrainConfig, load_config
from orthora.train.adapters import build_adapter_config
from orthora.train.cli import parse_args
from orthora.train.config import parse_value
from orthora.train.recipes import get_recipe

REPO = Path(__file__).resolve().parents[1]
TRAINING_CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "accelerate" not in p.parts)


def test_yaml_then_command_line_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "task: glue\ntask_name: sst2\nmodel_name_or_path: some/model\nlearning_rate: 3e-4\n"
        "adapter:\n  block_size: 32\n  target_modules: [query, value]\n"
    )
    config = parse_args(
        [
            str(path),
            "--learning_rate",
            "1e-2",
            "--adapter.block_size",
            "16",
            "--num_train_epochs=5",
            "--eval_before_training",
            "--checkpointing_steps",
            "epoch",
        ]
    )
    assert config.learning_rate == pytest.approx(
        1e-2
    )  # YAML 1.1 reads 3e-4 as a string; we coerce by field type
    assert config.adapter == {"block_size": 16, "target_modules": ["query", "value"]}
    assert config.num_train_epochs == 5 and config.eval_before_training is True
    assert config.checkpointing_steps == "epoch"


def test_string_values_from_the_command_line_are_kept_verbatim():
    config = parse_args(
        [
            "--task",
            "translation",
            "--model_name_or_path",
            "m",
            "--source_lang",
            "en",
            "--target_lang",
            "de",
            "--source_prefix",
            "translate: ",
        ]
    )
    assert config.source_prefix == "translate: "


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"learning_rat": 0.1}, "unknown config key 'learning_rat' (did you mean 'learning_rate'?)"),
        ({"learning_rate": "fast"}, "config key 'learning_rate': expected a number, got 'fast'"),
        ({"doc_stride": 64}, "config key 'doc_stride' applies to task(s) qa, not to task 'glue'"),
        ({"task": "ner"}, "unknown task 'ner'"),
        ({"mixed_precision": "fp8"}, "mixed_precision='fp8'"),
        ({"checkpointing_steps": "often"}, "checkpointing_steps must be a number of steps or 'epoch'"),
        ({"push_to_hub": True}, "push_to_hub needs hub_model_id"),
        ({"head_learning_rate": 0}, "head_learning_rate must be positive or null, got 0"),
    ],
)
def test_bad_values_name_the_key(values, message):
    with pytest.raises(ConfigError) as error:
        TrainConfig.from_dict({"model_name_or_path": "m", "task_name": "sst2", **values})
    assert message in str(error.value)


def test_missing_model_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="model_name_or_path is required"):
        TrainConfig.from_dict({"task": "glue"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [glue\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(tmp_path / "missing.yaml"))


def test_parse_value():
    assert parse_value("3e-4") == pytest.approx(3e-4)
    assert parse_value("16") == 16
    assert parse_value("[query, value]") == ["query", "value"]
    assert parse_value("true") is True and parse_value("null") is None


@pytest.mark.parametrize("method", ["orthora", "lora", "oft", "boft", "hra"])
def test_every_documented_method_builds_from_the_same_key(method):
    kwargs = {"target_modules": ["query", "value"]}
    if method == "orthora":
        kwargs["block_size"] = 16
    if method in ("oft", "boft"):
        kwargs[{"oft": "oft_block_size", "boft": "boft_block_size"}[method]] = 4
    config = build_adapter_config(method, kwargs, "SEQ_CLS")
    assert str(getattr(config.peft_type, "value", config.peft_type)).lower() == method


def test_adapter_errors_name_the_argument():
    with pytest.raises(ConfigError, match="adapter key 'rank' is not an argument of LoraConfig"):
        build_adapter_config("lora", {"rank": 8}, "SEQ_CLS")
    with pytest.raises(ConfigError, match="unknown method 'lorax'"):
        build_adapter_config("lorax", {}, "SEQ_CLS")
    with pytest.raises(ConfigError, match="block_size"):
        build_adapter_config("orthora", {"block_size": 0}, "SEQ_CLS")


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_shipped_configs_are_valid(path):
    config = load_config(str(path))
    recipe = get_recipe(config)  # task-specific checks and defaults
    build_adapter_config(config.method, config.adapter, recipe.peft_task_type)
    assert config.model_name_or_path and config.output_dir.startswith("outputs/")


def test_configs_cover_every_task_and_accelerate_setup():
    names = {str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").rglob("*.yaml")}
    glue = {f"glue/{t}.yaml" for t in ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")}
    others = {
        "translation/wmt16_en_ro.yaml",
        "qa/squad.yaml",
        "qa/squad_v2.yaml",
        "summarization/cnn_dailymail.yaml",
        "summarization/xsum.yaml",
    }
    accelerate = {f"accelerate/{n}.yaml" for n in ("single_gpu", "multi_gpu_ddp", "fsdp", "deepspeed_zero2")}
    assert glue | others | accelerate <= names
    for name in accelerate:
        assert "distributed_type" in yaml.safe_load((REPO / "configs" / name).read_text())
