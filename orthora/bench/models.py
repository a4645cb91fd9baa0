"""What a benchmark trains: model specs, their targeted linears, and the deterministic base models."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from orthora.train.quickstart import local_minilm_path

#: every attention and MLP linear of a BERT encoder (suffix names, as PEFT matches them)
BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
#: every attention and MLP projection of a Llama decoder
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

LLAMA_1B = dict(  # TinyLlama-1.1B shape
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
)
LLAMA_TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=256,
)


@dataclass
class ModelSpec:
    """What to build in a worker: the architecture, its size and the batch it trains on."""

    kind: str  # "minilm" | "bert-tiny" | "llama" | "mlp"
    batch: int = 16
    seq: int = 128
    dtype: str = "float32"
    device: str = "cpu"
    llama: dict = field(default_factory=dict)  # LlamaConfig overrides
    width: int = 384  # mlp only
    depth: int = 2  # mlp only
    seed: int = 0
    autocast: str | None = None  # train under torch.autocast with this dtype (e.g. "bfloat16" on CPU)
    gradient_checkpointing: bool = False  # transformers models only


def minilm_path() -> str:
    """Local HF-format all-MiniLM-L6-v2 (the quickstart's checkpoint; no Hub access needed)."""
    return local_minilm_path()


def build_model(spec: ModelSpec) -> Any:
    """The untouched base model for ``spec`` (deterministic: same seed, same weights), frozen."""
    torch.manual_seed(spec.seed)
    dtype = getattr(torch, spec.dtype)
    if spec.kind == "minilm":
        from transformers import BertModel

        model = BertModel.from_pretrained(minilm_path(), add_pooling_layer=False)
    elif spec.kind == "bert-tiny":
        from transformers import BertConfig, BertModel

        cfg = BertConfig(
            vocab_size=1000,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=256,
        )
        model = BertModel(cfg, add_pooling_layer=False)
    elif spec.kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(**{**LLAMA_1B, **spec.llama})
        cfg._attn_implementation = "sdpa"
        with torch.device(spec.device):  # built in its dtype: no float32 copy of a 1B model on the way
            model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    elif spec.kind == "mlp":
        model = LinearStack(spec.width, spec.depth)
    else:
        raise ValueError(f"unknown model kind {spec.kind!r}; valid: minilm, bert-tiny, llama, mlp")
    model.requires_grad_(False)
    return model.to(device=spec.device, dtype=dtype)


def target_modules(spec: ModelSpec) -> list[str]:
    """Every attention and MLP linear of the model (suffix names, as PEFT matches them)."""
    if spec.kind in ("minilm", "bert-tiny"):
        return list(BERT_TARGETS)
    if spec.kind == "llama":
        return list(LLAMA_TARGETS)
    return ["proj"]


class LinearBlock(nn.Module):
    """Linear(width, width) followed by GELU."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.gelu(self.proj(x))


class LinearStack(nn.Module):
    """``depth`` blocks of Linear + GELU at one width: the scaling sweep's model (one knob at a time)."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(LinearBlock(width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x
