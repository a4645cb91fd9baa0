"""Extractive QA (SQuAD v1.1 / v2.0): sliding windows over long contexts, n-best span decoding, official EM/F1."""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Iterable
from typing import Any

import datasets
import numpy as np
from transformers import AutoModelForQuestionAnswering, DataCollatorWithPadding, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES

from ..config import ConfigError
from .base import EvalSet, TaskRecipe

# --- official SQuAD evaluation semantics (v1.1 evaluate-v1.1.py / v2.0 evaluate-v2.0.py) -------------------------
#: the official SQuAD v1.1 metrics (percent); v2 adds HasAns/NoAns breakdowns
SQUAD_METRICS = ("exact_match", "f1")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, squeeze whitespace (as the official scripts do)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _f1(prediction: str, gold: str) -> float:
    prediction_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not prediction_tokens or not gold_tokens:  # v2: no-answer matches only no-answer
        return float(prediction_tokens == gold_tokens)
    common = collections.Counter(prediction_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(prediction_tokens), overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """Exact match and F1 in percent, best over the reference answers; an empty reference list means unanswerable.

    Includes the v2 breakdown (HasAns/NoAns) whenever unanswerable questions are present.
    """
    exact: dict[str, float] = {}
    f1: dict[str, float] = {}
    for qid, golds in references.items():
        golds = [g for g in golds if normalize_answer(g)] or [""]
        prediction = predictions.get(qid, "")
        exact[qid] = max(float(normalize_answer(prediction) == normalize_answer(g)) for g in golds)
        f1[qid] = max(_f1(prediction, g) for g in golds)
    scores = {
        "exact_match": 100.0 * _mean(exact.values()),
        "f1": 100.0 * _mean(f1.values()),
        "total": len(references),
    }
    has_answer = [q for q, g in references.items() if any(normalize_answer(a) for a in g)]
    no_answer = [q for q in references if q not in set(has_answer)]
    if no_answer:
        for name, ids in (("HasAns", has_answer), ("NoAns", no_answer)):
            scores[f"{name}_exact"] = 100.0 * _mean(exact[q] for q in ids) if ids else float("nan")
            scores[f"{name}_f1"] = 100.0 * _mean(f1[q] for q in ids) if ids else float("nan")
            scores[f"{name}_total"] = len(ids)
    return scores


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


# --- span post-processing (after transformers' examples/pytorch/question-answering/utils_qa.py) ------------------
def postprocess_qa_predictions(
    examples: datasets.Dataset,
    features: datasets.Dataset,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    *,
    version_2_with_negative: bool,
    n_best_size: int,
    max_answer_length: int,
    null_score_diff_threshold: float,
    id_column: str = "id",
    context_column: str = "context",
) -> dict[str, str]:
    """Map window-level start/end logits back to one answer string per example ("" = no answer in v2)."""
    if len(features) != len(start_logits):
        raise ValueError(f"got {len(start_logits)} predictions for {len(features)} features")
    feature_ids_per_example = collections.defaultdict(list)
    for index, example_id in enumerate(features["example_id"]):
        feature_ids_per_example[example_id].append(index)
    offsets_per_feature = features["offset_mapping"]

    answers: dict[str, str] = {}
    for example in examples:
        example_id, context = example[id_column], example[context_column]
        min_null_score = None
        candidates = []
        for feature_index in feature_ids_per_example[example_id]:
            starts, ends = start_logits[feature_index], end_logits[feature_index]
            offsets = offsets_per_feature[feature_index]
            null_score = starts[0] + ends[0]  # [CLS] scores the no-answer prediction
            if min_null_score is None or null_score < min_null_score:
                min_null_score = null_score
            top_starts = np.argsort(starts)[-1 : -n_best_size - 1 : -1]
            top_ends = np.argsort(ends)[-1 : -n_best_size - 1 : -1]
            for start in top_starts:
                for end in top_ends:
                    if (
                        start >= len(offsets)
                        or end >= len(offsets)
                        or offsets[start] is None
                        or offsets[end] is None
                        or len(offsets[start]) < 2
                        or len(offsets[end]) < 2
                        or end < start
                        or end - start + 1 > max_answer_length
                    ):
                        continue
                    candidates.append((starts[start] + ends[end], offsets[start][0], offsets[end][1]))
        best = max(candidates, default=None)
        if best is None:
            answers[example_id] = ""
            continue
        if version_2_with_negative and min_null_score - best[0] > null_score_diff_threshold:
            answers[example_id] = ""
        else:
            answers[example_id] = context[best[1] : best[2]]
    return answers


class QuestionAnsweringRecipe(TaskRecipe):
    name = "qa"
    peft_task_type = "QUESTION_ANS"
    defaults = {"max_seq_length": 384}
    model_mapping_names = MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES
    model_kind = "a model with an extractive question-answering head (e.g. BERT, RoBERTa, DeBERTa)"

    def check_config(self) -> None:
        if self.config.doc_stride >= self.config.max_seq_length:
            raise ConfigError(
                f"doc_stride ({self.config.doc_stride}) must be smaller than max_seq_length ({self.config.max_seq_length})"
            )

    def hub_dataset(self) -> tuple[str, str | None]:
        return ("rajpurkar/squad_v2" if self.config.version_2_with_negative else "rajpurkar/squad"), None

    def required_columns(self) -> list[str]:
        return ["id", self.config.question_column, self.config.context_column, self.config.answer_column]

    def primary_metric(self) -> str:
        return "f1"

    def metric_names(self) -> list[str]:
        names = list(SQUAD_METRICS)
        if self.config.version_2_with_negative:
            names += [f"{group}_{kind}" for group in ("HasAns", "NoAns") for kind in ("exact", "f1")]
        return names

    def load_model(self, model_config: PretrainedConfig):
        return AutoModelForQuestionAnswering.from_pretrained(
            self.config.model_name_or_path,
            config=model_config,
            trust_remote_code=self.config.trust_remote_code,
        )

    def check_tokenizer(self, tokenizer) -> None:
        if not tokenizer.is_fast:
            raise ConfigError(
                "extractive QA needs a fast tokenizer (for offset mappings); this model only has a slow one"
            )
        self.pad_on_right = tokenizer.padding_side == "right"
        if self.config.max_seq_length > tokenizer.model_max_length:
            raise ConfigError(
                f"max_seq_length ({self.config.max_seq_length}) exceeds the tokenizer's limit ({tokenizer.model_max_length})"
            )

    def _encode(self, batch: dict[str, list], tokenizer) -> Any:
        questions = [
            q.lstrip() for q in batch[self.config.question_column]
        ]  # leading spaces waste window room
        contexts = batch[self.config.context_column]
        return tokenizer(
            questions if self.pad_on_right else contexts,
            contexts if self.pad_on_right else questions,
            truncation="only_second" if self.pad_on_right else "only_first",
            max_length=self.config.max_seq_length,
            stride=self.config.doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
        )

    def _check_answers(self, dataset: datasets.Dataset, name: str) -> None:
        for answer in dataset.select(range(min(len(dataset), 100)))[self.config.answer_column]:
            if not isinstance(answer, dict) or "text" not in answer or "answer_start" not in answer:
                raise ConfigError(
                    f"{name} data: column {self.config.answer_column!r} must hold {{text: [...], answer_start: [...]}}"
                )
            if not answer["text"] and not self.config.version_2_with_negative:
                raise ConfigError(
                    f"{name} data has unanswerable questions (empty answers); set version_2_with_negative: true"
                )

    def preprocess_train(self, dataset, tokenizer):
        self._check_answers(dataset, "train")
        context_index = 1 if self.pad_on_right else 0

        def prepare(batch: dict[str, list]) -> dict[str, list]:
            encoded = self._encode(batch, tokenizer)
            sample_map = encoded.pop("overflow_to_sample_mapping")
            offsets_list = encoded.pop("offset_mapping")
            encoded["start_positions"], encoded["end_positions"] = [], []
            for i, offsets in enumerate(offsets_list):
                input_ids = encoded["input_ids"][i]
                cls_index = (
                    input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0
                )
                sequence_ids = encoded.sequence_ids(i)
                answer = batch[self.config.answer_column][sample_map[i]]
                if not answer["answer_start"]:
                    encoded["start_positions"].append(cls_index)
                    encoded["end_positions"].append(cls_index)
                    continue
                start_char = answer["answer_start"][0]
                end_char = start_char + len(answer["text"][0])
                token_start = sequence_ids.index(context_index)
                token_end = len(sequence_ids) - 1 - sequence_ids[::-1].index(context_index)
                if not (offsets[token_start][0] <= start_char and offsets[token_end][1] >= end_char):
                    # The answer is not inside this window: label it as "no answer" ([CLS]).
                    encoded["start_positions"].append(cls_index)
                    encoded["end_positions"].append(cls_index)
                    continue
                while token_start < len(offsets) and offsets[token_start][0] <= start_char:
                    token_start += 1
                encoded["start_positions"].append(token_start - 1)
                while offsets[token_end][1] >= end_char:
                    token_end -= 1
                encoded["end_positions"].append(token_end + 1)
            return encoded

        return dataset.map(prepare, **self.map_kwargs(dataset, "Windowing train contexts"))

    def preprocess_eval(self, name, dataset, tokenizer) -> EvalSet:
        self._check_answers(dataset, name)
        context_index = 1 if self.pad_on_right else 0

        def prepare(batch: dict[str, list]) -> dict[str, list]:
            encoded = self._encode(batch, tokenizer)
            sample_map = encoded.pop("overflow_to_sample_mapping")
            encoded["example_id"] = []
            for i in range(len(encoded["input_ids"])):
                sequence_ids = encoded.sequence_ids(i)
                encoded["example_id"].append(batch["id"][sample_map[i]])
                # Keep offsets only for context tokens, so decoding can never return part of the question.
                encoded["offset_mapping"][i] = [
                    offset if sequence_ids[k] == context_index else None
                    for k, offset in enumerate(encoded["offset_mapping"][i])
                ]
            return encoded

        features = dataset.map(prepare, **self.map_kwargs(dataset, f"Windowing {name} contexts"))
        model_inputs = features.remove_columns(["example_id", "offset_mapping"])
        return EvalSet(name=name, examples=dataset, features=features, model_inputs=model_inputs)

    def collator(self, tokenizer, model, pad_to_multiple_of):
        return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)

    def predict(self, model, batch, accelerator):
        outputs = model(**batch)
        return {
            "start_logits": (outputs.start_logits.float(), -1e4),
            "end_logits": (outputs.end_logits.float(), -1e4),
        }

    def compute_metrics(self, eval_set, outputs):
        config = self.config
        predictions = postprocess_qa_predictions(
            eval_set.examples,
            eval_set.features,
            outputs["start_logits"],
            outputs["end_logits"],
            version_2_with_negative=config.version_2_with_negative,
            n_best_size=config.n_best_size,
            max_answer_length=config.max_answer_length,
            null_score_diff_threshold=config.null_score_diff_threshold,
            context_column=config.context_column,
        )
        references = {row["id"]: list(row[config.answer_column]["text"]) for row in eval_set.examples}
        return squad_scores(predictions, references)
