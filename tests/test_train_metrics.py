"""Task metrics against hand-computed values: GLUE, SQuAD EM/F1 and span decoding, sacreBLEU/chrF, ROUGE."""

from __future__ import annotations

import math

import datasets
import numpy as np
import pytest

from orthora.train.engine import concat_padded
from orthora.train.recipes.glue import glue_metrics
from orthora.train.recipes.qa import normalize_answer, postprocess_qa_predictions, squad_scores
from orthora.train.recipes.seq2seq import rouge_metrics, translation_metrics


def test_glue_metrics_match_their_definitions():
    predictions, labels = np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 0, 1])
    # tp=2, fp=1, tn=2, fn=0: MCC = (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = 4 / sqrt(36)
    assert glue_metrics("cola", predictions, labels)["matthews_correlation"] == pytest.approx(4 / 6)
    assert glue_metrics("mrpc", predictions, labels) == pytest.approx({"accuracy": 0.8, "f1": 0.8})
    assert set(glue_metrics("mnli", predictions, labels)) == {"accuracy"}
    scores = glue_metrics("stsb", np.array([1.0, 2.0, 3.0, 5.0]), np.array([1.0, 2.0, 3.0, 4.0]))
    assert scores["spearmanr"] == pytest.approx(1.0)
    assert 0.95 < scores["pearson"] < 1.0


def test_squad_normalisation_and_scores():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    predictions = {"a": "the Eiffel Tower", "b": "in Paris France", "c": ""}
    references = {"a": ["Eiffel Tower"], "b": ["Paris", "Paris, France"], "c": ["Lyon"]}
    scores = squad_scores(predictions, references)
    # a: exact; b: best F1 vs "paris france" = 2*(2/3*1)/(2/3+1) = 0.8; c: empty prediction scores 0
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 0.8 + 0) / 3)
    assert "HasAns_f1" not in scores


def test_squad_v2_no_answer_semantics():
    predictions = {"a": "", "b": "Paris", "c": "", "d": "Rome"}
    references = {"a": [], "b": [], "c": ["Lyon"], "d": ["Rome"]}
    scores = squad_scores(predictions, references)
    assert scores["NoAns_exact"] == pytest.approx(50.0) and scores["NoAns_total"] == 2
    assert scores["HasAns_exact"] == pytest.approx(50.0) and scores["HasAns_total"] == 2
    assert scores["exact_match"] == pytest.approx(50.0)


def _features(rows):
    return datasets.Dataset.from_list([{"example_id": i, "offset_mapping": o} for i, o in rows])


def test_span_decoding_across_windows_and_null_threshold():
    context = "anna lives in paris ."
    examples = datasets.Dataset.from_list([{"id": "q", "context": context}])
    # Two windows over the context; token 0 is [CLS] (offset None, as for question tokens).
    offsets_1 = [None, [0, 4], [5, 10], [11, 13]]
    offsets_2 = [None, [11, 13], [14, 19], [20, 21]]
    features = _features([("q", offsets_1), ("q", offsets_2)])
    start = np.full((2, 4), -10.0)
    end = np.full((2, 4), -10.0)
    start[1, 2], end[1, 2] = 5.0, 5.0  # "paris" in the second window scores 10
    start[0, 1], end[0, 1] = 3.0, 3.0  # "anna" in the first window scores 6
    start[:, 0], end[:, 0] = 4.0, 4.0  # null score 8 in both windows
    kwargs = dict(n_best_size=3, max_answer_length=5, null_score_diff_threshold=0.0)
    v1 = postprocess_qa_predictions(examples, features, start, end, version_2_with_negative=False, **kwargs)
    assert v1 == {"q": "paris"}
    # v2: best span (10) beats the null score (8) unless the threshold says null must lose by more than -2.
    assert postprocess_qa_predictions(
        examples, features, start, end, version_2_with_negative=True, **kwargs
    ) == {"q": "paris"}
    start[:, 0], end[:, 0] = 6.0, 6.0  # null score 12 now beats every span
    assert postprocess_qa_predictions(
        examples, features, start, end, version_2_with_negative=True, **kwargs
    ) == {"q": ""}
    # Logits padded to a wider batch (-1e4 beyond the feature's tokens) decode the same.
    pad = [(0, 0), (0, 3)]
    padded_start, padded_end = (
        np.pad(start, pad, constant_values=-1e4),
        np.pad(end, pad, constant_values=-1e4),
    )
    assert postprocess_qa_predictions(
        examples, features, padded_start, padded_end, version_2_with_negative=True, **kwargs
    ) == {"q": ""}
    # A strong 3-token span ("in paris .") is only returned when max_answer_length allows 3 tokens.
    start[1, 1], end[1, 3], end[1, 2] = 50.0, 50.0, 4.0  # 2-token spans: "paris ." 55 > "in paris" 54
    for length, expected in ((3, "in paris ."), (2, "paris .")):
        decoded = postprocess_qa_predictions(
            examples,
            features,
            start,
            end,
            version_2_with_negative=False,
            n_best_size=3,
            max_answer_length=length,
            null_score_diff_threshold=0.0,
        )
        assert decoded == {"q": expected}


def test_generation_metrics():
    perfect = translation_metrics(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["chrf"] == pytest.approx(100.0)
    assert translation_metrics(["a b c d"], ["w x y z"])["bleu"] == pytest.approx(0.0)
    rouge = rouge_metrics(["Anna lives in Paris. She likes cats."], ["Anna lives in Paris. She likes cats."])
    assert rouge == pytest.approx({"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0, "rougeLsum": 100.0})
    partial = rouge_metrics(["anna lives in rome"], ["anna lives in paris"])
    assert partial["rouge1"] == pytest.approx(75.0) and partial["rouge2"] == pytest.approx(100 * 2 / 3)


def test_concat_padded_pads_ragged_batches():
    merged = concat_padded([np.ones((2, 3)), np.zeros((1, 5))], pad_value=-1)
    assert merged.shape == (3, 5) and (merged[:2, 3:] == -1).all() and merged[2].sum() == 0
    assert math.isclose(concat_padded([np.arange(2.0), np.arange(3.0)], 0).sum(), 4.0)
