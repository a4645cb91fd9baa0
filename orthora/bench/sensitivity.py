"""How much a rotation of a given angle disturbs a pretrained encoder, per side and per kind of layer.

Training picks the directions of its rotations, but how sensitive the model is to a rotation on each side does not
depend on training: put the same random rotation angle ``theta`` (every block ``exp(A)`` with ``||A||_2 = theta``) on
the output side or on the input side of a set of layers of all-MiniLM-L6-v2, and measure what it breaks, with no
training at all:

* ``sts_drop``: the fall of the zero-shot STS-B score (sentence-level knowledge; see :mod:`.forgetting`);
* ``token_shift``: the mean ``1 - cos`` between each token's last hidden state before and after, over SQuAD
  question-context pairs: how far the token coordinates moved (a global rotation of the last layer moves them too,
  and a freshly trained head would not care);
* ``token_cka``: ``1 -`` linear CKA between the token states before and after: how much the token-level geometry
  changed (invariant to rotations and scale of the whole space), what extractive QA reads its answer spans from.

The layer sets separate the layers that *write* into the residual stream (``attention.output.dense`` and the
feed-forward ``output.dense``: their output is added to the skip connection and normalised per coordinate by the next
LayerNorm) from the layers that only *read* it (``query``, ``key``, ``value``, ``intermediate.dense``).

``python -m orthora.bench.sensitivity --sts-pairs 500 --qa-pairs 100 --out benchmarks/results/sensitivity.json``
(48 settings; 11 minutes on one busy core).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from orthora.rotations import skew_symmetric

from .forgetting import load_sts_pairs, zero_shot_sts
from .models import minilm_path
from .report import machine_info

#: layers that add their output to the residual stream (the next LayerNorm normalises it per coordinate)
WRITERS = ["attention.output.dense", "output.dense"]
#: layers that only read the stream (their output goes through attention or GELU before the next write)
READERS = ["query", "key", "value", "intermediate.dense"]
LAYER_SETS = {"all": READERS + WRITERS, "writers": WRITERS, "readers": READERS}
SIDES = ("output", "input")
DEFAULT_ANGLES = (0.1, 0.3, 0.5, 1.0)


@torch.no_grad()
def set_rotation_angle(model: torch.nn.Module, theta: float, generator: torch.Generator) -> int:
    """Give every ``exp`` block of ``model``'s orthora adapters a random generator of spectral norm ``theta``.

    Returns the number of blocks set. Every plane of a block turns by at most ``theta`` radians, the largest by
    exactly ``theta``.
    """
    from orthora.layer import BlockRotation

    count = 0
    for module in model.modules():
        if not isinstance(module, BlockRotation):
            continue
        if module.parametrization != "exp":
            raise ValueError(
                f"set_rotation_angle needs parametrization='exp', got {module.parametrization!r}"
            )
        params = torch.randn(module.weight.shape, generator=generator, dtype=torch.float64)
        norms = torch.linalg.matrix_norm(skew_symmetric(params, module.block_size), ord=2)
        params *= (theta / (norms * module.scale)).unsqueeze(-1)
        module.weight.copy_(params.to(module.weight.dtype))
        count += params.shape[0]
    return count


def load_qa_pairs(path: str | Path, limit: int) -> tuple[list[str], list[str]]:
    """``(questions, contexts)`` of the first ``limit`` rows of a SQuAD-schema JSON Lines file."""
    questions, contexts = [], []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            questions.append(row["question"])
            contexts.append(row["context"])
            if len(questions) >= limit:
                break
    return questions, contexts


@torch.no_grad()
def token_states(
    encoder: torch.nn.Module, tokenizer, pairs: tuple[list[str], list[str]], batch_size: int = 16
):
    """Last hidden states of every non-padding token of every (question, context) pair, concatenated."""
    states = []
    questions, contexts = pairs
    for start in range(0, len(questions), batch_size):
        batch = tokenizer(
            questions[start : start + batch_size],
            contexts[start : start + batch_size],
            padding=True,
            truncation="only_second",
            max_length=256,
            return_tensors="pt",
        )
        hidden = encoder(**batch).last_hidden_state
        states.append(hidden[batch["attention_mask"].bool()])
    return torch.cat(states)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear centred kernel alignment of two ``(n, d)`` sets of the same ``n`` points (Kornblith et al., 2019).

    1 when ``y`` is an orthogonal transform and rescaling of ``x``; lower as their geometries differ.
    """
    x = (x - x.mean(0)).double()
    y = (y - y.mean(0)).double()
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    return float(cross / (torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)))


def measure(
    data_dir: Path,
    angles=DEFAULT_ANGLES,
    seeds=(0, 1),
    sts_pairs: int | None = None,
    qa_pairs: int = 200,
    block_size: int = 32,
    log=print,
) -> dict[str, Any]:
    """Every (side, layer set, angle, seed): STS-B drop and token shift, next to the untouched model's score."""
    from peft import get_peft_model
    from transformers import AutoModel, AutoTokenizer

    from orthora import OrthoConfig

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    sts = load_sts_pairs(data_dir / "glue" / "stsb" / "validation.jsonl", sts_pairs)
    qa = load_qa_pairs(data_dir / "squad" / "validation.jsonl", qa_pairs)
    base = AutoModel.from_pretrained(path).eval()
    base_sts = zero_shot_sts(base, tokenizer, sts)
    base_states = token_states(base, tokenizer, qa)
    rows = []
    for side in SIDES:
        for layer_set, targets in LAYER_SETS.items():
            for theta in angles:
                for seed in seeds:
                    started = time.perf_counter()
                    config = OrthoConfig(
                        side=side, target_modules=targets, parametrization="exp", block_size=block_size
                    )
                    model = get_peft_model(AutoModel.from_pretrained(path), config).eval()
                    blocks = set_rotation_angle(model, theta, torch.Generator().manual_seed(seed))
                    adapted_sts = zero_shot_sts(model, tokenizer, sts)
                    states = token_states(model, tokenizer, qa)
                    shift = (
                        1 - torch.nn.functional.cosine_similarity(states, base_states, dim=-1).mean().item()
                    )
                    cka = 1 - linear_cka(base_states, states)
                    rows.append(
                        {
                            "side": side,
                            "layers": layer_set,
                            "theta": theta,
                            "seed": seed,
                            "blocks": blocks,
                            "sts_drop": base_sts - adapted_sts,
                            "token_shift": shift,
                            "token_cka": cka,
                        }
                    )
                    log(
                        f"{side:6} {layer_set:7} theta={theta:<5g} seed={seed}: STS-B drop "
                        f"{base_sts - adapted_sts:6.2f}, token shift {shift:.4f}, 1-CKA {cka:.4f} ({time.perf_counter() - started:.0f}s)"
                    )
    return {"base_sts": base_sts, "block_size": block_size, "qa_pairs": qa_pairs, "rows": rows}


def summary_markdown(result: dict[str, Any]) -> str:
    """Mean over seeds per (side, layer set, angle): STS-B drop / token shift x1000 / (1 - token CKA) x1000."""
    cells: dict[tuple, list[dict]] = {}
    for row in result["rows"]:
        cells.setdefault((row["layers"], row["theta"], row["side"]), []).append(row)
    angles = sorted({row["theta"] for row in result["rows"]})
    lines = [
        "| layers | angle (rad) | "
        + " | ".join(f"{s} side: STS-B drop / shift / 1-CKA" for s in SIDES)
        + " |",
        "|---|---|" + "---|" * len(SIDES),
    ]
    for layer_set in LAYER_SETS:
        for theta in angles:
            parts = []
            for side in SIDES:
                rows = cells.get((layer_set, theta, side), [])
                if not rows:
                    parts.append("")
                    continue
                drop = statistics.mean(r["sts_drop"] for r in rows)
                shift = statistics.mean(r["token_shift"] for r in rows) * 1000
                cka = statistics.mean(r["token_cka"] for r in rows) * 1000
                parts.append(f"{drop:.2f} / {shift:.1f} / {cka:.1f}")
            lines.append(f"| {layer_set} | {theta:g} | " + " | ".join(parts) + " |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    """The probe's command line (``python -m orthora.bench.sensitivity``)."""
    from orthora.train.data import default_data_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--angles", default=",".join(map(str, DEFAULT_ANGLES)))
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--sts-pairs", type=int, default=None)
    parser.add_argument("--qa-pairs", type=int, default=200)
    parser.add_argument(
        "--out", type=Path, required=True, help="JSON results; the table goes next to it (.md)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = measure(
        args.data_dir,
        angles=[float(a) for a in args.angles.split(",")],
        seeds=[int(s) for s in args.seeds.split(",")],
        sts_pairs=args.sts_pairs,
        qa_pairs=args.qa_pairs,
    )
    result["machine"] = machine_info()
    from orthora.train.atomic_files import write_json_atomic, write_text_atomic

    write_json_atomic(args.out, result)
    write_text_atomic(args.out.with_suffix(".md"), summary_markdown(result))
    print(summary_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
