"""``orthora-finetune CONFIG.yaml [--key value ...]``: the command-line face of `orthora.train.run`."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

import yaml
from transformers import HfArgumentParser

from .config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    coerce,
    load_yaml,
    parse_value,
    report_error,
    unknown_key_error,
)

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


class TrainArgumentParser(HfArgumentParser):
    """transformers' HfArgumentParser over `TrainConfig`, made to override a YAML file.

    Options that are not given stay absent (so YAML values survive), each value goes through TrainConfig's own
    coercion (one rule for YAML, command line and Python), prefixes are not guessed (``--learning_rat`` is an
    unknown key, not ``--learning_rate``), and argparse errors become `ConfigError` lines instead of exits.
    """

    def __init__(self) -> None:
        super().__init__(TrainConfig, prog=PROG, allow_abbrev=False, add_help=False)
        hints = typing.get_type_hints(TrainConfig)
        for action in self._actions:
            if action.dest in hints:
                action.default = argparse.SUPPRESS
                action.type = _converter(action.dest, hints[action.dest])

    @staticmethod
    def _parse_dataclass_field(parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:
        field = copy.copy(field)  # argparse knows "help" but not our "tasks" scope tag
        field.metadata = types.MappingProxyType({"help": field.metadata.get("help", "")})
        HfArgumentParser._parse_dataclass_field(parser, field)

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


def _converter(key: str, annotation: Any) -> Callable[[str], Any]:
    text_field = annotation is str or annotation == typing.Optional[str]

    def convert(text: str) -> Any:
        # String keys take the text verbatim ('translate: ' must not become a YAML mapping)
        verbatim = text_field and text.lower() not in ("null", "none", "~")
        try:
            return coerce(key, text if verbatim else parse_value(text), annotation)
        except (ConfigError, yaml.YAMLError) as err:
            raise argparse.ArgumentTypeError(str(err).splitlines()[0]) from None

    convert.__name__ = key
    return convert


def parse_args(argv: Sequence[str]) -> TrainConfig:
    """CONFIG.yaml (optional, first) then ``--key value`` / ``--key=value`` overrides; a bare ``--flag`` is true.

    ``--adapter.block_size 16`` (and ``--extra_validation_files.NAME PATH``) set one entry of a mapping.
    """
    argv = list(argv)
    values: dict = load_yaml(argv.pop(0)) if argv and not argv[0].startswith("-") else {}
    flat, nested = _split_nested(argv)
    given, unknown = TrainArgumentParser().parse_known_args(flat)
    if unknown:
        token = next((t for t in unknown if t.startswith("--")), None)
        if token is None:
            raise ConfigError(f"unexpected argument {unknown[0]!r}; options look like --key value")
        raise unknown_key_error(token[2:].partition("=")[0].replace("-", "_"))
    return TrainConfig.from_dict(apply_overrides(values, {**vars(given), **nested}))


def _split_nested(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Take ``--parent.child value`` pairs out of ``argv`` (argparse has no options for mapping entries)."""
    flat: list[str] = []
    nested: dict[str, Any] = {}
    tokens = iter(argv)
    for token in tokens:
        key, eq, text = token[2:].partition("=")
        if not token.startswith("--") or "." not in key:
            flat.append(token)
            continue
        if not eq:
            text = next(tokens, None)
            if text is None:
                raise ConfigError(f"option --{key} needs a value")
        nested[key] = parse_value(text)
    return flat, nested


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(usage())
        return 0
    from .engine import RESULTS_FILE, run
    from .nonfinite import TrainingDiverged

    try:
        config = parse_args(argv)
        results = run(config)
    except ConfigError as err:
        report_error(PROG, str(err))
        return 2
    except TrainingDiverged as err:
        report_error(PROG, str(err))
        return 1
    metrics = {k: v for k, v in results["metrics"].items() if k not in ("step", "epoch")}
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"final metrics: {metrics}")
        print(f"adapter: {results['adapter_dir']}; results: {os.path.join(config.output_dir, RESULTS_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
