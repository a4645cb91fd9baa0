"""``orthora-finetune CONFIG.yaml [--key value ...]``: the command-line face of `orthora.train.run`."""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from collections.abc import Sequence

from .config import ConfigError, TrainConfig, apply_overrides, load_yaml, parse_value

PROG = "orthora-finetune"


def usage() -> str:
    lines = [
        f"usage: {PROG} [CONFIG.yaml] [--key value ...]",
        "",
        "Fine-tune with orthora (or a PEFT method) as CONFIG.yaml says; any key can be set or overridden on the",
        "command line, e.g. --learning_rate 3e-4 --adapter.block_size 16 --adapter '{block_size: 16}'.",
        "Under several processes: accelerate launch scripts/finetune.py CONFIG.yaml ...",
        "",
        "keys:",
    ]
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        tasks = f.metadata.get("tasks")
        scope = f" [{', '.join(tasks)}]" if tasks else ""
        hint = hints[f.name]
        type_name = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
        lines.append(f"  --{f.name} ({type_name}){scope}: {f.metadata.get('help', '')}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> TrainConfig:
    """CONFIG.yaml (optional, first) then ``--key value`` / ``--key=value`` pairs; a bare ``--flag`` means true."""
    argv = list(argv)
    values: dict = {}
    if argv and not argv[0].startswith("--"):
        values = load_yaml(argv.pop(0))
    overrides: dict = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected argument {token!r}; options look like --key value")
        key, eq, text = token[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                text = argv[i + 1]
                i += 1
            else:
                text = "true"
        key = key.replace("-", "_") if "." not in key else key
        overrides[key] = (
            text if _is_text_field(key) and text.lower() not in ("null", "none", "~") else parse_value(text)
        )
        i += 1
    return TrainConfig.from_dict(apply_overrides(values, overrides))


def _is_text_field(key: str) -> bool:
    """String-typed keys take the command-line text verbatim ('translate: ' must not become a YAML mapping)."""
    annotation = typing.get_type_hints(TrainConfig).get(key)
    return annotation is str or annotation == typing.Optional[str]


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(usage())
        return 0
    from .engine import RESULTS_FILE, run

    try:
        config = parse_args(argv)
        results = run(config)
    except ConfigError as err:
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    metrics = {k: v for k, v in results["metrics"].items() if k not in ("step", "epoch")}
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"final metrics: {metrics}")
        print(f"adapter: {results['adapter_dir']}; results: {os.path.join(config.output_dir, RESULTS_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
