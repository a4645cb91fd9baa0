"""The scaling sweep: orthora (cayley, output) vs LoRA at matched budget against width, block size and tokens."""

from __future__ import annotations

from typing import Optional

from .budgets import matched_methods
from .cost import run_interleaved, summarize
from .models import ModelSpec
from .report import machine_info, scaling_table


def run_scaling(*, quick: bool = False, rounds: int = 3, threads: Optional[int] = None, log=print) -> dict:
    """orthora (cayley, output) vs LoRA at matched budget on a 2-layer linear stack, sweeping one knob at a time."""
    sweeps = []
    widths = [256, 512, 1024, 2048, 4096] if not quick else [64, 128]
    blocks = [8, 16, 32, 64, 128, 256] if not quick else [8, 16]
    seqs = [128, 512, 2048] if not quick else [16, 32]
    base = dict(kind="mlp", batch=1, depth=2)
    for w in widths:
        sweeps.append(
            ("width", w, ModelSpec(**base, width=w, seq=512 if not quick else 16), 32 if not quick else 8)
        )
    for b in blocks:
        sweeps.append(
            ("block", b, ModelSpec(**base, width=1024 if not quick else 64, seq=512 if not quick else 16), b)
        )
    for s in seqs:
        sweeps.append(
            ("tokens", s, ModelSpec(**base, width=1024 if not quick else 64, seq=s), 32 if not quick else 8)
        )
    rows = []
    machine = machine_info()
    for knob, value, spec, block in sweeps:
        widths_ = [(spec.width, spec.width)] * spec.depth
        methods = matched_methods(widths_, block, "pair")
        log(f"[scaling] {knob}={value} (width {spec.width}, block {block}, tokens {spec.batch * spec.seq})")
        res = run_interleaved(
            spec, methods, rounds=rounds, warmup=1, inference_reps=1, threads=threads, paired=True, log=log
        )
        for row in summarize(res, spec):
            row.update(knob=knob, value=value, width=spec.width, block=block, tokens=spec.batch * spec.seq)
            rows.append(row)
    return {"profile": "scaling", "machine": machine, "rows": rows}


def scaling_markdown(report: dict, command: str) -> str:
    """The scaling report as markdown: header, command and machine, table."""
    m = report["machine"]
    return "\n".join(
        [
            "## scaling: 2-layer Linear+GELU stack, cayley output vs LoRA (matched budget)",
            f"`{command}` — {m['date']}, {m['cpu_model']} ({m['host_cores']} cores), torch {m['torch']}, "
            f"peft {m['peft']}",
            "",
            scaling_table(report["rows"]),
        ]
    )
