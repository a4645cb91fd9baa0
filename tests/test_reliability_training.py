"""Training runs fail loudly instead of silently: non-finite losses/gradients, incomplete checkpoints, atomic files."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from orthora.train.atomic_files import write_json_atomic
from orthora.train.cli import main

ADAPTER = "{block_size: 16, target_modules: [query, value]}"


def common(model: str, train: str, dev: str, out: Path, steps: int = 4) -> list[str]:
    return [
        "--task", "glue", "--task_name", "sst2", "--model_name_or_path", model, "--train_file", train,
        "--validation_file", dev, "--output_dir", str(out), "--adapter", ADAPTER, "--per_device_train_batch_size",
        "4", "--per_device_eval_batch_size", "8", "--max_train_steps", str(steps), "--learning_rate", "5e-3",
        "--report_to", "none", "--seed", "3",
    ]  # fmt: skip


@pytest.fixture
def poisoned_bert(tiny_train_models, tmp_path):
    """The tiny BERT with the embedding row of the word 'dull' set to NaN: any batch holding it has a NaN loss."""
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_train_models["bert"])
    model = BertModel.from_pretrained(tiny_train_models["bert"])
    with torch.no_grad():
        model.embeddings.word_embeddings.weight[tokenizer.convert_tokens_to_ids("dull")] = float("nan")
    folder = tmp_path / "poisoned_bert"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def rows_with_dull_from(index: int, path: str) -> None:
    """Rewrite a training file so that only rows from ``index`` on mention 'dull' (the others never do)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    for i, row in enumerate(rows):
        words = row["sentence"].replace("dull", "dreadful").split()
        if i >= index and row["label"] == 0:
            words[-1] = "dull"
        row["sentence"] = " ".join(words)
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_nonfinite_loss_stops_with_the_step_and_module_and_writes_nothing_corrupt(
    poisoned_bert, task_files, tmp_path, capsys
):
    train, dev = task_files("sst2", 32, 8)
    rows_with_dull_from(8, train)  # the loader shuffles, so the failing step is read from the message
    rows_with_dull_from(99, dev)
    out = tmp_path / "run"
    args = common(poisoned_bert, train, dev, out, steps=8) + ["--checkpointing_steps", "1"]
    assert main(args) == 1
    message = capsys.readouterr().err
    assert "the loss is nan" in message
    assert (
        "first non-finite output comes from module base_model.model.bert.embeddings.word_embeddings"
        in message
    )
    assert "non-finite gradients in module(s)" in message and "on_nonfinite=stop" in message
    step = int(message.split("error: step ")[1].split(":")[0])
    assert 1 <= step <= 8
    # checkpoints before the bad step are complete and finite; nothing at or after it; no final adapter or results
    saved = sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*"))
    assert saved == list(range(1, step))
    for checkpoint in (out / "checkpoints").glob("step_*"):
        assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "model.safetensors").values())
    assert not (out / "adapter").exists() and not (out / "results.json").exists()


def test_nonfinite_steps_can_be_skipped_and_the_run_finishes_with_a_finite_adapter(
    poisoned_bert, task_files, tmp_path, caplog
):
    train, dev = task_files("sst2", 32, 8)
    rows_with_dull_from(16, train)
    rows_with_dull_from(99, dev)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="orthora.train.nonfinite"):
        assert main(common(poisoned_bert, train, dev, out, steps=8) + ["--on_nonfinite", "skip"]) == 0
    results = json.loads((out / "results.json").read_text())
    skipped = results["skipped_steps"]
    assert skipped and len(skipped) < 8 and results["completed_steps"] == 8
    assert all(f"step {s}: the loss is nan" in caplog.text for s in skipped)
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in adapter.values())
    assert any(t.abs().max() > 0 for k, t in adapter.items() if "ortho" in k)  # the finite steps did train


def test_resume_refuses_a_checkpoint_that_lacks_an_adapter_tensor(
    tiny_train_models, task_files, tmp_path, capsys
):
    """Checkpoints are loaded with strict=False (they hold only trainable tensors); a gap must not pass silently."""
    train, dev = task_files("sst2", 16, 8)
    out = tmp_path / "run"
    args = common(tiny_train_models["bert"], train, dev, out, steps=2) + ["--checkpointing_steps", "1"]
    assert main(args) == 0
    weights_file = out / "checkpoints" / "step_1" / "model.safetensors"
    tensors = load_file(weights_file)
    dropped = sorted(k for k in tensors if "ortho_" in k)[0]
    del tensors[dropped]
    save_file(tensors, weights_file, metadata={"format": "pt"})
    resumed = tmp_path / "resumed"
    resume_args = common(tiny_train_models["bert"], train, dev, resumed, steps=2)
    capsys.readouterr()
    assert main(resume_args + ["--resume_from_checkpoint", str(out / "checkpoints" / "step_1")]) == 2
    message = capsys.readouterr().err
    assert "does not match this run's adapter (1 trainable tensor(s) missing" in message
    assert dropped in message
    assert not (resumed / "adapter").exists()
    # another adapter shape is named too, before any step
    other = list(resume_args)
    other[other.index("--adapter") + 1] = "{block_size: 8, target_modules: [query, value]}"
    assert main(other + ["--resume_from_checkpoint", str(out / "checkpoints" / "step_2")]) == 2
    assert "with another shape" in capsys.readouterr().err


def test_atomic_json_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"accuracy": 0.5})

    class Unserialisable:
        def __str__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_json_atomic(path, {"accuracy": Unserialisable()})
    assert json.loads(path.read_text()) == {"accuracy": 0.5}
    assert os.listdir(tmp_path) == ["results.json"]  # no temporary file left behind
