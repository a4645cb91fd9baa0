"""The benchmark package (orthora.bench): budget matching, the cost code path, and a dry run of every profile.

No timing is asserted (timings are never pass/fail); numbers must only be present, finite and positive.
"""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch
from torch import nn

from orthora.bench import budgets, cli, cost, models, report, scaling
from orthora.rotations import PARAMETRIZATIONS

MINILM_LAYER = [(384, 384)] * 4 + [(384, 1536), (1536, 384)]  # q, k, v, attention out, intermediate, output


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


class Linears(nn.Module):
    """One ``nn.Linear`` per ``(d_in, d_out)``, named l0, l1, ...: a model with exactly these targeted widths."""

    def __init__(self, widths: list[tuple[int, int]]) -> None:
        super().__init__()
        self.names = [f"l{i}" for i in range(len(widths))]
        for name, (d_in, d_out) in zip(self.names, widths, strict=True):
            self.add_module(name, nn.Linear(d_in, d_out))


def _instantiated(method: budgets.MethodSpec, widths: list[tuple[int, int]]) -> int:
    model = Linears(widths)
    wrapped = peft.get_peft_model(model, budgets.peft_config(method, model.names))
    return sum(p.numel() for p in wrapped.parameters() if p.requires_grad)


def test_every_matched_method_is_within_5_percent_of_lora_r8_on_minilm():
    """At MiniLM's real shapes and block 32 the budget is LoRA r = 8's, and every method lands within ±5% of it,
    counted on instantiated layers; except where no valid config can: BOFT (power-of-two blocks plus a per-layer
    scale) and side="both", whose one block size b' on both sides gives (b'-1)/2 per width, i.e. 15/16 of the budget
    at b' = 16, the closest block size that divides the widths."""
    widths = MINILM_LAYER * 6
    methods = {m.name: m for m in budgets.matched_methods(widths, 32, "all")}
    assert "lora-r8" in methods and "hra-r16" in methods
    lora = budgets.trainable_params(methods["lora-r8"], widths)
    assert lora == 8 * sum(i + o for i, o in widths)
    for name, method in methods.items():
        if method.kind == "boft" or name.endswith("-both"):
            continue
        count = budgets.trainable_params(method, widths)
        assert abs(count / lora - 1) <= 0.05, (name, count, lora)
    both = methods["orthora-cayley-both"]
    assert both.kwargs["block_size"] == 16
    assert budgets.trainable_params(both, widths) / lora == pytest.approx(15 / 16)
    for block in (8, 32):  # the neighbouring block sizes are further off
        other = budgets.orthora_budget(widths, block, side="both")
        assert abs(other / lora - 1) > 1 / 16
    assert methods["orthora-householder-output"].kwargs["num_reflections"] == 16


def test_orthora_budget_comes_from_the_parametrization_table():
    widths = [(64, 128), (128, 64)]
    for name, spec in PARAMETRIZATIONS.items():
        for side, rotated in (("output", 192), ("input", 192), ("both", 384)):
            expected = rotated // 16 * spec.num_params(16, num_reflections=4)
            assert budgets.orthora_budget(widths, 16, name, side, num_reflections=4) == expected
    rotations_only = dict(parametrization="exp", side="both", block_size=16, magnitude=False)
    method = budgets.MethodSpec("o", "orthora", rotations_only)
    assert budgets.trainable_params(method, widths) == budgets.orthora_budget(widths, 16, "exp", "both")


@pytest.mark.parametrize("kind", ["lora", "oft", "hra", "boft", "orthora"])
def test_counted_budgets_equal_what_peft_instantiates(kind):
    """The per-shape count (one instantiated layer per distinct shape) equals a whole model's trainable count."""
    widths = [(64, 64), (64, 64), (64, 128), (128, 64)]
    chosen = [m for m in budgets.matched_methods(widths, 8, "all") if m.kind == kind]
    assert chosen, kind
    for method in chosen:
        assert budgets.trainable_params(method, widths) == _instantiated(method, widths), method.name


def test_boft_budget_is_the_closest_valid_instantiated_config():
    """BOFT's rule counts what PEFT really builds (full b'xb' blocks + an output scale), not a formula."""
    widths = [(64, 64), (64, 64), (64, 128)]
    for block, factors in ((8, 1), (4, 2)):
        method = budgets.MethodSpec("b", "boft", dict(boft_block_size=block, boft_n_butterfly_factor=factors))
        assert budgets.boft_trainable_params(widths, block, factors) == _instantiated(method, widths)
    boft = next(m for m in budgets.matched_methods(widths, 8, "all") if m.kind == "boft")
    chosen = budgets.trainable_params(boft, widths)
    budget = budgets.orthora_budget(widths, 8)
    for b in (2, 4, 8, 16, 32):  # no valid single-factor config is closer to the budget
        other = budgets.boft_trainable_params(widths, b, 1)
        assert other is None or abs(chosen - budget) <= abs(other - budget)


def test_method_sets_and_unknown_set():
    widths = [(64, 64)] * 2
    llm = [m.name for m in budgets.matched_methods(widths, 8, "llm")]
    assert llm[0].startswith("lora-r") and {"oft-cayley", "oft-cayley_neumann"} <= set(llm)
    assert {f"orthora-{p}-{s}" for p in budgets.EXACT for s in ("output", "input")} <= set(llm)
    assert set(budgets.EXACT) == {n for n, spec in PARAMETRIZATIONS.items() if spec.exact}
    with pytest.raises(ValueError, match="unknown method set 'nope'; valid: all, small"):
        budgets.matched_methods(widths, 8, "nope")


@pytest.mark.slow  # one subprocess per method (~45 s on 2 busy cores)
def test_cost_rows_subprocess_workers(tmp_path):
    """Two methods in two worker subprocesses, interleaved: every column measured, finite and positive."""
    spec = models.ModelSpec("bert-tiny", batch=2, seq=16)
    widths = budgets.targeted_widths(models.build_model(spec), models.target_modules(spec))
    methods = budgets.matched_methods(widths, 8, "pair")
    results = cost.run_interleaved(spec, methods, rounds=2, warmup=1, inference_reps=1, log=lambda *_: None)
    rows = cost.summarize(results, spec)
    assert [r["method"] for r in rows] == [m.name for m in methods]
    for row in rows:
        assert "error" not in row, row
        for key in ("step_s", "tokens_per_s", "trainable_params", "adapter_kb", "infer_merged_ratio",
                    "infer_unmerged_ratio", "step_vs_lora", "params_vs_lora"):  # fmt: skip
            assert _finite_positive(row[key]), (row["method"], key, row[key])
        assert row["peak_mem_mb"] is None or math.isfinite(row["peak_mem_mb"])
    assert rows[0]["step_vs_lora"] == 1.0
    rep = {"profile": "test", "machine": report.machine_info(), "model": vars(spec), "rows": rows}
    md = report.render_cost(rep, "pytest")
    assert "| lora-r" in md and "| orthora-cayley-output" in md
    jpath, mpath = report.write_outputs(report.slim(rep), md, "smoke", tmp_path)
    assert json.loads(jpath.read_text())["rows"][1]["method"] == "orthora-cayley-output"
    assert mpath.read_text().startswith("## test")


@pytest.mark.parametrize("profile", ["cpu-small", "cpu", "gpu"])
def test_cost_profile_dry_run_in_process(profile):
    """Each cost profile's code path on a tiny model on CPU (gpu: the Llama decoder, bf16, LM loss)."""
    rep = cost.run_cost(
        profile, dry_run=True, methods="pair", in_process=True, profile_ops=False, log=lambda *_: None
    )
    assert rep["model"]["kind"] == ("llama" if profile == "gpu" else "bert-tiny")
    rows = {r["method"]: r for r in rep["rows"]}
    assert set(rows) == {"lora-r8", "orthora-cayley-output"}
    for row in rows.values():
        assert "error" not in row, row
        assert _finite_positive(row["step_s"]) and _finite_positive(row["trainable_params"])
        assert _finite_positive(row["infer_merged_ratio"])


@pytest.mark.slow  # 9 methods x 2 variants on a tiny decoder (~25 s)
def test_llm_cpu_dry_run_every_exact_map_both_sides_with_and_without_checkpointing():
    """The llm-cpu path (Llama decoder, bf16 weights under bf16 autocast, gradient checkpointing on and off) for
    LoRA, both OFTs and orthora's exact maps on each side: every method trains, merges and is timed."""
    rep = cost.run_llm_cpu(dry_run=True, in_process=True, log=lambda *_: None)
    assert list(rep["variants"]) == ["checkpointing-on", "checkpointing-off"]
    for name, variant in rep["variants"].items():
        model = variant["model"]
        assert (model["kind"], model["dtype"], model["autocast"]) == ("llama", "bfloat16", "bfloat16")
        assert model["gradient_checkpointing"] is (name == "checkpointing-on")
        assert (model["batch"], model["seq"]) == (1, 64)
        assert variant["layers"]["used"] == variant["layers"]["full"] == 2
        rows = {r["method"]: r for r in variant["rows"]}
        assert len(rows) == 9 and {"oft-cayley", "oft-cayley_neumann"} <= set(rows)
        for row in rows.values():
            assert "error" not in row, row
            for key in ("step_vs_lora", "infer_merged_ratio", "params_vs_lora"):
                assert _finite_positive(row[key]), (name, row["method"], key)
    md = cost.llm_cpu_markdown(rep, "pytest")
    assert "checkpointing-on, 2 of 2 decoder layers" in md and "gradient checkpointing" in md
    assert "(MISSED, > 0.9)" in md or "(met, ≤ 0.9)" in md  # issue 10's step target


def test_llm_layer_count_fits_memory():
    spec = models.ModelSpec("llama", batch=1, seq=2048, dtype="bfloat16", gradient_checkpointing=True)
    assert cost.llm_layer_count(spec, workers=9, available_bytes=2**40) == 22
    fewer = cost.llm_layer_count(spec, workers=9, available_bytes=32 * 2**30)
    assert 1 <= fewer < 22
    spec.gradient_checkpointing = False  # more activations per layer: never more layers
    assert cost.llm_layer_count(spec, workers=9, available_bytes=32 * 2**30) <= fewer


def test_scaling_dry_run_covers_every_knob_and_side():
    rep = scaling.run_scaling(quick=True, rounds=1, in_process=True, log=lambda *_: None)
    points = {(r["knob"], r["value"]) for r in rep["rows"]}
    assert points == {(p["knob"], p["value"]) for p in scaling.sweep_points(quick=True)}
    sides = {r["side"] for r in rep["rows"] if r["kind"] == "orthora" and r["knob"] == "side"}
    assert sides == {"output", "input", "both"}
    assert all("error" not in r and _finite_positive(r["step_s"]) for r in rep["rows"])
    table = report.scaling_table(rep["rows"])
    assert table.count("\n") == 1 + len(points) and "| side=both | 64 | 8 | 16 | both |" in table


def test_cli_micro_dry_run_writes_results(tmp_path, capsys):
    assert cli.main(["--profile", "micro", "--dry-run", "--out-dir", str(tmp_path)]) == 0
    written = sorted(p.suffix for p in tmp_path.iterdir())
    assert written == [".json", ".md"]
    saved = json.loads(next(tmp_path.glob("micro-*.json")).read_text())
    assert saved["command"] == "python -m orthora.bench --profile micro --dry-run --out-dir " + str(tmp_path)
    assert all(
        _finite_positive(v["median_ms"]) for row in saved["rows"] for v in row.values() if isinstance(v, dict)
    )
    out = capsys.readouterr().out
    assert "| rotation d=64 tokens=32 |" in out
    # the A/B rows of the core's speed paths: batched construction, exp's backward, factored Householder
    cases = {row["case"]: row for row in saved["rows"]}
    assert set(cases["train step, 2 layers d=64 tokens=16, cayley b=32"]) == {"case", "batched", "per_layer"}
    assert {"exp_own_backward", "torch_matrix_exp_backward"} < set(cases["exp blocks fwd+bwd, 128x(8x8)"])
    assert {"factored", "dense"} < set(cases["householder d=64 b=16 r=2 tokens=16"])


def test_cli_rejects_unknown_profile(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--profile", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_cpu_worker_measures_rss_not_cuda():
    """A CPU worker never touches CUDA state (the memory column is the RSS growth, not CUDA's allocator)."""
    from orthora.bench.workers import Worker

    worker = Worker(
        models.ModelSpec("mlp", batch=1, seq=8, width=16),
        budgets.matched_methods([(16, 16)] * 2, 8, "pair")[1],
    )
    assert not worker.cuda
    worker.steps(1)
    assert worker.peak_memory()["mem_kind"] in ("rss_hwm_growth", "unavailable")
    assert torch.isfinite(worker.loss(worker.model))


def test_targets_check_reads_exactness_from_the_resolved_config():
    """The default row names no parametrization; it is exact Cayley and must be judged against the targets."""
    row = dict(kind="orthora", step_vs_lora=0.98, mem_vs_lora=0.97, infer_merged_ratio=1.01)
    default, approximate = report.targets_check(
        [
            {**row, "method": "orthora", "config": {}},
            {**row, "method": "neumann", "config": {"parametrization": "cayley_neumann"}},
        ]
    )
    assert default.startswith("- orthora: step 0.98× LoRA (met")
    assert approximate.startswith("- neumann (approximate, not a target row)")
