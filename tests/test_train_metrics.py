"""Task metrics against hand-computed values: GLUE, SQuAD EM/F1 and span decoding, sacreBLEU/chrF, ROUGE."""

from __future__ import annotations

import math
from collections import Counter

import datasets
import numpy as np
import pytest

from orthora.train.engine import concat_padded
from orthora.train.recipes.glue import GLUE_METRICS, glue_metrics
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


def _ngrams(sequence, n: int) -> Counter:
    return Counter(tuple(sequence[i : i + n]) for i in range(len(sequence) - n + 1))


def _corpus_bleu_by_definition(hypotheses: list[str], references: list[str]) -> float:
    """Papineni et al.: clipped n-gram precisions (n <= 4) summed over the corpus, geometric mean, brevity penalty."""
    matches, totals, hyp_len, ref_len = [0] * 4, [0] * 4, 0, 0
    for hyp, ref in zip(hypotheses, references, strict=True):
        hyp, ref = hyp.split(), ref.split()
        hyp_len, ref_len = hyp_len + len(hyp), ref_len + len(ref)
        for n in range(1, 5):
            ref_counts = _ngrams(ref, n)
            matches[n - 1] += sum(min(c, ref_counts[g]) for g, c in _ngrams(hyp, n).items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return 100 * brevity * math.exp(sum(math.log(m / t) for m, t in zip(matches, totals, strict=True)) / 4)


def _corpus_chrf_by_definition(
    hypotheses: list[str], references: list[str], order: int = 6, beta: int = 2
) -> float:
    """Popovic: character n-gram (n <= 6, spaces removed) precision and recall averaged over n, then F-beta."""
    stats = [[0, 0, 0] for _ in range(order)]  # hypothesis n-grams, reference n-grams, matches
    for hyp, ref in zip(hypotheses, references, strict=True):
        hyp, ref = hyp.replace(" ", ""), ref.replace(" ", "")
        for n in range(1, order + 1):
            hyp_counts, ref_counts = _ngrams(hyp, n), _ngrams(ref, n)
            stats[n - 1][0] += sum(hyp_counts.values())
            stats[n - 1][1] += sum(ref_counts.values())
            stats[n - 1][2] += sum(min(c, ref_counts[g]) for g, c in hyp_counts.items())
    precision = sum(m / h for h, _, m in stats) / order
    recall = sum(m / r for _, r, m in stats) / order
    return 100 * (1 + beta**2) * precision * recall / (beta**2 * precision + recall)


def test_bleu_and_chrf_match_their_definitions_on_a_nontrivial_corpus():
    """Partial matches of different lengths: a swapped hypothesis/reference or a per-sentence mean would differ."""
    hypotheses = ["the quick brown fox jumps over the dog", "a cat sat on the red mat today"]
    references = ["the quick brown fox jumped over the lazy dog", "the cat sat on the mat"]
    scores = translation_metrics(hypotheses, references)
    assert scores["bleu"] == pytest.approx(_corpus_bleu_by_definition(hypotheses, references), abs=1e-6)
    assert scores["chrf"] == pytest.approx(_corpus_chrf_by_definition(hypotheses, references), abs=1e-6)
    assert scores["bleu"] == pytest.approx(39.7635, abs=1e-4)  # sacreBLEU 2.x corpus_bleu on the same pair
    assert scores["chrf"] == pytest.approx(67.9888, abs=1e-4)  # sacreBLEU 2.x corpus_chrf on the same pair
    swapped = translation_metrics(references, hypotheses)
    assert abs(swapped["bleu"] - scores["bleu"]) > 0.5 and abs(swapped["chrf"] - scores["chrf"]) > 0.5


def test_concat_padded_pads_ragged_batches():
    merged = concat_padded([np.ones((2, 3)), np.zeros((1, 5))], pad_value=-1)
    assert merged.shape == (3, 5) and (merged[:2, 3:] == -1).all() and merged[2].sum() == 0
    assert math.isclose(concat_padded([np.arange(2.0), np.arange(3.0)], 0).sum(), 4.0)


@pytest.mark.parametrize("task", sorted(GLUE_METRICS))
def test_glue_metrics_report_exactly_the_table_names(task):
    """The benchmark scores tasks by GLUE_METRICS' names; a recipe reporting other keys would silently score None."""
    import numpy as np

    labels = np.array([0, 1, 1, 0, 1, 0], dtype=float if task == "stsb" else int)
    predictions = labels if task != "stsb" else labels + 0.1 * np.arange(6)
    assert set(glue_metrics(task, predictions, labels)) == set(GLUE_METRICS[task])
