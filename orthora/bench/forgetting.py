"""How much fine-tuning made a sentence-embedding model forget: its zero-shot STS-B score before and after.

all-MiniLM-L6-v2 is trained to embed sentences (mean of the last hidden states, compared by cosine). Fine-tuning it
for a classification task through an adapter changes its encoder; scoring the *adapted encoder's* embeddings on STS-B
without any training on STS-B measures what the adapter destroyed of the pretrained skill. The drop
``base score - adapted score`` is the forgetting reported next to each method's task score.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from scipy.stats import spearmanr
from torch import nn
from transformers import PreTrainedTokenizerBase

__all__ = ["load_sts_pairs", "mean_pooled_embeddings", "zero_shot_sts", "encoder_of"]


def load_sts_pairs(path: str | Path, limit: int | None = None) -> tuple[list[str], list[str], list[float]]:
    """STS-B pairs ``(sentence1, sentence2, gold score)`` from a GLUE-schema JSON Lines file."""
    first, second, gold = [], [], []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            first.append(row["sentence1"])
            second.append(row["sentence2"])
            gold.append(float(row["label"]))
            if limit is not None and len(gold) >= limit:
                break
    if not gold:
        raise ValueError(f"no STS-B pairs in {path}")
    return first, second, gold


def encoder_of(model: nn.Module) -> nn.Module:
    """The bare transformer inside a task model (``BertForSequenceClassification.bert``), or the model itself.

    PEFT wrappers are looked through, so an adapted model (merged or not) is scored as the encoder the task head sees.
    """
    inner = model
    while hasattr(inner, "get_base_model") and inner.get_base_model() is not inner:
        inner = inner.get_base_model()
    base = getattr(inner, "base_model", inner)
    return base if isinstance(base, nn.Module) else inner


@torch.no_grad()
def mean_pooled_embeddings(
    encoder: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    sentences: Sequence[str],
    batch_size: int = 64,
    max_length: int = 128,
) -> torch.Tensor:
    """Attention-masked mean of the last hidden states (sentence-transformers' pooling for all-MiniLM-L6-v2)."""
    device = next(encoder.parameters()).device
    chunks = []
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(
            list(sentences[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        hidden = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        chunks.append(((hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)).float())
    return torch.cat(chunks)


def zero_shot_sts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: tuple[list[str], list[str], list[float]],
    batch_size: int = 64,
) -> float:
    """Spearman correlation (x100) between gold STS-B scores and the cosine of mean-pooled embeddings."""
    encoder = encoder_of(model)
    was_training = encoder.training
    encoder.eval()
    try:
        first, second, gold = pairs
        a = mean_pooled_embeddings(encoder, tokenizer, first, batch_size)
        b = mean_pooled_embeddings(encoder, tokenizer, second, batch_size)
    finally:
        encoder.train(was_training)
    cosine = torch.nn.functional.cosine_similarity(a, b).numpy()
    return float(spearmanr(cosine, gold)[0]) * 100.0
