"""The benchmark package (orthora.bench): budgets, and the cost code path on tiny random models.

No timing is asserted (timings are never pass/fail); numbers must only be present, finite and positive.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

from orthora.bench import budgets, cost, models, report

bench = SimpleNamespace(
    **{k: getattr(m, k) for m in (budgets, cost, models, report) for k in dir(m) if not k.startswith("__")}
)


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_matched_budgets():
    widths = [(384, 384)] * 4 + [(384, 1536), (1536, 384)]  # one MiniLM layer
    methods = {m.name: m for m in bench.matched_methods(widths * 6, 32, "all")}
    assert {"lora-r8", "orthora-cayley-output", "oft-cayley", "oft-cayley_neumann", "hra-r16"} <= set(methods)
    assert any(n.startswith("boft-") for n in methods)
    assert methods["orthora-cayley-both"].kwargs["block_size"] == 16
    assert methods["orthora-householder-output"].kwargs["num_reflections"] % 2 == 0


def test_cost_rows_subprocess_workers(tmp_path):
    """Two methods in two worker subprocesses, interleaved: every column measured, finite and positive."""
    spec = bench.ModelSpec("bert-tiny", batch=2, seq=16)
    widths = bench.targeted_widths(bench.build_model(spec), bench.target_modules(spec))
    methods = bench.matched_methods(widths, 8, "pair")
    results = bench.run_interleaved(spec, methods, rounds=2, warmup=1, inference_reps=1, log=lambda *_: None)
    rows = bench.summarize(results, spec)
    assert [r["method"] for r in rows] == [m.name for m in methods]
    for row in rows:
        assert "error" not in row, row
        for key in (
            "step_s",
            "tokens_per_s",
            "trainable_params",
            "adapter_kb",
            "infer_merged_ratio",
            "infer_unmerged_ratio",
            "step_vs_lora",
            "params_vs_lora",
        ):
            assert _finite_positive(row[key]), (row["method"], key, row[key])
        assert row["peak_mem_mb"] is None or math.isfinite(row["peak_mem_mb"])
    assert rows[0]["step_vs_lora"] == 1.0
    report = {"profile": "test", "machine": bench.machine_info(), "model": vars(spec), "rows": rows}
    md = bench.render_cost(report, "pytest")
    assert "| lora-r" in md and "| orthora-cayley-output" in md
    jpath, mpath = bench.write_outputs(bench.slim(report), md, "smoke", tmp_path)
    assert json.loads(jpath.read_text())["rows"][1]["method"] == "orthora-cayley-output"
    assert mpath.read_text().startswith("## test")


def test_gpu_profile_dry_run_in_process():
    """The GPU profile's code path (Llama decoder, bf16, LM loss) on a tiny config on CPU."""
    report = bench.run_cost(
        "gpu", dry_run=True, methods="pair", in_process=True, profile_ops=False, log=lambda *_: None
    )
    assert report["model"]["kind"] == "llama" and report["model"]["dtype"] == "bfloat16"
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"lora-r8", "orthora-cayley-output"}
    for row in rows.values():
        assert "error" not in row, row
        assert _finite_positive(row["step_s"]) and _finite_positive(row["trainable_params"])
        assert _finite_positive(row["infer_merged_ratio"])


def test_boft_budget_counts_instantiated_layers():
    """The BOFT rule counts what PEFT really builds (full b'xb' blocks + an output scale), not a formula."""
    widths = [(64, 64), (64, 64), (64, 128)]
    for block, factors in ((8, 1), (4, 2)):
        count = bench.boft_trainable_params(widths, block, factors)
        import peft
        import torch

        class Stack(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b, self.c = (torch.nn.Linear(i, o) for i, o in widths)

        model = peft.get_peft_model(
            Stack(),
            peft.BOFTConfig(
                target_modules=["a", "b", "c"], boft_block_size=block, boft_n_butterfly_factor=factors
            ),
        )
        assert count == sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    boft = next(m for m in bench.matched_methods(widths, 8, "all") if m.kind == "boft")
    chosen = bench.boft_trainable_params(
        widths, boft.kwargs["boft_block_size"], boft.kwargs["boft_n_butterfly_factor"]
    )
    budget = sum(o for _, o in widths) * (8 - 1) / 2
    for b in (2, 4, 8, 16, 32):  # no valid single-factor config is closer to the budget
        other = bench.boft_trainable_params(widths, b, 1)
        assert other is None or abs(chosen - budget) <= abs(other - budget)
