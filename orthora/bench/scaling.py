"""The scaling sweep: orthora (cayley) vs LoRA at matched budget against width, block size, tokens and side."""

from __future__ import annotations

from typing import Optional

from .budgets import matched_methods
from .cost import run_interleaved, summarize
from .models import ModelSpec
from .report import machine_info, scaling_table

#: the sweep, one knob at a time around (width 1024, block 32, 512 tokens, output side); quick: the dry run's sizes
SWEEP = {
    "width": [256, 512, 1024, 2048, 4096],
    "block": [8, 16, 32, 64, 128, 256],
    "tokens": [128, 512, 2048, 4096],
    "side": ["output", "input", "both"],
}
QUICK_SWEEP = {"width": [64, 128], "block": [8, 16], "tokens": [16, 32], "side": ["output", "input", "both"]}
CENTRE = {"width": 1024, "block": 32, "tokens": 512, "side": "output"}
QUICK_CENTRE = {"width": 64, "block": 8, "tokens": 16, "side": "output"}


def sweep_points(quick: bool = False) -> list[dict]:
    """Every point of the sweep: the centre with one knob changed (``knob`` and ``value`` name which)."""
    sweep, centre = (QUICK_SWEEP, QUICK_CENTRE) if quick else (SWEEP, CENTRE)
    return [
        {**centre, knob: value, "knob": knob, "value": value}
        for knob, values in sweep.items()
        for value in values
    ]


def run_scaling(
    *,
    quick: bool = False,
    rounds: int = 3,
    threads: Optional[int] = None,
    in_process: bool = False,
    log=print,
) -> dict:
    """orthora (cayley) vs LoRA at matched budget on a 2-layer linear stack, sweeping one knob at a time."""
    rows = []
    machine = machine_info()
    for point in sweep_points(quick):
        spec = ModelSpec(kind="mlp", batch=1, depth=2, width=point["width"], seq=point["tokens"])
        widths = [(spec.width, spec.width)] * spec.depth
        by_name = {m.name: m for m in matched_methods(widths, point["block"], "sides")}
        side = point["side"]
        methods = [next(m for m in by_name.values() if m.kind == "lora"), by_name[f"orthora-cayley-{side}"]]
        log(
            f"[scaling] {point['knob']}={point['value']} (width {spec.width}, block {point['block']}, "
            f"tokens {spec.batch * spec.seq}, side {side})"
        )
        res = run_interleaved(
            spec,
            methods,
            rounds=rounds,
            warmup=1,
            inference_reps=1,
            threads=threads,
            paired=True,
            in_process=in_process,
            log=log,
        )
        for row in summarize(res, spec):
            row.update(
                knob=point["knob"],
                value=point["value"],
                width=spec.width,
                block=point["block"],
                tokens=spec.batch * spec.seq,
                side=side,
            )
            rows.append(row)
    return {"profile": "scaling", "machine": machine, "rows": rows}


def scaling_markdown(report: dict, command: str) -> str:
    """The scaling report as markdown: header, command and machine, table."""
    m = report["machine"]
    return "\n".join(
        [
            "## scaling: 2-layer Linear+GELU stack, orthora cayley vs LoRA (matched budget)",
            f"`{command}` — {m['date']}, {m['cpu_model']} ({m['host_cores']} cores), torch {m['torch']}, "
            f"peft {m['peft']}",
            "",
            scaling_table(report["rows"]),
        ]
    )
