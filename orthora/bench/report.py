"""Where numbers came from and how they are shown: machine info, markdown tables, result files."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from orthora.config import OrthoConfig

REPO = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO / "benchmarks" / "results"


def fmt(v: Any, spec: str = ".3f") -> str:
    """A table cell: ``–`` for a missing value, floats by ``spec``."""
    if v is None:
        return "–"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what `platform` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.processor()
            )
    except OSError:
        return platform.processor()


def machine_info() -> dict:
    """Where the numbers came from: cores, CPU model, GPU, library versions, date, commit."""
    import peft
    import torch
    import transformers

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        pass
    return info


def write_outputs(report: dict, markdown: str, tag: str, out_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    """Write ``<tag>-<date>.json`` and ``.md`` to ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    jpath = out_dir / f"{tag}-{stamp}.json"
    mpath = out_dir / f"{tag}-{stamp}.md"
    jpath.write_text(json.dumps(report, indent=1, default=str) + "\n")
    mpath.write_text(markdown + "\n")
    return jpath, mpath


def slim(report: dict) -> dict:
    """The JSON that is committed: drop the verbose profiler tables (kept in the markdown)."""
    out = dict(report)
    if "variants" in report:  # llm-cpu: one cost report per variant
        out["variants"] = {name: slim(variant) for name, variant in report["variants"].items()}
        return out
    out["profiles"] = {
        k: {kk: vv for kk, vv in v.items() if kk != "table"} for k, v in report.get("profiles", {}).items()
    }
    return out


def cost_table(rows: list[dict], mem_label: str = "peak RSS growth MiB") -> str:
    """Markdown table of cost rows."""
    head = (
        f"| method | trainable params | × LoRA params | step s (median) | × LoRA step (median of per-round ratios) "
        f"| × LoRA step (min/min) | tokens/s | {mem_label} | × LoRA mem | adapter KiB | merged / base latency "
        "| unmerged / base latency |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error'][:80]} |" + " |" * 10)
            continue
        lines.append(
            f"| {r['method']} | {r['trainable_params']:,} | {fmt(r.get('params_vs_lora'), '.2f')} "
            f"| {fmt(r['step_s'])} | {fmt(r.get('step_vs_lora'), '.2f')} | {fmt(r.get('step_min_vs_lora'), '.2f')} "
            f"| {r['tokens_per_s']:,.0f} "
            f"| {fmt(r['peak_mem_mb'], '.0f')} | {fmt(r.get('mem_vs_lora'), '.2f')} | {fmt(r['adapter_kb'], '.0f')} "
            f"| {fmt(r['infer_merged_ratio'])} | {fmt(r['infer_unmerged_ratio'])} |"
        )
    return "\n".join(lines)


#: cost targets of exact orthora rows: step and peak memory as multiples of LoRA's, merged latency of the base's
DEFAULT_TARGETS = {"step": 1.05, "memory": 1.05, "merged_latency": 1.02}


def targets_check(rows: list[dict], targets: dict | None = None) -> list[str]:
    """The cost targets, evaluated on measured rows (exact orthora parametrizations vs LoRA)."""
    t = {**DEFAULT_TARGETS, **(targets or {})}
    out = []
    for r in rows:
        if r["kind"] != "orthora" or "error" in r:
            continue
        exact = OrthoConfig(**r["config"]).is_exact  # the row's config resolved: a default row names no map
        step, mem, inf = r.get("step_vs_lora"), r.get("mem_vs_lora"), r.get("infer_merged_ratio")
        parts = [
            f"step {fmt(step, '.2f')}× LoRA ({_met(step, t['step'])})",
            f"memory {fmt(mem, '.2f')}× ({_met(mem, t['memory'])})",
            f"merged latency {fmt(inf, '.3f')}× base ({_met(inf, t['merged_latency'])})",
        ]
        out.append(
            f"- {r['method']}{'' if exact else ' (approximate, not a target row)'}: " + "; ".join(parts)
        )
    return out


def _met(value: float | None, limit: float) -> str:
    return f"met, ≤ {limit:g}" if value is not None and value <= limit else f"MISSED, > {limit:g}"


def machine_line(m: dict, threads: Any = None) -> str:
    """One line naming the machine and library versions a report ran on."""
    return (
        f"{m['date']}, {m['cpu_model']} ({m['host_cores']} cores; torch threads per worker: "
        f"{threads or m['torch_threads']}){', GPU ' + m['gpu'] if m.get('gpu') else ''}, torch {m['torch']}, "
        f"peft {m['peft']}, transformers {m['transformers']}, commit {m.get('git_commit', '?')}"
    )


def render_cost(report: dict, command: str) -> str:
    """Markdown for a cost report: header, table, target check and the profiler's top ops."""
    spec = report["model"]
    mem_label = "peak CUDA alloc MiB (growth)" if spec["device"].startswith("cuda") else "peak RSS growth MiB"
    parts = [
        f"## {report['profile']}{' (dry run)' if report.get('dry_run') else ''}: {spec['kind']}, "
        f"batch {spec['batch']} x {spec['seq']}, {spec['dtype']}"
        + (f", {spec['autocast']} autocast" if spec.get("autocast") else "")
        + (", gradient checkpointing" if spec.get("gradient_checkpointing") else ""),
        f"`{command}` — "
        + machine_line(report["machine"], report.get("settings", {}).get("threads_per_worker")),
        "",
        cost_table(report["rows"], mem_label),
        "",
        "Targets (exact orthora vs LoRA):",
        *targets_check(report["rows"], report.get("settings", {}).get("targets")),
    ]
    for name, p in report.get("profiles", {}).items():
        parts += [
            "",
            f"torch.profiler, {name}: top self-time ops per step (total {p['total_self_ms_per_step']:.0f} ms)",
            "",
            "| op | self ms/step | calls/step |",
            "|---|---|---|",
        ]
        parts += [
            f"| `{t['op']}` | {t['self_ms_per_step']:.1f} | {t['calls_per_step']:.0f} |"
            for t in p["top"][:10]
        ]
    return "\n".join(parts)


def scaling_table(rows: list[dict]) -> str:
    """Markdown: one line per sweep point, orthora next to LoRA."""
    lines = [
        "| sweep | width | block | tokens | side | LoRA r | LoRA step ms | orthora step ms | × LoRA step "
        "| LoRA mem MiB | orthora mem MiB | × LoRA mem |",
        "|" + "---|" * 12,
    ]
    by: dict[tuple, dict] = {}
    for r in rows:
        by.setdefault((r["knob"], r["value"]), {})[r["kind"]] = r
    for (knob, value), d in by.items():
        lo, ob = d.get("lora", {}), d.get("orthora", {})
        if "step_s" not in lo or "step_s" not in ob:
            lines.append(f"| {knob}={value} | failed |" + " |" * 10)
            continue
        lines.append(
            f"| {knob}={value} | {ob['width']} | {ob['block']} | {ob['tokens']} | {ob.get('side', 'output')} "
            f"| {lo['config']['r']} "
            f"| {lo['step_s'] * 1000:.1f} | {ob['step_s'] * 1000:.1f} | {fmt(ob.get('step_vs_lora'), '.2f')} "
            f"| {fmt(lo['peak_mem_mb'], '.1f')} | {fmt(ob['peak_mem_mb'], '.1f')} | {fmt(ob.get('mem_vs_lora'), '.2f')} |"
        )
    return "\n".join(lines)
