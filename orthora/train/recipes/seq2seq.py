"""Sequence-to-sequence recipes: translation (sacreBLEU, chrF) and summarization (ROUGE), both scored on generations."""

from __future__ import annotations

import logging
import re
from abc import abstractmethod

import datasets
import numpy as np
import sacrebleu
from rouge_score import rouge_scorer
from transformers import AutoModelForSeq2SeqLM, DataCollatorForSeq2Seq, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

from ..config import ConfigError
from ..data import check_columns
from .base import EvalSet, TaskRecipe

logger = logging.getLogger(__name__)


def translation_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Corpus sacreBLEU and chrF (default sacreBLEU settings: 13a tokenisation, one reference)."""
    return {
        "bleu": sacrebleu.corpus_bleu(predictions, [references]).score,
        "chrf": sacrebleu.corpus_chrf(predictions, [references]).score,
    }


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def rouge_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measure (x100) with stemming; Lsum sees one sentence per line, as it requires.

    Sentences are split at ., ! or ? followed by whitespace (no nltk punkt data download needed offline).
    """
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    totals = dict.fromkeys(["rouge1", "rouge2", "rougeL", "rougeLsum"], 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(
            "\n".join(_SENTENCE_END.split(reference.strip())),
            "\n".join(_SENTENCE_END.split(prediction.strip())),
        )
        for key in totals:
            totals[key] += scores[key].fmeasure
    count = max(len(predictions), 1)
    return {key: 100.0 * value / count for key, value in totals.items()}


class Seq2SeqRecipe(TaskRecipe):
    """Shared by translation and summarization: tokenised source/target pairs, beam-search generation at eval."""

    peft_task_type = "SEQ_2_SEQ_LM"
    model_mapping_names = MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
    model_kind = "an encoder-decoder (seq2seq) model such as T5, BART, mBART or Marian"

    def check_config(self) -> None:
        if self.config.generation_max_length is None:
            self.config.generation_max_length = self.config.max_target_length

    def check_model_config(self, model_config: PretrainedConfig) -> None:
        if not getattr(model_config, "is_encoder_decoder", False):
            raise ConfigError(
                f"task {self.config.task!r} needs {self.model_kind}; model {self.config.model_name_or_path!r} "
                f"(model_type {model_config.model_type!r}) is not encoder-decoder"
            )
        super().check_model_config(model_config)
        if model_config.model_type == "t5" and self.config.source_prefix is None:
            logger.warning(
                "T5 expects a task prefix: set source_prefix (e.g. 'summarize: ' or 'translate English to German: ')"
            )

    def check_tokenizer(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def load_model(self, model_config: PretrainedConfig):
        model = AutoModelForSeq2SeqLM.from_pretrained(
            self.config.model_name_or_path,
            config=model_config,
            trust_remote_code=self.config.trust_remote_code,
        )
        if model.config.decoder_start_token_id is None:
            raise ConfigError(
                "the model config has no decoder_start_token_id, so it cannot be trained for generation"
            )
        return model

    @abstractmethod
    def sources_and_targets(self, batch: dict[str, list]) -> tuple[list[str], list[str]]: ...

    def _tokenize(self, dataset: datasets.Dataset, tokenizer, description: str) -> datasets.Dataset:
        prefix = self.config.source_prefix or ""

        def tokenize(batch: dict[str, list]) -> dict[str, list]:
            sources, targets = self.sources_and_targets(batch)
            encoded = tokenizer(
                [prefix + s for s in sources], max_length=self.config.max_source_length, truncation=True
            )
            labels = tokenizer(text_target=targets, max_length=self.config.max_target_length, truncation=True)
            encoded["labels"] = labels["input_ids"]
            return encoded

        return dataset.map(tokenize, **self.map_kwargs(dataset, description))

    def preprocess_train(self, dataset, tokenizer):
        return self._tokenize(dataset, tokenizer, "Tokenizing train")

    def preprocess_eval(self, name, dataset, tokenizer) -> EvalSet:
        features = self._tokenize(dataset, tokenizer, f"Tokenizing {name}")
        return EvalSet(
            name=name, examples=dataset, features=features, model_inputs=features.remove_columns(["labels"])
        )

    def collator(self, tokenizer, model, pad_to_multiple_of):
        return DataCollatorForSeq2Seq(
            tokenizer, model=model, label_pad_token_id=-100, pad_to_multiple_of=pad_to_multiple_of
        )

    def generation_kwargs(self) -> dict:
        return {"max_new_tokens": self.config.generation_max_length, "num_beams": self.config.num_beams}

    def predict(self, model, batch, accelerator):
        generator = accelerator.unwrap_model(model)
        tokens = generator.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **self.generation_kwargs()
        )
        return {"tokens": (tokens, self.tokenizer.pad_token_id)}

    def decode(self, tokens: np.ndarray) -> tuple[list[str], float]:
        tokens = np.where(tokens < 0, self.tokenizer.pad_token_id, tokens).astype(np.int64)
        texts = [t.strip() for t in self.tokenizer.batch_decode(tokens, skip_special_tokens=True)]
        mean_length = float(np.mean(np.count_nonzero(tokens != self.tokenizer.pad_token_id, axis=1)))
        return texts, mean_length

    def references(self, eval_set: EvalSet) -> list[str]:
        return [t.strip() for t in self.sources_and_targets(eval_set.examples[:])[1]]


class TranslationRecipe(Seq2SeqRecipe):
    name = "translation"
    defaults = {"max_source_length": 128, "max_target_length": 128}

    def check_config(self) -> None:
        super().check_config()
        if not self.config.source_lang or not self.config.target_lang:
            raise ConfigError(
                "translation needs source_lang and target_lang (keys of the 'translation' column, e.g. en, de)"
            )
        # mBART-style codes (en_XX) name the data keys by their language part.
        self.source_key = self.config.source_lang.split("_")[0]
        self.target_key = self.config.target_lang.split("_")[0]

    def hub_dataset(self) -> tuple[str, str | None]:
        return (
            "wmt/wmt16",
            f"{self.target_key}-{self.source_key}"
            if self.target_key != "en"
            else f"{self.source_key}-{self.target_key}",
        )

    def required_columns(self) -> list[str]:
        return ["translation"]

    def check_split(self, dataset: datasets.Dataset, where: str) -> None:
        """Either a Hub-style ``translation`` dict column, or one column per language (e.g. from a csv)."""
        if "translation" in dataset.column_names:
            row = dataset[0]["translation"]
            for key in (self.source_key, self.target_key):
                if not isinstance(row, dict) or key not in row:
                    present = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                    raise ConfigError(
                        f"{where}: column 'translation' has no language key {key!r} (it has: {present})"
                    )
        else:
            check_columns(dataset, [self.source_key, self.target_key], where)

    def check_tokenizer(self, tokenizer) -> None:
        super().check_tokenizer(tokenizer)
        if hasattr(tokenizer, "src_lang") and hasattr(tokenizer, "tgt_lang"):  # mBART / M2M / NLLB tokenizers
            tokenizer.src_lang, tokenizer.tgt_lang = self.config.source_lang, self.config.target_lang
        self.forced_bos_token_id = None
        if self.config.forced_bos_token:
            token_id = tokenizer.convert_tokens_to_ids(self.config.forced_bos_token)
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise ConfigError(
                    f"forced_bos_token {self.config.forced_bos_token!r} is not in the tokenizer's vocabulary"
                )
            self.forced_bos_token_id = token_id

    def load_model(self, model_config: PretrainedConfig):
        if getattr(model_config, "decoder_start_token_id", None) is None and hasattr(
            self.tokenizer, "tgt_lang"
        ):
            model_config.decoder_start_token_id = self.tokenizer.convert_tokens_to_ids(
                self.config.target_lang
            )
        return super().load_model(model_config)

    def generation_kwargs(self) -> dict:
        kwargs = super().generation_kwargs()
        if self.forced_bos_token_id is not None:
            kwargs["forced_bos_token_id"] = self.forced_bos_token_id
        return kwargs

    def primary_metric(self) -> str:
        return "bleu"

    def metric_names(self) -> list[str]:
        return ["bleu", "chrf"]

    def sources_and_targets(self, batch):
        if "translation" in batch:
            pairs = batch["translation"]
            return [p[self.source_key] for p in pairs], [p[self.target_key] for p in pairs]
        return list(batch[self.source_key]), list(batch[self.target_key])

    def compute_metrics(self, eval_set, outputs):
        predictions, gen_len = self.decode(outputs["tokens"])
        return {**translation_metrics(predictions, self.references(eval_set)), "gen_len": gen_len}


#: Hub data set -> (document column, summary column), as in transformers' run_summarization.py.
SUMMARIZATION_COLUMNS = {
    "cnn_dailymail": ("article", "highlights"),
    "abisee/cnn_dailymail": ("article", "highlights"),
    "xsum": ("document", "summary"),
    "EdinburghNLP/xsum": ("document", "summary"),
    "samsum": ("dialogue", "summary"),
    "Samsung/samsum": ("dialogue", "summary"),
    "knkarthick/samsum": ("dialogue", "summary"),
}
_TEXT_CANDIDATES = ("article", "document", "dialogue", "text")
_SUMMARY_CANDIDATES = ("highlights", "summary")


class SummarizationRecipe(Seq2SeqRecipe):
    name = "summarization"
    defaults = {"max_source_length": 1024, "max_target_length": 128}

    def check_config(self) -> None:
        super().check_config()
        known = SUMMARIZATION_COLUMNS.get(
            self.config.dataset_name or ("" if self.config.train_file else "abisee/cnn_dailymail")
        )
        if known:
            self.config.text_column = self.config.text_column or known[0]
            self.config.summary_column = self.config.summary_column or known[1]

    def hub_dataset(self) -> tuple[str, str | None]:
        return "abisee/cnn_dailymail", "3.0.0"

    def required_columns(self) -> list[str]:
        return [c for c in (self.config.text_column, self.config.summary_column) if c]

    def check_split(self, dataset: datasets.Dataset, where: str) -> None:
        """Infer unset column names from the usual ones (article/document/dialogue, highlights/summary)."""
        for key, candidates in (("text_column", _TEXT_CANDIDATES), ("summary_column", _SUMMARY_CANDIDATES)):
            if getattr(self.config, key) is None:
                found = next((c for c in candidates if c in dataset.column_names), None)
                if found is None:
                    raise ConfigError(
                        f"{where}: set {key} (none of {', '.join(candidates)} is a column; it has: {', '.join(dataset.column_names)})"
                    )
                setattr(self.config, key, found)
        super().check_split(dataset, where)

    def primary_metric(self) -> str:
        return "rougeL"

    def metric_names(self) -> list[str]:
        return ["rouge1", "rouge2", "rougeL", "rougeLsum"]

    def sources_and_targets(self, batch):
        return list(batch[self.config.text_column]), list(batch[self.config.summary_column])

    def compute_metrics(self, eval_set, outputs):
        predictions, gen_len = self.decode(outputs["tokens"])
        return {**rouge_metrics(predictions, self.references(eval_set)), "gen_len": gen_len}
