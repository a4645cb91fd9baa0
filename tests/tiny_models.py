"""Tiny random Hugging Face models built from configs (no downloads), shared by the core tests."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    BartConfig,
    BertConfig,
    DebertaV2Config,
    GPT2Config,
    LlamaConfig,
    RobertaConfig,
    T5Config,
)

VOCAB = 128


def tiny_bert(num_labels: int = 2, seed: int = 0, hidden: int = 64, **overrides):
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        num_labels=num_labels,
        **overrides,
    )
    return AutoModelForSequenceClassification.from_config(cfg).eval()


# name -> (builder, target_modules, kind of batch)
def _roberta():
    cfg = RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=70,
        num_labels=2,
    )
    return AutoModelForSequenceClassification.from_config(cfg)


def _deberta():
    cfg = DebertaV2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
        num_labels=2,
    )
    return AutoModelForSequenceClassification.from_config(cfg)


def _gpt2():
    return AutoModelForCausalLM.from_config(
        GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=2, n_positions=64)
    )


def _llama():
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return AutoModelForCausalLM.from_config(cfg)


def _t5():
    cfg = T5Config(
        vocab_size=VOCAB,
        d_model=64,
        d_kv=32,
        d_ff=128,
        num_layers=2,
        num_heads=2,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return AutoModelForSeq2SeqLM.from_config(cfg)


def _bart():
    cfg = BartConfig(
        vocab_size=VOCAB,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_position_embeddings=64,
    )
    return AutoModelForSeq2SeqLM.from_config(cfg)


ARCHITECTURES = {
    "bert": (lambda: tiny_bert(), "SEQ_CLS", ["query", "value", "intermediate.dense"], "cls"),
    "roberta": (_roberta, "SEQ_CLS", ["query", "key", "value"], "cls"),
    "deberta-v2": (_deberta, "SEQ_CLS", ["query_proj", "value_proj"], "cls"),
    "gpt2": (_gpt2, "CAUSAL_LM", ["c_attn", "c_proj"], "lm"),
    "llama": (
        _llama,
        "CAUSAL_LM",
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "lm",
    ),
    "t5": (_t5, "SEQ_2_SEQ_LM", ["q", "k", "v", "o", "wi", "wo"], "s2s"),
    "bart": (_bart, "SEQ_2_SEQ_LM", ["q_proj", "v_proj", "fc1", "fc2"], "s2s"),
}


def batch_for(kind: str, batch: int = 3, length: int = 9, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    if kind == "cls":
        return {"input_ids": ids, "labels": torch.randint(0, 2, (batch,), generator=g)}
    if kind == "lm":
        return {"input_ids": ids, "labels": ids.clone()}
    return {"input_ids": ids, "labels": torch.randint(3, VOCAB, (batch, 5), generator=g)}


def model_output(model, batch: dict) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if "decoder_input_ids" not in inputs and getattr(model.config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = batch["labels"]
    return model(**inputs).logits
