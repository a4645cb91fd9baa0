"""``orthora``: the command line for the daily work: train, eval, merge, inspect, push, quickstart.

A thin Typer layer over the library (`orthora.train`, `orthora.hub`, `orthora.diagnostics`). A user mistake
(bad config, wrong token, missing repo, adapter for another base model) exits with status 2 and one line on
stderr; ``--verbose`` adds the traceback and the libraries' own logs. Under several processes::

    accelerate launch -m orthora.cli train configs/glue/sst2.yaml
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Optional

import click
import typer

from .hub import HubError
from .train.config import ConfigError, report_error

PROG = "orthora"
USER_ERRORS = (ConfigError, HubError)


def _examples(*commands: str) -> str:
    """An epilog listing example commands, one per line."""
    return "Examples:\n\n" + "\n\n".join(f"  $ {command}" for command in commands)


app = typer.Typer(
    name=PROG,
    help="Exact orthogonal fine-tuning (a PEFT method): train, evaluate, merge, inspect and share adapters.",
    epilog=_examples(
        "orthora quickstart",
        "orthora train configs/glue/sst2.yaml --learning_rate 3e-4",
        "orthora inspect outputs/quickstart/adapter --plot rotations.png",
        "orthora push outputs/run/adapter you/name",
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
_options = {"verbose": False}

Token = Annotated[
    Optional[str], typer.Option(help="Hub token (default: HF_TOKEN or `hf auth login`).", show_default=False)
]
Revision = Annotated[Optional[str], typer.Option(help="Hub branch, tag or commit of the adapter.")]
BaseModel = Annotated[
    Optional[str],
    typer.Option(
        "--base-model", help="Base model id or folder, instead of the adapter's base_model_name_or_path."
    ),
]


@app.callback()
def _global(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show tracebacks and the libraries' logs and warnings.")
    ] = False,
) -> None:
    _options["verbose"] = verbose


@contextlib.contextmanager
def _library_output(verbose: bool) -> Iterator[None]:
    """Without --verbose, only errors from transformers, huggingface_hub and datasets, and no Python warnings;
    the previous levels come back afterwards (main() may run inside another program, e.g. the tests)."""
    import datasets
    import huggingface_hub
    import transformers

    modules = (transformers.logging, huggingface_hub.utils.logging, datasets.logging)
    levels = [module.get_verbosity() for module in modules]
    with warnings.catch_warnings():
        if not verbose:
            for module in modules:
                module.set_verbosity_error()
            warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for module, level in zip(modules, levels, strict=True):
                module.set_verbosity(level)


# ------------------------------------------------------------------------------------------------------ train
@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    epilog=_examples(
        "orthora train configs/glue/sst2.yaml",
        "orthora train configs/glue/sst2.yaml --learning_rate 3e-4 --adapter.block_size 16",
        "orthora train --keys (every key, its type and task)",
        "accelerate launch -m orthora.cli train configs/glue/sst2.yaml",
    ),
)
def train(
    args: Annotated[
        Optional[list[str]],
        typer.Argument(help="CONFIG.yaml (optional), then --key value overrides.", show_default=False),
    ] = None,
    keys: Annotated[bool, typer.Option("--keys", help="List every config key and exit.")] = False,
) -> None:
    """Fine-tune as CONFIG.yaml says (the training engine); prints the final metrics."""
    from .train.cli import parse_args, usage
    from .train.engine import RESULTS_FILE, run

    if keys:
        typer.echo(usage())
        return
    config = parse_args(args or [])
    results = run(config)
    if os.environ.get("LOCAL_RANK", "0") == "0":
        metrics = {k: v for k, v in results["metrics"].items() if k not in ("step", "epoch")}
        typer.echo(f"final metrics: {json.dumps(metrics, default=float)}")
        typer.echo(f"adapter: {results['adapter_dir']}; results: {Path(config.output_dir) / RESULTS_FILE}")


# ------------------------------------------------------------------------------------------------------- eval
@app.command(
    "eval",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    epilog=_examples(
        "orthora eval outputs/run/adapter --config configs/glue/sst2.yaml",
        "orthora eval you/bert-sst2-orthora --config sst2.yaml --revision v2 --max_eval_samples 200",
    ),
)
def evaluate(
    adapter: Annotated[str, typer.Argument(help="Adapter folder or Hub id (user/name).")],
    config: Annotated[
        Optional[Path],
        typer.Option(help="The task's YAML config (data, task, batch size); or give --key value."),
    ] = None,
    overrides: Annotated[
        Optional[list[str]], typer.Argument(help="--key value overrides of the config.", show_default=False)
    ] = None,
    revision: Revision = None,
    token: Token = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
) -> None:
    """Evaluate a local or Hub adapter on a task and print the metrics (no training)."""
    from .hub import download_adapter, read_adapter_config
    from .train.cli import parse_args
    from .train.config import load_yaml
    from .train.engine import evaluate_adapter

    overrides = list(overrides or [])
    folder = download_adapter(adapter, revision=revision, token=token)
    given = load_yaml(config) if config else {}
    if "model_name_or_path" not in given and not any(a.startswith("--model_name_or_path") for a in overrides):
        overrides += ["--model_name_or_path", str(read_adapter_config(folder).get("base_model_name_or_path"))]
    metrics = evaluate_adapter(parse_args([str(config)] * bool(config) + overrides), folder)
    if as_json:
        typer.echo(json.dumps(metrics, indent=2, default=float))
        return
    for split, values in metrics.items():
        shown = ", ".join(f"{k}={v:.4f}" for k, v in values.items() if k != "runtime_s")
        typer.echo(f"{split}: {shown}")


# ------------------------------------------------------------------------------------------------------ merge
@app.command(
    epilog=_examples(
        "orthora merge outputs/run/adapter --out merged/",
        "orthora merge you/bert-sst2-orthora --out merged/ --max-shard-size 200MB",
    ),
)
def merge(
    adapter: Annotated[str, typer.Argument(help="Adapter folder or Hub id (user/name).")],
    out: Annotated[Path, typer.Option(help="Folder for the merged model (replaced atomically).")],
    max_shard_size: Annotated[
        str,
        typer.Option(help="Largest safetensors shard, e.g. 5GB or 200MB (transformers' save_pretrained)."),
    ] = "5GB",
    tolerance: Annotated[
        float, typer.Option(help="Largest allowed |merged - adapted| on the probe batch.")
    ] = 1e-4,
    base_model: BaseModel = None,
    revision: Revision = None,
    token: Token = None,
) -> None:
    """Merge the adapter into its base model and save a plain transformers model (safetensors, sharded when large).

    The merged model is reloaded with plain transformers and its outputs are checked against the adapted model's
    on a probe batch before the folder is put in place.
    """
    import torch

    from .hub import download_adapter, load_pretrained
    from .train.atomic_files import replace_dir_atomic

    folder = download_adapter(adapter, revision=revision, token=token)
    with _progress("loading base model and adapter"):
        model = load_pretrained(folder, base_model=base_model).eval()
    tokenizer = _tokenizer_for(
        folder, base_model or model.peft_config[model.active_adapter].base_model_name_or_path
    )
    batch = _probe_batch(model, tokenizer)
    with torch.no_grad():
        adapted = _probe_output(model, batch)
    merged = model.merge_and_unload()
    auto_class = type(merged)
    report: dict[str, Any] = {}

    def write(tmp: str) -> None:
        merged.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        reloaded = auto_class.from_pretrained(tmp).eval()  # plain transformers: no orthora, no PEFT
        with torch.no_grad():
            difference = float((_probe_output(reloaded, batch) - adapted).abs().max())
        if not difference <= tolerance:
            raise ConfigError(
                f"merged outputs differ from the adapted ones by {difference:.2e} (> --tolerance {tolerance:g}); "
                "nothing was written"
            )
        report["difference"] = difference
        report["files"] = sorted(p.name for p in Path(tmp).iterdir())

    with _progress(f"writing and checking {out}"):
        replace_dir_atomic(out, write)
    shards = [f for f in report["files"] if f.endswith(".safetensors")]
    typer.echo(f"merged model: {out} ({len(shards)} safetensors shard(s): {', '.join(shards)})")
    typer.echo(
        f"probe batch of {batch['input_ids'].shape[0]}: max |merged - adapted| = {report['difference']:.2e} "
        f"(tolerance {tolerance:g}); load it with {auto_class.__name__}.from_pretrained({str(out)!r})"
    )


# ---------------------------------------------------------------------------------------------------- inspect
@app.command(
    epilog=_examples(
        "orthora inspect outputs/quickstart/adapter",
        "orthora inspect you/bert-sst2-orthora --plot rotations.png",
        "orthora inspect ADAPTER --json",
    ),
)
def inspect(
    adapter: Annotated[str, typer.Argument(help="Adapter folder or Hub id (user/name).")],
    plot: Annotated[
        Optional[Path], typer.Option(help="Also draw the per-layer rotation size to this PNG (matplotlib).")
    ] = None,
    energy: Annotated[
        bool,
        typer.Option(help="Compute the hyperspherical energy (cost grows with the layer width squared)."),
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows and the summary as JSON.")] = False,
    base_model: BaseModel = None,
    revision: Revision = None,
    token: Token = None,
) -> None:
    """Show what the adapter changed, per module and for the whole model (orthora.diagnostics).

    Trainable parameters, orthogonality error, distance from the identity, rotation angles, relative weight
    change and hyperspherical energy.
    """
    from .diagnostics import layer_report, model_summary
    from .hub import load_pretrained

    with _progress("loading base model and adapter"):
        model = load_pretrained(adapter, base_model=base_model, revision=revision, token=token)
    rows = layer_report(model, energy=energy)
    summary = model_summary(rows)
    if plot is not None:
        draw_rotation_sizes(rows, plot, title=str(adapter))
    if as_json:
        typer.echo(json.dumps({"rows": rows, "summary": summary}, indent=2))
        return
    _print_report(rows, summary)
    if plot is not None:
        typer.echo(f"plot: {plot}")


def _print_report(rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="orthora inspect", show_lines=False)
    columns = [
        ("module", "module", str),
        ("side", "side", str),
        ("params", "trainable_params", lambda v: f"{v:,}"),
        ("orth. error", "orthogonality_error", lambda v: f"{v:.1e}"),
        ("‖R−I‖_F", "distance_from_identity", lambda v: f"{v:.4f}"),
        ("max angle °", "max_angle", lambda v: f"{v * 57.29577951308232:.2f}"),
        ("ΔW/W", "relative_weight_change", lambda v: f"{v:.4f}"),
        ("energy Δ%", None, None),
    ]
    for title, _, _ in columns:
        table.add_column(title, justify="left" if title in ("module", "side") else "right", no_wrap=True)
    for row in rows:
        cells = []
        for _, key, fmt in columns:
            if key is None:
                base, adapted = row["hyperspherical_energy_base"], row["hyperspherical_energy_adapted"]
                cells.append(f"{100 * (adapted - base) / base:+.3f}" if base and adapted is not None else "–")
            else:
                cells.append("–" if row[key] is None else fmt(row[key]))
        table.add_row(*cells)
    console = Console(width=max(160, Console().width))  # full module names, also in logs
    console.print(table)
    parts = [
        f"{summary['num_rows']} rows ({', '.join(summary['methods'])})",
        f"{summary['trainable_params']:,} params",
    ]
    if summary["max_orthogonality_error"] is not None:
        parts.append(f"max orthogonality error {summary['max_orthogonality_error']:.1e}")
        parts.append(f"mean ‖R−I‖_F {summary['mean_distance_from_identity']:.4f}")
    if summary["relative_weight_change"] is not None:
        parts.append(f"relative weight change {summary['relative_weight_change']:.4f}")
    if summary["hyperspherical_energy_relative_change"] is not None:
        parts.append(f"energy change {100 * summary['hyperspherical_energy_relative_change']:+.3f}%")
    console.print("summary: " + "; ".join(parts))


def draw_rotation_sizes(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """A bar per adapted module and side: its distance from the identity, ``||R - I||_F``."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["distance_from_identity"] is not None]
    if not shown:
        raise ConfigError("nothing to plot: no module of this adapter has a rotation")
    labels = [f"{r['module']} ({r['side']})" for r in shown]
    figure, axis = plt.subplots(figsize=(8, 0.3 * len(shown) + 1.5))
    axis.barh(range(len(shown)), [r["distance_from_identity"] for r in shown], color="#4063d8")
    axis.set_yticks(range(len(shown)), labels, fontsize=7)
    axis.invert_yaxis()
    axis.set_xlabel("distance from the identity ‖R − I‖_F")
    axis.set_title(f"rotation size per layer: {title}", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ------------------------------------------------------------------------------------------------------- push
@app.command(
    epilog=_examples(
        "orthora push outputs/run/adapter you/bert-sst2-orthora",
        "orthora push outputs/quickstart/adapter you/minilm-sentiment --base-model sentence-transformers/all-MiniLM-L6-v2 --private --revision v1",
    ),
)
def push(
    adapter: Annotated[
        Path, typer.Argument(help="Saved adapter folder (adapter_config.json + safetensors).")
    ],
    repo_id: Annotated[str, typer.Argument(help="Hub repository, user/name (created if missing).")],
    private: Annotated[bool, typer.Option(help="Create the repository as private.")] = False,
    revision: Annotated[Optional[str], typer.Option(help="Branch to push to (created if missing).")] = None,
    message: Annotated[Optional[str], typer.Option(help="Commit message.")] = None,
    base_model: Annotated[
        Optional[str],
        typer.Option(
            "--base-model", help="Hub id of the base model, when the adapter was trained on a local copy."
        ),
    ] = None,
    token: Token = None,
) -> None:
    """Push an adapter folder with its orthora model card (and the run's metrics from a results.json beside it)."""
    from .hub import push_adapter_folder

    with _progress(f"pushing {adapter} to {repo_id}"):
        commit = push_adapter_folder(
            adapter,
            repo_id,
            token=token,
            private=private or None,
            revision=revision,
            commit_message=message,
            base_model=base_model,
        )
    typer.echo(f"pushed {adapter} to {repo_id}" + (f" (branch {revision})" if revision else ""))
    typer.echo(f"commit: {commit.commit_url}")


# ------------------------------------------------------------------------------------------------- quickstart
@app.command(
    epilog=_examples(
        "orthora quickstart",
        "orthora quickstart --method lora",
        "orthora quickstart --epochs 1",
    ),
)
def quickstart(
    model: Annotated[
        Optional[str], typer.Option(help="Hub id or folder (default: the local all-MiniLM-L6-v2 package).")
    ] = None,
    output_dir: Annotated[str, typer.Option(help="Where the adapter and results go.")] = "outputs/quickstart",
    method: Annotated[str, typer.Option(help="orthora, or a PEFT baseline such as lora.")] = "orthora",
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs (default 3).")] = None,
) -> None:
    """The README's offline main job: fine-tune all-MiniLM-L6-v2 on the shipped sentiment set, before/after."""
    from .train import quickstart as job

    argv = ["--output_dir", output_dir, "--method", method]
    if model:
        argv += ["--model", model]
    if epochs:
        argv += ["--num_train_epochs", str(epochs)]
    code = job.main(argv)
    if code:
        raise typer.Exit(code)


# ----------------------------------------------------------------------------------------------------- helpers
class _progress:
    """A spinner on stderr while a step without its own progress bar runs (quiet under --verbose logs)."""

    def __init__(self, text: str) -> None:
        from rich.console import Console

        self._status = Console(stderr=True).status(text)

    def __enter__(self) -> None:
        self._status.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._status.__exit__(*exc)


def _tokenizer_for(folder: str, base: str | None):
    """The tokenizer saved beside the adapter (the engine saves it there), else the base model's, else None."""
    from transformers import AutoTokenizer

    for source in (folder, base):
        if not source:
            continue
        try:
            return AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, TypeError):
            continue
    return None


def _probe_batch(model, tokenizer) -> dict:
    """A few sentences (or random token ids without a tokenizer) to compare merged and adapted outputs on."""
    import torch

    if tokenizer is not None:
        texts = ["the film was wonderful .", "a dull and painful story", "where does anna live ?", "ok"]
        return dict(tokenizer(texts, padding=True, return_tensors="pt"))
    vocab = model.get_base_model().config.vocab_size
    return {"input_ids": torch.randint(0, vocab, (4, 12), generator=torch.Generator().manual_seed(0))}


def _probe_output(model, batch: dict):
    inputs = dict(batch)
    if getattr(model.config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = batch["input_ids"]
    output = model(**inputs)
    return output.logits if getattr(output, "logits", None) is not None else output.last_hidden_state


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``orthora`` console script; returns the exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    _options["verbose"] = any(a in ("-v", "--verbose") for a in args[:1])
    try:
        with _library_output(_options["verbose"]):
            app(args=args, prog_name=PROG, standalone_mode=False)
    except click.exceptions.Exit as done:
        return done.exit_code
    except click.ClickException as mistake:
        mistake.show()
        return mistake.exit_code
    except click.exceptions.Abort:
        typer.echo("aborted", err=True)
        return 130
    except USER_ERRORS as err:
        if _options["verbose"]:
            traceback.print_exc()
        report_error(PROG, next((x for x in str(err).splitlines() if x.strip()), type(err).__name__))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
