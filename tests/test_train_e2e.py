"""End to end, per task family: the finetune entry point trains a tiny random model on a few dozen local rows,
writes adapter + results + checkpoints, and a second run resumed from a checkpoint lands on the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orthora.train.cli import main

FAMILIES = {
    "glue": dict(
        model="bert",
        data="sst2",
        args=[
            "--task",
            "glue",
            "--task_name",
            "sst2",
            "--adapter",
            "{block_size: 16, target_modules: [query, value]}",
        ],
    ),
    "qa": dict(
        model="bert",
        data="squad_v2",
        args=[
            "--task",
            "qa",
            "--version_2_with_negative",
            "true",
            "--max_seq_length",
            "48",
            "--doc_stride",
            "16",
            "--adapter",
            "{block_size: 16, target_modules: [query, value]}",
        ],
    ),
    "translation": dict(
        model="t5",
        data="translation",
        args=[
            "--task",
            "translation",
            "--source_lang",
            "en",
            "--target_lang",
            "de",
            "--source_prefix",
            "translate: ",
            "--generation_max_length",
            "8",
            "--num_beams",
            "2",
            "--adapter",
            "{block_size: 16, target_modules: [q, v]}",
        ],
    ),
    "summarization": dict(
        model="bart",
        data="summarization",
        args=[
            "--task",
            "summarization",
            "--max_source_length",
            "64",
            "--max_target_length",
            "16",
            "--generation_max_length",
            "8",
            "--num_beams",
            "2",
            "--adapter",
            "{block_size: 16, target_modules: [q_proj, v_proj]}",
        ],
    ),
}
EXPECTED_METRICS = {
    "glue": {"accuracy"},
    "qa": {"exact_match", "f1", "HasAns_f1", "NoAns_f1"},
    "translation": {"bleu", "chrf", "gen_len"},
    "summarization": {"rouge1", "rouge2", "rougeL", "rougeLsum", "gen_len"},
}


def _common(model_dir: str, train: str, dev: str, out: Path) -> list[str]:
    return [
        "--model_name_or_path",
        model_dir,
        "--train_file",
        train,
        "--validation_file",
        dev,
        "--output_dir",
        str(out),
        "--per_device_train_batch_size",
        "8",
        "--per_device_eval_batch_size",
        "8",
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "2",
        "--eval_steps",
        "2",
        "--learning_rate",
        "5e-3",
        "--num_warmup_steps",
        "1",
        "--report_to",
        "none",
    ]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_train_then_resume(family, tiny_train_models, task_files, tmp_path):
    spec = FAMILIES[family]
    train, dev = task_files(spec["data"], 32, 12)
    first = tmp_path / "first"
    base = _common(tiny_train_models[spec["model"]], train, dev, first) + spec["args"]

    assert main(base) == 0
    results = json.loads((first / "results.json").read_text())
    assert results["completed_steps"] == 4 and results["resumed_from_step"] == 0
    assert EXPECTED_METRICS[family] <= set(results["metrics"]["validation"])
    assert [h["step"] for h in results["history"]] == [2, 4]
    assert 0 < results["trainable_params"] < results["total_params"]
    assert results["train_samples_per_s"] > 0 and results["peak_memory_mb"] > 0 and results["wall_time_s"] > 0
    assert (first / "adapter" / "adapter_config.json").is_file()
    assert (first / "checkpoints" / "step_2" / "progress.json").is_file()
    assert (first / "checkpoints" / "step_4").is_dir()
    weights = load_file(first / "adapter" / "adapter_model.safetensors")
    rotations = [v for k, v in weights.items() if "ortho" in k]
    assert rotations and any(v.abs().max() > 0 for v in rotations), (
        "the rotations never moved from the identity"
    )

    resumed = tmp_path / "resumed"
    resume_args = _common(tiny_train_models[spec["model"]], train, dev, resumed) + spec["args"]
    assert main(resume_args + ["--resume_from_checkpoint", str(first / "checkpoints" / "step_2")]) == 0
    resumed_results = json.loads((resumed / "results.json").read_text())
    assert resumed_results["resumed_from_step"] == 2 and resumed_results["completed_steps"] == 4
    assert [h["step"] for h in resumed_results["history"]] == [
        2,
        4,
    ]  # history of steps 1-2 came from the checkpoint
    resumed_weights = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert resumed_weights.keys() == weights.keys()
    for key, value in weights.items():
        torch.testing.assert_close(
            resumed_weights[key], value, rtol=0, atol=1e-6, msg=f"{key} differs after resume"
        )


def test_saved_adapter_reproduces_the_reported_accuracy(tiny_train_models, task_files, tmp_path):
    """The adapter on disk is a standard PEFT adapter: loaded onto the base model it scores what results.json says."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import orthora  # noqa: F401 - registers the method with PEFT
    from orthora.train.recipes.glue import glue_metrics

    train, dev = task_files("sst2", 32, 16)
    out = tmp_path / "run"
    args = _common(tiny_train_models["bert"], train, dev, out) + FAMILIES["glue"]["args"]
    args += ["--report_to", "tensorboard", "--checkpointing_steps", "null", "--save_merged_model", "true"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert list((out / "logs").rglob("events.out.tfevents.*")), "no TensorBoard event file"

    rows = [json.loads(line) for line in Path(dev).read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(out / "adapter")
    batch = tokenizer([r["sentence"] for r in rows], padding=True, return_tensors="pt")
    labels = torch.tensor([r["label"] for r in rows])
    base = AutoModelForSequenceClassification.from_pretrained(tiny_train_models["bert"], num_labels=2)
    model = PeftModel.from_pretrained(base, out / "adapter").eval()
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged_model").eval()
    with torch.no_grad():
        logits = model(**batch).logits
        torch.testing.assert_close(merged(**batch).logits, logits, rtol=1e-4, atol=1e-5)
    accuracy = glue_metrics("sst2", logits.argmax(-1).numpy(), labels.numpy())["accuracy"]
    assert accuracy == pytest.approx(results["metrics"]["validation"]["accuracy"])


def test_head_learning_rate_drives_only_the_task_head(tiny_train_models, task_files, tmp_path):
    """``head_learning_rate`` reaches the optimizer for the head (modules_to_save) alone: a head rate of ~0 leaves
    the classifier where it started while the rotations still move; at the run's own rate the head moves too."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    import orthora  # noqa: F401 - registers the method with PEFT

    train, dev = task_files("sst2", 32, 16)
    heads, generators = {}, {}
    for name, head_lr in (("frozen_head", "1e-12"), ("same_rate", "null")):
        out = tmp_path / name
        args = _common(tiny_train_models["bert"], train, dev, out) + FAMILIES["glue"]["args"]
        assert main(args + ["--checkpointing_steps", "null", "--head_learning_rate", head_lr]) == 0
        base = AutoModelForSequenceClassification.from_pretrained(tiny_train_models["bert"], num_labels=2)
        model = PeftModel.from_pretrained(base, out / "adapter")
        state = model.state_dict()
        heads[name] = {k: v for k, v in state.items() if ".modules_to_save." in k and "classifier" in k}
        # the rotations of whichever side(s) the default config adapts (not a magnitude, which starts at 1)
        generators[name] = [v for k, v in state.items() if ".ortho_out." in k or ".ortho_in." in k]
    assert heads["frozen_head"] and generators["frozen_head"]
    for key, value in heads["frozen_head"].items():
        moved = (value - heads["same_rate"][key]).abs().max()
        assert moved > 1e-4, (
            f"{key}: the head trained at ~0 ended where the head trained at the run's rate did"
        )
    # the adapter kept the run's rate: its generators left the identity (zero) by far more than 1e-12 per step
    assert all(g.abs().max() > 1e-4 for g in generators["frozen_head"]), "the rotations did not train"


def test_killed_run_resumes_from_latest(tiny_train_models, task_files, tmp_path):
    """Simulate a kill after step 2 (later outputs gone, a half-written checkpoint left): 'latest' finishes the job."""
    import shutil

    train, dev = task_files("sst2", 32, 8)
    out = tmp_path / "run"
    args = _common(tiny_train_models["bert"], train, dev, out) + FAMILIES["glue"]["args"]
    assert main(args) == 0
    finished = load_file(out / "adapter" / "adapter_model.safetensors")
    for produced in ("adapter", "best_adapter", "results.json", "checkpoints/step_4"):
        path = out / produced
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    (out / "checkpoints" / ".step_4.tmp").mkdir()  # an interrupted save is never picked up
    assert main(args + ["--resume_from_checkpoint", "latest"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["resumed_from_step"] == 2 and results["completed_steps"] == 4
    resumed = load_file(out / "adapter" / "adapter_model.safetensors")
    for key, value in finished.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("method", "adapter"),
    [
        ("lora", "{r: 4, target_modules: [query, value]}"),
        ("oft", "{oft_block_size: 8, target_modules: [query, value]}"),
        ("boft", "{boft_block_size: 4, target_modules: [query, value]}"),
        ("hra", "{r: 2, target_modules: [query, value]}"),
    ],
    ids=["lora", "oft", "boft", "hra"],
)
def test_peft_baselines_run_through_the_same_key(method, adapter, tiny_train_models, task_files, tmp_path):
    train, dev = task_files("sst2", 16, 8)
    args = _common(tiny_train_models["bert"], train, dev, tmp_path / method)
    args += ["--task_name", "sst2", "--method", method, "--adapter", adapter, "--max_train_steps", "2"]
    args += ["--checkpointing_steps", "null", "--eval_steps", "null"]
    assert main(args) == 0
    config = json.loads((tmp_path / method / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == method.upper()
    results = json.loads((tmp_path / method / "results.json").read_text())
    assert results["method"] == method and results["completed_steps"] == 2 and results["trainable_params"] > 0
