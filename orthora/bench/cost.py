"""Cost profiles: every method at a matched budget, trained step by step in interleaved worker subprocesses.

All workers are started up front and the parent interleaves training steps across them (A B C A B C ...), rotating
the starting method each round, so slow drifts of a shared machine hit every method alike; ``paired`` runs a LoRA
step next to every other method's step (A B A C ...). Medians over rounds are reported, and ratios to LoRA are
medians of per-round (or per-pair) ratios.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict
from typing import Any, Optional

from .budgets import METHOD_SETS, MethodSpec, matched_methods, targeted_widths
from .models import LLAMA_1B, LLAMA_TINY, ModelSpec, build_model, target_modules
from .report import machine_info
from .workers import Worker, WorkerProcess


def run_interleaved(
    model_spec: ModelSpec,
    methods: list[MethodSpec],
    *,
    rounds: int,
    steps_per_round: int = 1,
    warmup: int = 1,
    inference_reps: int = 5,
    profile_methods: tuple[str, ...] = (),
    in_process: bool = False,
    threads: Optional[int] = None,
    paired: bool = False,
    log=print,
) -> dict:
    """Run every method on ``model_spec`` with interleaved steps; return per-method measurements.

    ``paired=True`` runs a LoRA step right before every step of every other method (A B A C ...), and ratios to
    LoRA use those adjacent pairs: the most robust to a machine whose load changes within a round.
    ``in_process=True`` runs workers in this process one after another (no interleaving, memory not isolated):
    only for the smoke test and environments that cannot spawn processes.
    """
    results: dict[str, dict] = {}
    if in_process:
        for m in methods:
            w = Worker(model_spec, m)
            w.steps(warmup)
            times = [t for _ in range(rounds) for t in w.steps(steps_per_round)]
            r = {
                "times": times,
                "round_medians": [
                    statistics.median(times[i * steps_per_round : (i + 1) * steps_per_round])
                    for i in range(rounds)
                ],
            }
            if m.name in profile_methods:
                r["profile"] = w.profile(1)
            r.update(w.finish(inference_reps))
            r["method"] = asdict(m)
            results[m.name] = r
        return results

    workers = [WorkerProcess(model_spec, m, threads) for m in methods]
    live = []
    for w, m in zip(workers, methods, strict=False):
        hello = w.read()
        if not hello.get("ok"):
            log(f"  {m.name}: FAILED at setup: {hello.get('error')}")
            results[m.name] = {"method": asdict(m), "error": hello.get("error")}
            w.close()
        else:
            results[m.name] = {"method": asdict(m), "times": [], "round_medians": []}
            live.append((w, m))
    for w, m in live:  # warm-up, untimed
        rep = w.call(cmd="steps", n=warmup)
        if not rep["ok"]:
            results[m.name]["error"] = rep["error"]
    live = [(w, m) for w, m in live if "error" not in results[m.name]]
    ref = next(((w, m) for w, m in live if m.kind == "lora"), None) if paired else None
    for r in range(rounds):
        order = live[r % len(live) :] + live[: r % len(live)] if live else []
        for w, m in order:
            if ref is not None and m is ref[1]:
                continue
            ref_time = None
            if ref is not None:  # A B A C A D ...: every step of a method sits next to a LoRA step
                rep = ref[0].call(cmd="steps", n=1)
                if rep["ok"]:
                    ref_time = rep["times"][0]
                    results[ref[1].name]["times"].extend(rep["times"])
                    results[ref[1].name]["round_medians"].append(ref_time)
            rep = w.call(cmd="steps", n=steps_per_round)
            if not rep["ok"]:
                results[m.name]["error"] = rep["error"]
                continue
            results[m.name]["times"].extend(rep["times"])
            results[m.name]["round_medians"].append(statistics.median(rep["times"]))
            if ref_time:
                results[m.name].setdefault("paired_ratios", []).append(
                    statistics.median(rep["times"]) / ref_time
                )
        log(
            f"  round {r + 1}/{rounds}: "
            + ", ".join(
                f"{m.name}={results[m.name]['round_medians'][-1]:.3f}s"
                for _, m in order
                if results[m.name].get("round_medians")
            )
        )
    for w, m in live:
        if m.name in profile_methods and "error" not in results[m.name]:
            rep = w.call(cmd="profile", n=2)
            if rep["ok"]:
                results[m.name]["profile"] = {k: rep[k] for k in ("top", "total_self_ms_per_step", "table")}
        if "error" in results[m.name]:
            w.close()
            continue
        rep = w.call(cmd="finish", inference_reps=inference_reps)
        if rep["ok"]:
            rep.pop("ok")
            results[m.name].update(rep)
        else:
            results[m.name]["error"] = rep["error"]
        w.close()
    return results


def summarize(results: dict, model_spec: ModelSpec, reference: Optional[str] = None) -> list[dict]:
    """One row per method: medians, tokens/s, and ratios to the reference (LoRA) method."""
    tokens = model_spec.batch * model_spec.seq
    if reference is None:
        reference = next((n for n in results if n.startswith("lora")), None)
    ref = results.get(reference, {})
    rows = []
    for name, r in results.items():
        row: dict[str, Any] = {"method": name, "kind": r["method"]["kind"], "config": r["method"]["kwargs"]}
        if r.get("error") or not r.get("times"):
            row["error"] = r.get("error", "no timings")
            rows.append(row)
            continue
        step = statistics.median(r["round_medians"])
        row.update(
            step_s=step,
            step_min_s=min(r["times"]),
            tokens_per_s=tokens / step,
            trainable_params=r.get("trainable_params"),
            peak_mem_mb=None if r.get("peak_growth_bytes") is None else r["peak_growth_bytes"] / 2**20,
            peak_abs_mb=None if r.get("peak_mem_bytes") is None else r["peak_mem_bytes"] / 2**20,
            adapter_kb=None if r.get("adapter_bytes") is None else r["adapter_bytes"] / 1024,
            infer_merged_ratio=r.get("infer_merged_ratio"),
            infer_unmerged_ratio=r.get("infer_unmerged_ratio"),
        )
        if ref.get("round_medians") and not ref.get("error"):
            pairs = r.get("paired_ratios") or [
                a / b for a, b in zip(r["round_medians"], ref["round_medians"], strict=False)
            ]
            row["step_vs_lora"] = 1.0 if name == reference else statistics.median(pairs)
            row["step_min_vs_lora"] = min(r["times"]) / min(ref["times"])
            if row["peak_mem_mb"] is not None and ref.get("peak_growth_bytes"):
                mem_key = "peak_mem_bytes" if model_spec.device.startswith("cuda") else "peak_growth_bytes"
                row["mem_vs_lora"] = r[mem_key] / ref[mem_key]
            if ref.get("trainable_params"):
                row["params_vs_lora"] = r["trainable_params"] / ref["trainable_params"]
        if "profile" in r:
            row["profile_top"] = r["profile"]["top"][:8]
        rows.append(row)
    return rows


COST_PROFILES = {
    "cpu-small": dict(
        model=ModelSpec("minilm", batch=4, seq=128),
        methods="small",
        rounds=7,
        steps=2,
        warmup=1,
        inference_reps=15,
        block=32,
    ),
    "cpu": dict(
        model=ModelSpec("minilm", batch=16, seq=128),
        methods="all",
        rounds=5,
        steps=2,
        warmup=1,
        inference_reps=9,
        block=32,
    ),
    "gpu": dict(
        model=ModelSpec("llama", batch=8, seq=1024, dtype="bfloat16", device="cuda"),
        methods="all",
        rounds=5,
        steps=2,
        warmup=2,
        inference_reps=5,
        block=32,
    ),
    # TinyLlama-1.1B shape (random weights: cost does not depend on the values), bf16 weights under bf16 autocast
    # on CPU, one 2048-token sequence; `run_llm_cpu` runs it with gradient checkpointing on and off
    "llm-cpu": dict(
        model=ModelSpec("llama", batch=1, seq=2048, dtype="bfloat16", autocast="bfloat16"),
        methods="llm",
        dry_methods="llm",
        dry_batch=(1, 64),
        rounds=3,
        steps=1,
        warmup=1,
        inference_reps=3,
        block=32,
        targets={"step": 0.9, "memory": 1.0, "merged_latency": 1.02},  # issue 10's bar
    ),
}

#: llm-cpu variants: gradient checkpointing on (how LLMs are fine-tuned) and off
CHECKPOINTING_VARIANTS = {"checkpointing-on": True, "checkpointing-off": False}


def run_cost(
    profile: str,
    *,
    dry_run: bool = False,
    rounds: Optional[int] = None,
    methods: Optional[str] = None,
    profile_ops: bool = True,
    in_process: bool = False,
    threads: Optional[int] = None,
    paired: bool = False,
    model_overrides: Optional[dict] = None,
    log=print,
) -> dict:
    """A cost profile end to end: build the method list at matched budgets, run interleaved, summarise.

    ``model_overrides`` replaces fields of the profile's `ModelSpec` (the llm-cpu variants and layer count)."""
    cfg = dict(COST_PROFILES[profile])
    model_spec = ModelSpec(**{**asdict(cfg["model"]), **(model_overrides or {})})
    which = methods or cfg["methods"]
    if dry_run:  # same code path, tiny sizes, CPU
        if model_spec.kind == "llama":
            model_spec.llama = dict(LLAMA_TINY)
            model_spec.device = "cpu"
            model_spec.batch, model_spec.seq = cfg.get("dry_batch", (2, 32))
        else:
            model_spec.kind, model_spec.batch, model_spec.seq = "bert-tiny", 2, 32
        which = methods or cfg.get("dry_methods", "smoke")
        cfg.update(rounds=1, warmup=1, inference_reps=1)
    if rounds is not None:
        cfg["rounds"] = rounds
    # widths only: the 1B decoder is built on the meta device, the others are small enough to build for real
    probe_device = "meta" if model_spec.kind == "llama" else "cpu"
    probe = build_model(ModelSpec(**{**asdict(model_spec), "device": probe_device}))
    widths = targeted_widths(probe, target_modules(model_spec))
    del probe
    method_list = matched_methods(widths, cfg["block"], which)
    machine = machine_info()  # before the run: the commit the workers import
    log(
        f"[{profile}{' dry-run' if dry_run else ''}] {model_spec.kind} batch {model_spec.batch}x{model_spec.seq}, "
        f"{len(widths)} targeted linears, methods: {', '.join(m.name for m in method_list)}"
    )
    prof = tuple(
        m.name
        for m in method_list
        if m.name.startswith(("lora", "orthora-cayley-output", "orthora-householder-output", "oft-cayley"))
    )
    results = run_interleaved(
        model_spec,
        method_list,
        rounds=cfg["rounds"],
        steps_per_round=cfg["steps"],
        warmup=cfg["warmup"],
        inference_reps=cfg["inference_reps"],
        profile_methods=prof if profile_ops else (),
        in_process=in_process,
        threads=threads,
        paired=paired,
        log=log,
    )
    rows = summarize(results, model_spec)
    return {
        "profile": profile,
        "dry_run": dry_run,
        "machine": machine,
        "model": asdict(model_spec),
        "settings": {
            **{k: v for k, v in cfg.items() if k != "model"},
            "threads_per_worker": threads,
            "paired": paired,
            "methods": which,
        },
        "budget_rule": matched_methods.__doc__.split("\n\n")[1].strip(),
        "rows": rows,
        "raw": {k: {kk: vv for kk, vv in v.items() if kk != "profile"} for k, v in results.items()},
        "profiles": {k: v["profile"] for k, v in results.items() if "profile" in v},
    }


#: the micro profile's A/B cases of the core's speed paths (issue 10): (layers, width, tokens) of a Linear+GELU stack
#: trained with batched vs per-layer block construction; block sizes of exp's own backward vs torch's; (width, block,
#: reflections, tokens) of a factored vs a dense Householder rotation
MICRO_CASES = {
    "batched": [(2, 1024, 128), (8, 512, 128), (2, 1024, 512)],
    "exp_blocks": [32, 128, 256],
    "householder": [(1024, 256, 8, 512), (1024, 64, 4, 512)],
}
MICRO_DRY_CASES = {"batched": [(2, 64, 16)], "exp_blocks": [8], "householder": [(64, 16, 2, 16)]}


def run_micro(
    *,
    tokens: int = 2048,
    reps: int = 15,
    widths: tuple[int, ...] = (384, 1536),
    block: int = 32,
    cases: Optional[dict] = None,
    log=print,
) -> dict:
    """Isolated, interleaved fwd+bwd timings (1 thread, CPU): orthora's activation-rotation path vs a LoRA pair, and
    A/B pairs of the core's speed paths (:data:`MICRO_CASES`): batched vs per-layer block construction (a whole
    training step), exp's backward vs torch's, factored vs dense Householder rotations."""
    import torch

    from orthora import rotations as rot

    torch.manual_seed(0)
    rows = []

    # reps interleaved across the functions by hand (torch.utils.benchmark times one statement at a time)
    def timed(fns: dict) -> dict:
        for f in fns.values():
            f()
        ts = {n: [] for n in fns}
        for _ in range(reps):
            for n, f in fns.items():
                t0 = time.perf_counter()
                f()
                ts[n].append(time.perf_counter() - t0)
        return {n: {"min_ms": min(v) * 1e3, "median_ms": statistics.median(v) * 1e3} for n, v in ts.items()}

    for d in widths:
        b, k = block, d // block
        p = (0.01 * torch.randn(k, b * (b - 1) // 2)).requires_grad_()
        x0 = torch.randn(tokens, d)
        a_w = torch.randn(8, d, requires_grad=True)
        b_w = torch.randn(d, 8, requires_grad=True)

        def lora(x0=x0, a_w=a_w, b_w=b_w):
            x = x0.clone().requires_grad_()
            (x + (x @ a_w.T) @ b_w.T).sum().backward()

        def orth(x0=x0, p=p, b=b):
            x = x0.clone().requires_grad_()
            rot.rotate(x, rot.cayley(rot.skew_symmetric(p, b))).sum().backward()

        def blocks_only(p=p, b=b):
            rot.cayley(rot.skew_symmetric(p, b)).sum().backward()

        res = timed(
            {"lora_pair_r8": lora, "orthora_rotate_cayley_b32": orth, "cayley_blocks_only": blocks_only}
        )
        rows.append({"case": f"rotation d={d} tokens={tokens}", **res})
    rows += _micro_speed_paths(cases or MICRO_CASES, timed)
    for r in rows:
        log(json.dumps(r))
    return {"profile": "micro", "machine": machine_info(), "rows": rows}


def _micro_speed_paths(cases: dict, timed) -> list[dict]:
    """The A/B rows of :func:`run_micro` (see :data:`MICRO_CASES`)."""
    import peft
    import torch

    from orthora import OrthoConfig, rotations
    from orthora.model import OrthoModel

    from .models import LinearStack

    rows = []
    for layers, width, tokens in cases["batched"]:
        stack = LinearStack(width, layers).requires_grad_(False)
        model = peft.get_peft_model(stack, OrthoConfig(target_modules=["proj"], block_size=32))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        x = torch.randn(tokens, width)

        def train_step(batched: bool, model=model, opt=opt, x=x) -> None:
            OrthoModel.batch_block_construction = batched
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()

        try:
            res = timed({"batched": lambda: train_step(True), "per_layer": lambda: train_step(False)})
        finally:
            OrthoModel.batch_block_construction = True
        rows.append({"case": f"train step, {layers} layers d={width} tokens={tokens}, cayley b=32", **res})
    for b in cases["exp_blocks"]:
        k = max(1, 1024 // b)
        params = (0.1 * torch.randn(k, b * (b - 1) // 2)).requires_grad_()

        def ours(params=params, b=b) -> None:
            rotations.orthogonal_blocks(params, "exp", b).sum().backward()

        def torchs(params=params, b=b) -> None:
            torch.linalg.matrix_exp(rotations.skew_symmetric(params, b)).sum().backward()

        res = timed({"exp_own_backward": ours, "torch_matrix_exp_backward": torchs})
        rows.append({"case": f"exp blocks fwd+bwd, {k}x({b}x{b})", **res})
    for width, b, reflections, tokens in cases["householder"]:
        vectors = torch.randn(width // b, reflections, b, requires_grad=True)
        x0 = torch.randn(tokens, width)

        def factored(vectors=vectors, x0=x0) -> None:
            x = x0.clone().requires_grad_()
            rotations.rotate_factored(x, *rotations.householder_factors(vectors)).sum().backward()

        def dense(vectors=vectors, x0=x0) -> None:
            x = x0.clone().requires_grad_()
            rotations.rotate(x, rotations.householder(vectors)).sum().backward()

        res = timed({"factored": factored, "dense": dense})
        rows.append({"case": f"householder d={width} b={b} r={reflections} tokens={tokens}", **res})
    return rows


def micro_markdown(report: dict, command: str) -> str:
    """The micro report as markdown: one row per case, min / median milliseconds per timed function."""
    lines = [
        f"## micro: `{command}` — {report['machine']['date']}, {report['machine']['cpu_model']}, 1 thread",
        "",
        "| case | timings (fwd+bwd, min / median ms) |",
        "|---|---|",
    ]
    for r in report["rows"]:
        cells = "; ".join(
            f"{n}: {v['min_ms']:.2f} / {v['median_ms']:.2f}" for n, v in r.items() if isinstance(v, dict)
        )
        lines.append(f"| {r['case']} | {cells} |")
    return "\n".join(lines)


def llm_layer_count(
    model: ModelSpec, workers: int, available_bytes: int, max_layers: int = LLAMA_1B["num_hidden_layers"]
) -> int:
    """The most decoder layers (up to ``max_layers``) whose estimated memory fits ``workers`` live workers.

    Per worker: the weights twice (the trained model and the fresh base that merged inference is timed against),
    fp32 logits with their gradient, and per layer its activations (one hidden state per layer with gradient
    checkpointing; about 12 hidden-width and 4 intermediate-width tensors per layer without). 80% of the
    available memory is used."""
    import torch

    config = {**LLAMA_1B, **model.llama}
    per_param = torch.empty(0, dtype=getattr(torch, model.dtype)).element_size()
    counts = []
    for layers in (1, 2):
        probe = build_model(
            ModelSpec(**{**asdict(model), "device": "meta", "llama": {**config, "num_hidden_layers": layers}})
        )
        counts.append(sum(p.numel() for p in probe.parameters()))
    per_layer_params, fixed_params = counts[1] - counts[0], 2 * counts[0] - counts[1]
    tokens, hidden, inter = model.batch * model.seq, config["hidden_size"], config["intermediate_size"]
    act_width = hidden if model.gradient_checkpointing else 12 * hidden + 4 * inter
    per_layer = 2 * per_layer_params * per_param + tokens * act_width * per_param
    fixed = 2 * fixed_params * per_param + 3 * tokens * config["vocab_size"] * 4
    budget = 0.8 * available_bytes / max(1, workers) - fixed
    return max(1, min(max_layers, int(budget // per_layer)))


def run_llm_cpu(
    *,
    dry_run: bool = False,
    rounds: Optional[int] = None,
    methods: Optional[str] = None,
    profile_ops: bool = False,
    in_process: bool = False,
    threads: Optional[int] = None,
    paired: bool = False,
    variants: tuple[str, ...] = tuple(CHECKPOINTING_VARIANTS),
    available_bytes: Optional[int] = None,
    log=print,
) -> dict:
    """``--profile llm-cpu``: the Llama-style decoder with gradient checkpointing on and off, one cost report each.

    The layer count is the TinyLlama 22 unless the live workers would not fit in memory (`llm_layer_count`); the
    report says how many were used and why."""
    import psutil

    if available_bytes is None:
        available_bytes = psutil.virtual_memory().available
    cfg = COST_PROFILES["llm-cpu"]
    which = methods or cfg["methods"]
    n_workers = 1 if in_process else len(METHOD_SETS.get(which, METHOD_SETS["llm"]))
    out: dict[str, Any] = {"profile": "llm-cpu", "dry_run": dry_run, "variants": {}}
    for name in variants:
        model = ModelSpec(**{**asdict(cfg["model"]), "gradient_checkpointing": CHECKPOINTING_VARIANTS[name]})
        layers = (
            LLAMA_TINY["num_hidden_layers"] if dry_run else llm_layer_count(model, n_workers, available_bytes)
        )
        overrides = {
            "gradient_checkpointing": model.gradient_checkpointing,
            "llama": {"num_hidden_layers": layers},
        }
        report = run_cost(
            "llm-cpu",
            dry_run=dry_run,
            rounds=rounds,
            methods=which,
            profile_ops=profile_ops,
            in_process=in_process,
            threads=threads,
            paired=paired,
            model_overrides=overrides,
            log=log,
        )
        full = LLAMA_TINY["num_hidden_layers"] if dry_run else LLAMA_1B["num_hidden_layers"]
        report["layers"] = {
            "used": report["model"]["llama"].get("num_hidden_layers", full),
            "full": full,
            "workers": n_workers,
            "available_gb": available_bytes / 2**30,
        }
        out["variants"][name] = report
    first = next(iter(out["variants"].values()))
    out.update(machine=first["machine"], model=first["model"])
    return out


def llm_cpu_markdown(report: dict, command: str) -> str:
    """One cost table per checkpointing variant, each saying how many decoder layers were built and why."""
    from .report import render_cost

    parts = []
    for name, variant in report["variants"].items():
        layers = variant["layers"]
        note = f"{layers['used']} of {layers['full']} decoder layers" + (
            ""
            if layers["used"] == layers["full"]
            else f" (fewer: {layers['workers']} live workers in {layers['available_gb']:.0f} GiB available)"
        )
        parts += [render_cost(variant, command).replace("\n", f" — {name}, {note}\n", 1), ""]
    return "\n".join(parts).rstrip()
