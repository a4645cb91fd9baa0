"""Bad input stops the finetune command with one line naming the cause, before any training step or output."""

from __future__ import annotations

import json

import pytest

from orthora.train.cli import main


def _run_and_expect_error(args, out, capsys) -> str:
    assert main(args + ["--output_dir", str(out), "--report_to", "none", "--max_train_steps", "2"]) == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert stderr, "no error message"
    message = stderr[-1]
    assert message.startswith("orthora-finetune: error: ")
    for produced in ("adapter", "checkpoints", "results.json", "best_adapter"):
        assert not (out / produced).exists(), f"{produced} was written although the input was bad"
    return message


def _lora_sst2(model: str, train: str, dev: str) -> list[str]:
    """The command line of a LoRA SST-2 run, the setting whose data the tests below break."""
    return ["--model_name_or_path", model, "--task_name", "sst2", "--method", "lora", "--train_file", train,
            "--validation_file", dev]  # fmt: skip


def test_unknown_config_key(tmp_path, capsys):
    message = _run_and_expect_error(
        ["--model_name_or_path", "m", "--task_name", "sst2", "--num_epochs", "3"], tmp_path / "out", capsys
    )
    assert "unknown config key 'num_epochs'" in message


def test_every_launched_process_reports_the_error(tmp_path, capsys, monkeypatch):
    """Under a launcher every rank meets the same bad input, and the first to exit gets the others killed: a line
    printed by rank 0 alone was lost whenever rank 1 exited first (seen under load in the FSDP launch test)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert main(["--model_name_or_path", "m", "--task_name", "sst2", "--num_epochs", "3"]) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("orthora-finetune [rank 1]: error: unknown config key 'num_epochs'")


def test_missing_data_column(tiny_train_models, tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": "a fine film", "label": i % 2}) + "\n" for i in range(8)))
    message = _run_and_expect_error(
        _lora_sst2(tiny_train_models["bert"], str(train), str(train)),
        tmp_path / "out",
        capsys,
    )
    assert f"train data file '{train}' has no column 'sentence' (its columns: text, label)" in message


def test_seq2seq_task_on_an_encoder_only_model(tiny_train_models, task_files, tmp_path, capsys):
    train, dev = task_files("translation", 8, 4)
    message = _run_and_expect_error(
        [
            "--task",
            "translation",
            "--source_lang",
            "en",
            "--target_lang",
            "de",
            "--method",
            "lora",
            "--model_name_or_path",
            tiny_train_models["bert"],
            "--train_file",
            train,
            "--validation_file",
            dev,
        ],
        tmp_path / "out",
        capsys,
    )
    assert "needs an encoder-decoder (seq2seq) model" in message and "'bert'" in message


@pytest.mark.parametrize("problem", ["missing", "malformed", "extension", "directory"])
def test_unreadable_data_file(problem, tiny_train_models, task_files, tmp_path, capsys):
    train, dev = task_files("sst2", 8, 4)
    bad = {
        "missing": tmp_path / "nope.jsonl",
        "malformed": tmp_path / "broken.jsonl",
        "extension": tmp_path / "data.txt",
        "directory": tmp_path / "folder.jsonl",
    }[problem]
    if problem == "malformed":
        bad.write_text('{"sentence": "fine", "label": 1}\n{"sentence": "oops", "label": \n')
    elif problem == "extension":
        bad.write_text("sentence,label\n")
    elif problem == "directory":
        bad.mkdir()
    message = _run_and_expect_error(
        _lora_sst2(tiny_train_models["bert"], train, str(bad)),
        tmp_path / "out",
        capsys,
    )
    assert f"validation data file '{bad}'" in message
    expected = {
        "missing": "does not exist",
        "malformed": "could not be read as json",
        "extension": "unsupported file type '.txt'",
        "directory": "does not exist",
    }[problem]
    assert expected in message


def test_labels_outside_the_task_range(tiny_train_models, tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    train.write_text(
        "".join(json.dumps({"sentence": "a film", "label": label}) + "\n" for label in (0, 1, 2, -1))
    )
    message = _run_and_expect_error(
        _lora_sst2(tiny_train_models["bert"], str(train), str(train)),
        tmp_path / "out",
        capsys,
    )
    assert "labels must be in 0..1 for sst2, found -1..2" in message


def test_unanswerable_questions_need_version_2(tiny_train_models, task_files, tmp_path, capsys):
    train, dev = task_files("squad_v2", 6, 3)
    message = _run_and_expect_error(
        [
            "--task",
            "qa",
            "--max_seq_length",
            "64",
            "--doc_stride",
            "16",
            "--method",
            "lora",
            "--model_name_or_path",
            tiny_train_models["bert"],
            "--train_file",
            train,
            "--validation_file",
            dev,
        ],
        tmp_path / "out",
        capsys,
    )
    assert "set version_2_with_negative: true" in message


def test_missing_model_and_checkpoint(tiny_train_models, task_files, tmp_path, capsys):
    train, dev = task_files("sst2", 8, 4)
    common = ["--task_name", "sst2", "--method", "lora", "--train_file", train, "--validation_file", dev]
    message = _run_and_expect_error(
        common + ["--model_name_or_path", str(tmp_path / "no_model")], tmp_path / "a", capsys
    )
    assert f"cannot load model '{tmp_path / 'no_model'}'" in message
    message = _run_and_expect_error(
        common
        + [
            "--model_name_or_path",
            tiny_train_models["bert"],
            "--resume_from_checkpoint",
            str(tmp_path / "ckpt"),
        ],
        tmp_path / "b",
        capsys,
    )
    assert "is not a checkpoint folder" in message


def test_unknown_best_metric(tiny_train_models, task_files, tmp_path, capsys):
    train, dev = task_files("sst2", 8, 4)
    message = _run_and_expect_error(
        ["--model_name_or_path", tiny_train_models["bert"], "--task_name", "cola", "--method", "lora",
         "--train_file", train, "--validation_file", dev, "--metric_for_best_model", "accuracy"],
        tmp_path / "out", capsys,
    )  # fmt: skip
    assert (
        "metric_for_best_model 'accuracy' is not reported by this task; choose one of matthews_correlation"
        in message
    )
