"""The ``orthora`` command line, every subcommand end to end on a tiny model (and the loopback Hub for sharing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HUB_TOKEN, synthetic_rows, write_jsonl
from huggingface_hub import ModelCard
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from orthora import diagnostics
from orthora.cli import main
from orthora.hub import load_pretrained

REPO = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ("train", "eval", "merge", "inspect", "push", "quickstart")


@pytest.fixture(scope="module")
def trained(tiny_train_models, tmp_path_factory):
    """One `orthora train` run on the tiny BERT (shared by the tests of this module): (config.yaml, output dir)."""
    root = tmp_path_factory.mktemp("cli_run")
    train = write_jsonl(root / "train.jsonl", synthetic_rows("sst2", 32, seed=1))
    dev = write_jsonl(root / "dev.jsonl", synthetic_rows("sst2", 12, seed=2))
    config = root / "sst2.yaml"
    config.write_text(
        f"task: glue\ntask_name: sst2\nmodel_name_or_path: {tiny_train_models['bert']}\n"
        f"train_file: {train}\nvalidation_file: {dev}\nreport_to: none\nper_device_train_batch_size: 8\n"
        "adapter:\n  block_size: 16\n  target_modules: [query, value]\n"
    )
    out = root / "run"
    code = main(
        ["train", str(config), "--num_train_epochs", "2", "--learning_rate", "1e-2", "--output_dir", str(out)]
    )
    assert code == 0
    return config, out


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what earlier steps of the test printed
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_everywhere_with_examples(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and all(name in out for name in SUBCOMMANDS)
    for name in SUBCOMMANDS:
        code, out, _ = run_cli(capsys, name, "--help")
        assert code == 0 and "Examples:" in out and f"orthora {name}" in out, name


def test_console_script_runs_as_a_module():
    done = subprocess.run(
        [sys.executable, "-m", "orthora.cli", "train", "--keys"], capture_output=True, text=True, cwd=REPO
    )
    assert (
        done.returncode == 0 and "--learning_rate (float)" in done.stdout and "--hub_model_id" in done.stdout
    )


def test_train_prints_metrics_and_writes_the_run(trained, capsys):
    config, out = trained
    results = json.loads((out / "results.json").read_text())
    assert results["completed_steps"] == 8 and results["config"]["learning_rate"] == pytest.approx(1e-2)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--learning_rat", "0.1"],
            "orthora: error: unknown config key 'learning_rat' (did you mean 'learning_rate'?)",
        ),
        (
            ["--doc_stride", "8"],
            "orthora: error: config key 'doc_stride' applies to task(s) qa, not to task 'glue'",
        ),
        (["--learning_rate", "fast"], "expected a number, got 'fast'"),
    ],
)
def test_user_mistakes_are_one_line(trained, tmp_path, capsys, args, message):
    config, _ = trained
    code, out, err = run_cli(capsys, "train", str(config), "--output_dir", str(tmp_path / "x"), *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "x").exists()
    code, _, err = run_cli(
        capsys, "--verbose", "train", str(config), "--output_dir", str(tmp_path / "x"), *args
    )
    assert code == 2 and "Traceback" in err and message.removeprefix("orthora: error: ") in err


def test_eval_reproduces_the_runs_final_metrics(trained, capsys):
    config, out = trained
    results = json.loads((out / "results.json").read_text())
    code, printed, _ = run_cli(capsys, "eval", str(out / "adapter"), "--config", str(config), "--json")
    assert code == 0
    metrics = json.loads(printed)
    assert metrics["validation"]["accuracy"] == pytest.approx(results["metrics"]["validation"]["accuracy"])
    code, printed, _ = run_cli(
        capsys, "eval", str(out / "adapter"), "--config", str(config), "--max_eval_samples", "4"
    )
    assert code == 0 and printed.startswith("validation: accuracy=")
    code, _, err = run_cli(capsys, "eval", str(out / "nowhere"), "--config", str(config))
    assert code == 2 and "is neither an adapter folder nor a Hub id" in err


def test_merge_writes_sharded_plain_transformers_model(trained, tmp_path, capsys):
    _, out = trained
    merged_dir = tmp_path / "merged"
    code, printed, err = run_cli(
        capsys, "merge", str(out / "adapter"), "--out", str(merged_dir), "--max-shard-size", "20KB"
    )
    assert code == 0, err
    shards = sorted(merged_dir.glob("*.safetensors"))
    assert len(shards) > 1 and (merged_dir / "model.safetensors.index.json").is_file()
    assert "max |merged - adapted|" in printed
    plain = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()  # no orthora involved
    adapted = load_pretrained(str(out / "adapter")).eval()
    tokens = AutoTokenizer.from_pretrained(merged_dir)(
        ["the film was great", "dull"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        assert torch.allclose(plain(**tokens).logits, adapted(**tokens).logits, atol=1e-5)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_merge_refuses_outputs_that_do_not_match(trained, tmp_path, capsys):
    _, out = trained
    code, _, err = run_cli(
        capsys, "merge", str(out / "adapter"), "--out", str(tmp_path / "m"), "--tolerance", "-1"
    )
    assert code == 2 and "nothing was written" in err and not (tmp_path / "m").exists()
    assert not list(tmp_path.iterdir())  # no temporary folder left behind either


def test_inspect_shows_diagnostics_and_plots(trained, tmp_path, capsys):
    _, out = trained
    code, printed, _ = run_cli(capsys, "inspect", str(out / "adapter"), "--json")
    assert code == 0
    report = json.loads(printed)
    adapted = load_pretrained(str(out / "adapter"))
    expected = diagnostics.layer_report(adapted)
    # trained with the default side and magnitude: one row per rotated side, one for the magnitude
    config = adapted.peft_config["default"]
    per_module = (2 if config.side == "both" else 1) + config.magnitude
    assert [(r["module"], r["side"]) for r in report["rows"]] == [(r["module"], r["side"]) for r in expected]
    assert len(expected) == 4 * per_module  # query and value of 2 layers
    for shown, computed in zip(report["rows"], expected, strict=True):
        if computed["side"] == "magnitude":  # a per-feature scale: no angle or distance, a weight change
            assert shown["relative_weight_change"] == pytest.approx(computed["relative_weight_change"])
            assert shown["relative_weight_change"] > 0
            continue
        assert shown["distance_from_identity"] == pytest.approx(computed["distance_from_identity"])
        assert shown["distance_from_identity"] > 0 and shown["orthogonality_error"] < 1e-5
    plot = tmp_path / "rotations.png"
    code, printed, _ = run_cli(capsys, "inspect", str(out / "adapter"), "--plot", str(plot))
    assert code == 0 and "encoder.layer.0.attention.self.query" in printed and "summary:" in printed
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_push_then_eval_from_the_hub(fake_hub, trained, capsys):
    config, out = trained
    code, printed, err = run_cli(capsys, "push", str(out / "adapter"), "alice/cli-sst2", "--token", HUB_TOKEN)
    assert code == 0, err
    assert "commit: " + fake_hub.endpoint in printed
    files = fake_hub.files("alice/cli-sst2")
    card = ModelCard(files["README.md"].decode())
    results = json.loads((out / "results.json").read_text())
    best = next(h for h in results["history"] if h["step"] == results["best"]["step"])
    [accuracy] = [r for r in card.data.eval_results if r.metric_type == "accuracy"]
    assert accuracy.metric_value == pytest.approx(best["validation"]["accuracy"])

    code, printed, _ = run_cli(capsys, "eval", "alice/cli-sst2", "--config", str(config), "--json")
    assert code == 0
    assert json.loads(printed)["validation"]["accuracy"] == pytest.approx(
        results["metrics"]["validation"]["accuracy"]
    )
    assert isinstance(
        PeftModel.from_pretrained(
            AutoModelForSequenceClassification.from_pretrained(results["model_name_or_path"]),
            "alice/cli-sst2",
        ),
        PeftModel,
    )

    code, _, err = run_cli(capsys, "push", str(out / "adapter"), "alice/cli-sst2", "--token", "hf_wrong")
    assert code == 2 and err.strip() == (
        "orthora: error: the Hub rejected the token (401) for 'alice/cli-sst2': check HF_TOKEN or --token"
    )
    code, _, err = run_cli(capsys, "inspect", "alice/missing", "--token", HUB_TOKEN)
    assert code == 2 and "Hub repo 'alice/missing' not found" in err and len(err.strip().splitlines()) == 1


def test_quickstart_on_a_tiny_model(tiny_train_models, tmp_path, capsys):
    code, printed, _ = run_cli(
        capsys,
        "quickstart",
        "--model",
        tiny_train_models["bert"],
        "--output-dir",
        str(tmp_path / "q"),
        "--epochs",
        "1",
    )
    assert code == 0
    assert "dev accuracy before training:" in printed and "dev accuracy after training:" in printed
    assert (tmp_path / "q" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_train_under_accelerate_launch(trained, tmp_path):
    """``accelerate launch -m orthora.cli train`` on 2 CPU processes: one run, both processes, one printout."""
    import os
    import socket

    config, _ = trained
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(REPO / "configs" / "accelerate" / "cpu_ddp.yaml"), "--main_process_port", str(port),
         "-m", "orthora.cli", "train", str(config), "--max_train_steps", "2", "--output_dir", str(tmp_path / "ddp")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert results["num_processes"] == 2 and results["completed_steps"] == 2
    assert done.stdout.count("final metrics:") == 1


def test_train_options_parse_through_hf_argument_parser():
    """Hyphen spellings, bare booleans and number formats work; prefixes are not guessed; types are checked."""
    from orthora.train import ConfigError
    from orthora.train.cli import parse_args

    base = ["--model_name_or_path", "m", "--task_name", "sst2"]
    config = parse_args(
        [*base, "--eval-before-training", "--num_train_epochs", "1e1", "--max_grad_norm", "null"]
    )
    assert (
        config.eval_before_training is True and config.num_train_epochs == 10 and config.max_grad_norm is None
    )
    assert parse_args([*base, "--hub_revision", "null", "--hub_model_id", "a/b"]).hub_revision is None
    with pytest.raises(
        ConfigError, match=r"unknown config key 'num_train_epoch' \(did you mean 'num_train_epochs'\?\)"
    ):
        parse_args([*base, "--num_train_epoch", "2"])
    with pytest.raises(ConfigError, match="config key 'num_train_epochs': expected an integer, got 2.5"):
        parse_args([*base, "--num_train_epochs", "2.5"])
    with pytest.raises(ConfigError, match="expected one argument"):
        parse_args([*base, "--max_train_steps"])
    with pytest.raises(ConfigError, match="hub_strategy='often'; choose one of end, checkpoint"):
        parse_args([*base, "--hub_strategy", "often"])
