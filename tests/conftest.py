"""Shared fixtures. Append new fixtures below; keep each section self-contained."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# one pytest-xdist worker per core (addopts: -n auto), so one torch thread each
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")


# --- orthora.train: tiny random models, a word-level tokenizer and synthetic task data (no downloads) ------------
_POSITIVE = ["great", "wonderful", "superb", "lovely", "brilliant", "delightful"]
_NEGATIVE = ["awful", "terrible", "boring", "dreadful", "dull", "painful"]
_NOUNS = ["film", "movie", "story", "plot", "cast", "ending", "song", "book"]
_PEOPLE = ["anna", "boris", "carla", "dmitri", "elena", "farid", "greta", "hugo"]
_CITIES = ["paris", "lima", "oslo", "cairo", "quito", "delhi", "rome", "seoul"]
_FILLER = "the weather there was mild and the streets were quiet ."
_EN_DE = {
    "the": "die",
    "red": "rote",
    "small": "kleine",
    "green": "grüne",
    "cat": "katze",
    "dog": "hund",
    "bird": "vogel",
    "sees": "sieht",
    "likes": "mag",
    "follows": "folgt",
}
_WORDS = sorted(
    set(
        _POSITIVE
        + _NEGATIVE
        + _NOUNS
        + _PEOPLE
        + _CITIES
        + list(_EN_DE)
        + list(_EN_DE.values())
        + _FILLER.split()
        + "was a lives in where does live ? .".split()
    )
)


def synthetic_rows(kind: str, count: int, seed: int = 0) -> list[dict]:
    """Rows in the Hub schema of ``kind`` (sst2, squad_v2, translation, summarization), from small word lists."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        if kind == "sst2":
            label = i % 2
            adjective = rng.choice(_POSITIVE if label else _NEGATIVE)
            rows.append({"sentence": f"the {rng.choice(_NOUNS)} was {adjective}", "label": label, "idx": i})
        elif kind == "squad_v2":
            people = rng.sample(_PEOPLE, 3)
            cities = rng.sample(_CITIES, 3)
            context = " ".join(f"{p} lives in {c} . {_FILLER}" for p, c in zip(people, cities, strict=True))
            answerable = i % 3 != 2
            person = rng.choice(people) if answerable else next(p for p in _PEOPLE if p not in people)
            answers = {"text": [], "answer_start": []}
            if answerable:
                city = cities[people.index(person)]
                answers = {
                    "text": [city],
                    "answer_start": [context.index(f"{person} lives in {city}") + len(f"{person} lives in ")],
                }
            rows.append(
                {
                    "id": f"q{i}",
                    "title": "t",
                    "context": context,
                    "question": f"where does {person} live ?",
                    "answers": answers,
                }
            )
        elif kind == "translation":
            words = [
                "the",
                rng.choice(["red", "small", "green"]),
                rng.choice(["cat", "dog", "bird"]),
                rng.choice(["sees", "likes", "follows"]),
                "the",
                rng.choice(["cat", "dog", "bird"]),
            ]
            rows.append({"translation": {"en": " ".join(words), "de": " ".join(_EN_DE[w] for w in words)}})
        elif kind == "summarization":
            sentences = [f"{rng.choice(_PEOPLE)} lives in {rng.choice(_CITIES)} ." for _ in range(3)]
            rows.append({"id": str(i), "document": " ".join(sentences + [_FILLER]), "summary": sentences[0]})
        else:
            raise ValueError(kind)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def task_files(tmp_path):
    """``task_files(kind, n_train, n_eval)`` -> (train.jsonl, validation.jsonl) paths of synthetic rows."""

    def make(kind: str, n_train: int = 32, n_eval: int = 12) -> tuple[str, str]:
        train = write_jsonl(tmp_path / f"{kind}_train.jsonl", synthetic_rows(kind, n_train, seed=1))
        dev = write_jsonl(tmp_path / f"{kind}_dev.jsonl", synthetic_rows(kind, n_eval, seed=2))
        return train, dev

    return make


@pytest.fixture(scope="session")
def tiny_train_models(tmp_path_factory) -> dict[str, str]:
    """Folders of tiny random BERT, T5 and BART checkpoints sharing a word-level fast tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        BertConfig,
        BertModel,
        PreTrainedTokenizerFast,
        T5Config,
        T5ForConditionalGeneration,
    )

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate(specials + _WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=128,
    )
    size = len(vocab)
    torch.manual_seed(0)
    built = {
        "bert": BertModel(
            BertConfig(
                vocab_size=size,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=128,
            )
        ),
        "t5": T5ForConditionalGeneration(
            T5Config(
                vocab_size=size,
                d_model=32,
                d_kv=16,
                d_ff=64,
                num_layers=2,
                num_heads=2,
                pad_token_id=0,
                eos_token_id=3,
                decoder_start_token_id=0,
            )
        ),
        "bart": BartForConditionalGeneration(
            BartConfig(
                vocab_size=size,
                d_model=32,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=2,
                decoder_attention_heads=2,
                encoder_ffn_dim=64,
                decoder_ffn_dim=64,
                max_position_embeddings=128,
                pad_token_id=0,
                bos_token_id=2,
                eos_token_id=3,
                decoder_start_token_id=3,
                forced_eos_token_id=3,
            )
        ),
    }
    root = tmp_path_factory.mktemp("tiny_train_models")
    paths = {}
    for name, model in built.items():
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


# --- orthora.hub: a Hub test double on 127.0.0.1 (tests/hub_server.py), the only Hub the tests can reach --------
HUB_TOKEN = "hf_alice_test_token"


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A running `FakeHub` (user ``alice``, token `HUB_TOKEN`) with huggingface_hub pointed at it and a fresh cache.

    Sets ``HF_ENDPOINT``/``HF_HUB_CACHE`` for subprocesses and the already-imported client's constants in-process.
    """
    import huggingface_hub.hf_api
    import transformers.utils.hub
    from hub_server import FakeHub
    from huggingface_hub import constants

    with FakeHub(tokens={HUB_TOKEN: "alice"}) as hub:
        cache = tmp_path / "hf_cache"
        for name, value in {
            "HF_ENDPOINT": hub.endpoint,
            "HF_HUB_CACHE": str(cache),
            "HF_HUB_OFFLINE": "0",
        }.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no_token"))
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(
            constants,
            "HUGGINGFACE_CO_URL_TEMPLATE",
            hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        )
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
        monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", hub.endpoint)  # the module-level HfApi()
        monkeypatch.setattr(
            transformers.utils.hub, "_hf_api", None
        )  # transformers' shared HfApi, rebuilt lazily
        hub.cache = cache
        yield hub
