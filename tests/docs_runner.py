"""Run the code blocks of the documentation, so an example that breaks fails the test suite.

Rules (also stated for readers in docs/usage.md, "How the examples are tested"):

* Every fenced block carries a language tag. ``python`` and ``bash`` blocks are executed, ``yaml`` blocks are parsed
  (and, when they are training configs, validated by ``orthora.train.load_config``); output and listings use
  ``text`` (or ``markdown`` for a shown document) and are not run. An untagged block is an error.
* One page is one notebook: its blocks run in order, the ``python`` blocks share one namespace, and every block
  runs in the same fresh working folder. It holds links to the repository's ``configs/``, ``scripts/``,
  ``orthora/``, ``tests/`` and ``pyproject.toml`` (so ``python scripts/quickstart.py`` works as in a checkout) and
  its own empty ``docs/``, ``outputs/`` and ``benchmarks/results/``.
* ``bash`` blocks run under ``bash -euo pipefail`` with a short prelude of substitutions (``BASH_PRELUDE``), for
  commands that would take minutes to hours:

  - ``pip install`` is not repeated; it checks that every extra it names exists in pyproject.toml;
  - ``python scripts/quickstart.py`` runs one epoch instead of three (tests/test_train_quickstart.py checks the
    full run);
  - ``python scripts/arithmetic_walk.py`` runs the smoke form of its own docstring;
  - ``python -m pytest ...`` is checked, not run (running the suite is CI's own job): every path or node id it
    names must exist and every marker of its ``-m`` expression must be registered in pyproject.toml;
  - benchmark commands (``python -m orthora.bench``, ``python scripts/benchmark.py``, and
    ``python -m orthora.bench.sensitivity``) are parsed by the benchmark's own parser (the probe's own), with every quality method, task and target set resolved, but not run: even their
    ``--dry-run`` forms take minutes here, and tests/test_benchmark.py runs the dry run of every profile.

  So a wrong flag, a removed option or an unknown method still fails. Everything else runs as written.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import tomllib
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
EXECUTED = ("python", "bash")
PARSED = ("yaml",)
SHOWN = ("text", "markdown")
LINKED_FROM_REPO = ("configs", "scripts", "orthora", "tests", "pyproject.toml")
FRESH_FOLDERS = ("docs", "outputs", "benchmarks/results")

_FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")


@dataclass(frozen=True)
class Block:
    """One fenced block: its page, the line of its opening fence, its language tag and its text."""

    page: Path
    line: int
    language: str
    code: str

    @property
    def where(self) -> str:
        return f"{_shown(self.page)}:{self.line}"


def _shown(path: Path) -> Path:
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def blocks(page: Path) -> list[Block]:
    """The top-level fenced blocks of a markdown page (fences inside a longer fence belong to that block)."""
    found, lines, i = [], page.read_text(encoding="utf-8").split("\n"), 0
    while i < len(lines):
        match = _FENCE.match(lines[i].strip()) if lines[i].startswith(("`", "~")) else None
        if match:
            fence, start = match["fence"], i
            i += 1
            while i < len(lines) and not (
                lines[i].startswith(fence) and lines[i].strip() == fence[0] * len(lines[i].strip())
            ):
                i += 1
            if i == len(lines):
                raise ValueError(f"{_shown(page)}:{start + 1}: unclosed code fence")
            language = match["info"].split()[0] if match["info"].split() else ""
            found.append(Block(page, start + 1, language, "\n".join(lines[start + 1 : i])))
        i += 1
    return found


def pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


# Substitutions for bash blocks, as shell functions that shadow the commands for the block (and only there).
BASH_PRELUDE = r"""
pip() {  # installs are not repeated: check that every extra a command names exists in pyproject.toml
  [[ "${1:-}" == install ]] || { command pip "$@"; return; }
  local arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^\.\[(.*)\]$ ]]; then "$DOCS_RUNNER_PYTHON" "$DOCS_RUNNER" check-extras "${BASH_REMATCH[1]}"; fi
  done
}
python() {  # long runs take their smoke form (the substitutions are appended, so they override the page's values)
  if [[ "${1:-}" == scripts/quickstart.py ]]; then
    command python "$@" --num_train_epochs 1
  elif [[ "${1:-}" == scripts/arithmetic_walk.py ]]; then  # the smoke run of the script's own docstring
    command python "$@" --train-samples 32 --epochs 1 --eval-samples 64 --points 3
  elif [[ "${1:-}" == -m && "${2:-}" == pytest ]]; then  # the suite itself is what CI runs: check what it names
    shift 2
    "$DOCS_RUNNER_PYTHON" "$DOCS_RUNNER" check-pytest "$@"
  elif [[ "${1:-}" == -m && "${2:-}" == orthora.bench.sensitivity ]]; then
    # ten minutes on the shared data: recorded, then parsed by the probe's own parser (check_benchmark_command)
    shift 2
    printf '@sensitivity\x1f%s' "$(printf '%s\x1f' "$@")" >> "$DOCS_RUNNER_BENCH_LOG"
    printf '\x1e' >> "$DOCS_RUNNER_BENCH_LOG"
  elif [[ "${1:-}" == scripts/benchmark.py || ( "${1:-}" == -m && "${2:-}" == orthora.bench ) ]]; then
    # hours of measurement: recorded here, then parsed by the benchmark's own parser after the block
    # (check_benchmark_command); the dry run of every profile is tested in tests/test_benchmark.py
    [[ "$1" == -m ]] && shift
    shift
    printf '%s\x1f' "$@" >> "$DOCS_RUNNER_BENCH_LOG"
    printf '\x1e' >> "$DOCS_RUNNER_BENCH_LOG"
  else
    command python "$@"
  fi
}
export -f pip python
"""


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def check_extras(names: str) -> None:
    """``pip install -e ".[a,b]"`` in a page: every named extra must exist."""
    extras = _pyproject()["project"]["optional-dependencies"]
    missing = [name for name in names.split(",") if name.strip() not in extras]
    if missing:
        raise SystemExit(f"pyproject.toml has no extra {missing}; extras: {', '.join(extras)}")


_PYTEST_OPTIONS_WITH_VALUE = {"-m", "-k", "-p", "-n", "--durations", "--maxfail", "--tb", "-o", "--dist"}
_MARKER_WORDS = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_pytest(argv: list[str]) -> None:
    """A docs page's ``python -m pytest ARGS``: the files and tests it names exist, its markers are registered.

    Collecting would also catch this, but it imports the whole suite for every command (tens of seconds each).
    """
    pytest_options = _pyproject()["tool"]["pytest"]["ini_options"]
    registered = {line.split(":")[0].strip() for line in pytest_options["markers"]}
    problems, args = [], iter(argv)
    for arg in args:
        if arg in _PYTEST_OPTIONS_WITH_VALUE:
            value = next(args, "")
            if arg == "-m":
                unknown = set(_MARKER_WORDS.findall(value)) - {"and", "or", "not"} - registered
                problems += [
                    f"marker {name!r} is not registered in pyproject.toml" for name in sorted(unknown)
                ]
        elif not arg.startswith("-"):
            path, _, test = arg.partition("::")
            name = test.split("::")[-1].split("[")[0]
            if not Path(path).exists():
                problems.append(f"no test file or folder {path!r}")
            elif name and not re.search(
                rf"^\s*(def|class) {re.escape(name)}\b", Path(path).read_text(), re.M
            ):
                problems.append(f"{path} has no test {test!r}")
    if problems:
        raise SystemExit("pytest " + " ".join(argv) + ": " + "; ".join(problems))


def make_workdir(root: Path) -> Path:
    """A fresh working folder laid out like a checkout (see the module docstring)."""
    root.mkdir(parents=True, exist_ok=True)
    for name in LINKED_FROM_REPO:
        (root / name).symlink_to(REPO / name, target_is_directory=(REPO / name).is_dir())
    for name in FRESH_FOLDERS:
        (root / name).mkdir(parents=True, exist_ok=True)
    return root


def bash_env(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        DOCS_RUNNER=str(Path(__file__).resolve()),
        DOCS_RUNNER_PYTHON=sys.executable,
        HF_HUB_OFFLINE=env.get("HF_HUB_OFFLINE", "1"),
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")])),
    )
    return env


def run_bash(block: Block, workdir: Path, timeout: float = 300) -> str:
    """Run a bash block, then check the benchmark commands it recorded; AssertionError with the output on failure."""
    script = BASH_PRELUDE + "\nset -euo pipefail\n" + block.code + "\n"
    log = workdir / ".benchmark-commands"
    log.unlink(missing_ok=True)
    env = bash_env(workdir) | {"DOCS_RUNNER_BENCH_LOG": str(log)}
    done = subprocess.run(
        ["bash", "-c", script], cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout
    )
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise AssertionError(f"{block.where}: bash block failed (exit {done.returncode}):\n{output[-4000:]}")
    if log.exists():
        for record in filter(None, log.read_text(encoding="utf-8").split("\x1e")):
            check_benchmark_command(block, record.split("\x1f")[:-1])
    return output


def check_benchmark_command(block: Block, argv: list[str]) -> None:
    """Parse a benchmark command with the benchmark's parser and resolve its quality methods, tasks and targets."""
    import contextlib
    import io

    from orthora.bench import quality, sensitivity
    from orthora.bench.cli import build_parser
    from orthora.bench.quality_methods import resolve_method
    from orthora.bench.quality_runs import TARGET_SETS, TASK_METRICS

    errors = io.StringIO()
    if argv[:1] == ["@sensitivity"]:
        try:
            with contextlib.redirect_stderr(errors):
                sensitivity.build_parser().parse_args(argv[1:])
        except SystemExit as stop:
            raise AssertionError(
                f"{block.where}: sensitivity command {' '.join(argv[1:])!r}: {errors.getvalue()}"
            ) from stop
        return
    try:
        with contextlib.redirect_stderr(errors):
            args = build_parser().parse_args(argv)
    except SystemExit as stop:
        raise AssertionError(
            f"{block.where}: benchmark command {' '.join(argv)!r}: {errors.getvalue()}"
        ) from stop
    if args.profile != "quality":
        return
    tasks = [task for task in args.tasks.split(",") if task]
    target_sets = [name for name in args.target_sets.split(",") if name]
    unknown = [t for t in tasks if t not in TASK_METRICS] + [s for s in target_sets if s not in TARGET_SETS]
    if unknown:
        raise AssertionError(f"{block.where}: unknown task or target set {unknown} in {' '.join(argv)!r}")
    for name in quality._split_top_level(args.quality_methods):  # commas inside [...] belong to a variant
        for target_set in target_sets:
            try:
                resolve_method(name.strip(), TARGET_SETS[target_set])
            except ValueError as error:
                raise AssertionError(f"{block.where}: {error}") from error


def run_python(block: Block, namespace: dict) -> None:
    """Execute a python block in the page's namespace, with tracebacks pointing at the page's own lines."""
    code = compile("\n" * block.line + block.code, str(block.page), "exec")
    exec(code, namespace)  # noqa: S102 - running the documentation's examples is the point


def check_yaml(block: Block, workdir: Path) -> None:
    """Parse a yaml block; a training config (it names a task) must also load through the training config."""
    data = yaml.safe_load(block.code)
    if isinstance(data, dict) and "task" in data:
        from orthora.train import load_config

        path = workdir / f"block_{block.line}.yaml"
        path.write_text(block.code, encoding="utf-8")
        load_config(str(path))


def run_page(page: Path, workdir: Path) -> Iterator[Block]:
    """Run every block of a page in order, in ``workdir`` (the caller's current folder must be ``workdir``)."""
    namespace: dict = {"__name__": f"docs.{page.stem}"}
    for block in blocks(page):
        if block.language == "python":
            run_python(block, namespace)
        elif block.language == "bash":
            run_bash(block, workdir)
        elif block.language in PARSED:
            check_yaml(block, workdir)
        elif block.language not in SHOWN:
            raise AssertionError(
                f"{block.where}: code block language {block.language or '(none)'!r}; use one of "
                f"{', '.join(EXECUTED + PARSED + SHOWN)} (text for output that is not run)"
            )
        yield block


if __name__ == "__main__":  # used by the bash prelude
    if sys.argv[1:2] == ["check-extras"]:
        check_extras(sys.argv[2])
    elif sys.argv[1:2] == ["check-pytest"]:
        check_pytest(sys.argv[2:])
    else:
        raise SystemExit("usage: docs_runner.py check-extras NAMES | check-pytest PYTEST_ARGS")
