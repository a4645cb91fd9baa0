"""The documentation cannot rot: the site builds with ``mkdocs build --strict`` (broken links, anchors and pages fail),
every code block in docs/ runs (tests/docs_runner.py says how), the index figure's script runs, and no page
points at a path outside the repository."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import docs_runner
import pytest
from conftest import HUB_TOKEN
from docs_runner import DOCS, REPO

# Pages whose blocks train or evaluate a real model for more than a few seconds (still run in CI).
# Pages whose examples push to and pull from the Hub (user alice of the fake Hub).
HUB_PAGES = {"usage.md", "sharing.md"}
SLOW_PAGES = {"training.md", "sharing.md", "arithmetic.md", "usage.md", "benchmarks.md"}


def test_mkdocs_build_is_strict_clean(tmp_path):
    """Broken links, missing anchors, pages missing from the nav or nav entries missing from docs/ fail here."""
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "method" / "index.html").is_file()


def test_every_code_block_is_tagged_with_a_known_language():
    """An untagged block would be neither run nor marked as output; every block must say which it is."""
    known = docs_runner.EXECUTED + docs_runner.PARSED + docs_runner.SHOWN
    bad = [
        f"{b.where} {b.language or '(none)'}"
        for p in docs_runner.pages()
        for b in docs_runner.blocks(p)
        if b.language not in known
    ]
    assert not bad, "untagged or unknown code blocks: " + "; ".join(bad)


def test_the_runner_sees_every_page_and_the_executed_blocks():
    found = {p.name for p in docs_runner.pages()}
    assert {"index.md", "method.md", "usage.md", "choosing.md", "benchmarks.md"} <= found
    executed = [
        b for p in docs_runner.pages() for b in docs_runner.blocks(p) if b.language in docs_runner.EXECUTED
    ]
    assert len(executed) >= 20


def test_block_parser_keeps_nested_fences_inside_the_outer_block(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("````markdown\n```bash\necho hi\n```\n````\n\n```python\nx = 1\n```\n", encoding="utf-8")
    found = docs_runner.blocks(page)
    assert [(b.line, b.language, b.code) for b in found] == [
        (1, "markdown", "```bash\necho hi\n```"),
        (7, "python", "x = 1"),
    ]


def test_a_failing_bash_block_fails_with_its_page_and_line(tmp_path):
    block = docs_runner.Block(DOCS / "x.md", 7, "bash", "orthora-finetune --no-such-option")
    with pytest.raises(AssertionError, match=r"docs/x.md:7: bash block failed"):
        docs_runner.run_bash(block, docs_runner.make_workdir(tmp_path))


def test_bash_prelude_checks_benchmark_commands_without_running_them(tmp_path):
    """Benchmark lines are parsed by the benchmark's own parser (hours of work are not run), so a removed flag or
    an unknown quality method still fails; pip only checks that the extras it names exist."""
    workdir = docs_runner.make_workdir(tmp_path)
    good = (
        "python scripts/benchmark.py --profile scaling\n"
        "python -m orthora.bench.sensitivity --sts-pairs 500 --out x.json\n"
        'python -m orthora.bench --profile quality --quality-methods "lora,orthora[side=input,block_size=16]" --render\n'
        'pip install -e ".[dev]"\n'
        'python -m pytest -q tests/test_docs.py::test_index_figure_script_runs tests/test_train_*.py -m "not slow"\n'
        "echo done\n"
    )
    assert "done" in docs_runner.run_bash(docs_runner.Block(DOCS / "x.md", 1, "bash", good), workdir)
    for bad, message in (
        ("python -m orthora.bench --profile cpu --no-such-flag", "no-such-flag"),
        ("python scripts/benchmark.py --profile nonsense", "nonsense"),
        ("python -m orthora.bench --profile quality --quality-methods bogus", "bogus"),
        ("python -m orthora.bench --profile quality --tasks sst2,imdb", "imdb"),
        ('pip install -e ".[nonexistent]"', "no extra"),
        ("python -m orthora.bench.sensitivity --out x.json --theta 0.1", "theta"),
        ("python -m pytest tests/test_no_such_file.py", "no test file"),
        ("python -m pytest tests/test_docs.py::test_no_such_test", "has no test"),
        ('python -m pytest tests -m "not sloww"', "sloww"),
    ):
        with pytest.raises(AssertionError, match=message):
            docs_runner.run_bash(docs_runner.Block(DOCS / "x.md", 1, "bash", bad), workdir)


def test_yaml_training_config_blocks_are_validated(tmp_path):
    good = docs_runner.Block(
        DOCS / "x.md", 1, "yaml", "task: glue\ntask_name: sst2\nmodel_name_or_path: m\nlearning_rate: 1e-3\n"
    )
    docs_runner.check_yaml(good, tmp_path)
    bad = docs_runner.Block(
        DOCS / "x.md", 1, "yaml", "task: glue\ntask_name: sst2\nmodel_name_or_path: m\nlerning_rate: 1e-3\n"
    )
    with pytest.raises(Exception, match="lerning_rate"):
        docs_runner.check_yaml(bad, tmp_path)


# Paths that exist only on someone's machine: the shared data is named through --data-dir / ORTHORA_DATA_DIR.
_OUTSIDE = re.compile(r"(/work/|\.\./shared|/home/|/Users/|/root/|/opt/|site-packages|~/|[A-Z]:\\\\)")


def test_no_page_mentions_a_path_outside_the_repository():
    offenders = []
    for path in [*sorted(DOCS.glob("*.md")), REPO / "README.md", REPO / "mkdocs.yml"]:
        for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
            if _OUTSIDE.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:120]}")
    assert not offenders, "paths outside the repository:\n" + "\n".join(offenders)


def test_index_figure_script_runs(tmp_path):
    """scripts/docs_figures.py draws the index page's picture from library code; it must keep working."""
    done = subprocess.run(
        [sys.executable, "scripts/docs_figures.py", "--out-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "block_rotation.png").stat().st_size > 10_000
    assert (DOCS / "block_rotation.png").is_file()  # the committed copy the index page shows


def _page_params():
    for page in docs_runner.pages():
        marks = [pytest.mark.slow] if page.name in SLOW_PAGES else []
        yield pytest.param(page, id=page.name, marks=marks)


@pytest.mark.parametrize("page", list(_page_params()))
def test_page_code_blocks_run(page, tmp_path, monkeypatch, request):
    """Every python block (one namespace per page, in order) and bash block of the page runs; yaml parses."""
    workdir = docs_runner.make_workdir(tmp_path / "work")
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    if page.name in HUB_PAGES:  # their Hub examples run against the loopback Hub of tests/hub_server.py
        request.getfixturevalue("fake_hub")
        monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    list(docs_runner.run_page(page, workdir))


def test_rotation_effect_keeps_exactly_the_geometry_of_its_side():
    """The index figure's claim, on random weights: output side keeps token angles, input side neuron angles."""
    import torch

    from orthora.explain import rotation_effect

    torch.manual_seed(0)
    weight, bias, inputs = torch.randn(64, 96), torch.randn(64), torch.randn(40, 96)
    out_side, in_side, additive = rotation_effect(weight, bias, inputs, block_size=16, angle=0.8)
    assert out_side.token_geometry_error < 1e-12 < 1e-2 < out_side.neuron_geometry_error
    assert in_side.neuron_geometry_error < 1e-12 < 1e-2 < in_side.token_geometry_error
    assert min(additive.token_geometry_error, additive.neuron_geometry_error) > 1e-2
    assert abs(out_side.weight_change - additive.weight_change) < 1e-9  # the same size of change
