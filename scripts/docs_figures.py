"""Draw the docs' index figure: what a block rotation does to one layer of all-MiniLM-L6-v2 (python scripts/docs_figures.py).

The numbers come from ``orthora.explain.rotation_effect`` on the real first query projection of the model and its
real inputs for the shipped sentiment sentences; this script only plots them.
"""

from __future__ import annotations

import argparse
import json
import sys
from itertools import islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a fresh clone works without `pip install`

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

from orthora.explain import random_block_rotation, rotation_effect  # noqa: E402
from orthora.train.quickstart import local_minilm_path, shipped_data_file  # noqa: E402

BLOCK = 32
ANGLE = 1.0  # largest rotation angle inside a block, radians


def layer_inputs(sentences: int = 8) -> tuple[torch.nn.Linear, torch.Tensor]:
    """The first attention query projection of all-MiniLM-L6-v2 and the token vectors it reads."""
    path = local_minilm_path()
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    with open(shipped_data_file("sentiment_dev.jsonl"), encoding="utf-8") as handle:
        texts = [json.loads(line)["sentence"] for line in islice(handle, sentences)]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model.embeddings(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])
    tokens = hidden[batch["attention_mask"].bool()]
    return model.encoder.layer[0].attention.self.query, tokens


def draw(out: Path) -> Path:
    layer, tokens = layer_inputs()
    effects = rotation_effect(
        layer.weight.detach(), layer.bias.detach(), tokens, block_size=BLOCK, angle=ANGLE
    )
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    shown = 3 * BLOCK
    rotation = random_block_rotation(layer.weight.shape[0], BLOCK, ANGLE)[:shown, :shown]
    image = axes[0].imshow(rotation, cmap="RdBu_r", vmin=-1, vmax=1)
    axes[0].set_title(
        f"R: one {BLOCK}x{BLOCK} rotation per block\n(first {shown} of {layer.weight.shape[0]} features)"
    )
    fig.colorbar(image, ax=axes[0], fraction=0.046)
    colors = ("tab:blue", "tab:orange", "tab:gray")
    for ax, kind, title in (
        (axes[1], "tokens", "angles between two tokens' outputs\n(the geometry of the representation)"),
        (axes[2], "neurons", "angles between two neurons (rows of W)\n(what the pretrained layer computes)"),
    ):
        for effect, color in zip(effects, colors, strict=True):
            before, after = getattr(effect, f"{kind}_before"), getattr(effect, f"{kind}_after")
            error = getattr(effect, f"{kind.rstrip('s')}_geometry_error")
            label = f"{effect.name}: max change {error:.1e}"
            kept = error < 1e-6  # drawn on top: the geometry this change keeps exactly
            ax.plot(
                before,
                after,
                ".",
                markersize=2,
                alpha=0.9 if kept else 0.35,
                color=color,
                label=label,
                zorder=3 if kept else 2,
            )
        ax.plot([-1, 1], [-1, 1], "k-", linewidth=0.5)
        ax.set_xlabel("cosine before")
        ax.set_ylabel("cosine after")
        ax.set_title(title)
        ax.legend(fontsize=7, markerscale=4, loc="upper left")
    change = effects[0].weight_change
    fig.suptitle(
        f"One layer of all-MiniLM-L6-v2 (attention query, 384 wide), every change of relative size {change:.2f}",
        fontsize=11,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="docs", help="folder for block_rotation.png (default: docs)")
    args = parser.parse_args(argv)
    print(f"wrote {draw(Path(args.out_dir) / 'block_rotation.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
