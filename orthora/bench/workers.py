"""Cost workers: one method on one model per subprocess, driven step by step over a JSON line protocol.

Every method runs in its own worker subprocess, so its peak memory is its own. CPU peak memory is the growth of the
worker's peak RSS (the kernel's ``VmHWM``, reset through ``/proc/self/clear_refs``: psutil reports current RSS but
has no resettable peak) over its RSS after setup; GPU peak memory is ``torch.cuda.max_memory_allocated``. Steps are
timed one at a time with ``time.perf_counter`` around an explicit device sync, because the parent interleaves single
steps of different processes (``torch.utils.benchmark`` times repeated blocks within one process).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import psutil

from .budgets import MethodSpec, peft_config
from .models import ModelSpec, build_model, target_modules
from .report import REPO


def _rss_bytes() -> int:
    return psutil.Process().memory_info().rss


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

    Runs in its own subprocess (``python -m orthora.bench.workers``), so its memory belongs to one method only.
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
        if model_spec.gradient_checkpointing:  # non-reentrant: the frozen base's inputs need no grad
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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

    def autocast(self) -> contextlib.AbstractContextManager:
        """The spec's mixed precision (e.g. bf16 autocast on CPU), or nothing."""
        if not self.spec.autocast:
            return contextlib.nullcontext()
        device_type = "cuda" if self.cuda else "cpu"
        return self.torch.autocast(device_type, dtype=getattr(self.torch, self.spec.autocast))

    def loss(self, model) -> Any:
        """A scalar that depends on every output (cost is what matters; LM loss for the decoder)."""
        with self.autocast():
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
            return {
                "peak_mem_bytes": peak,
                "peak_growth_bytes": peak - self.mem_base,
                "mem_kind": "cuda_max_allocated",
            }
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
        for ev in sorted(
            avg, key=lambda e: -(e.self_device_time_total if self.cuda else e.self_cpu_time_total)
        )[:top]:
            t = ev.self_device_time_total if self.cuda else ev.self_cpu_time_total
            rows.append(
                {"op": ev.key, "self_ms_per_step": t / 1000 / steps, "calls_per_step": ev.count / steps}
            )
        total = (
            sum((e.self_device_time_total if self.cuda else e.self_cpu_time_total) for e in avg)
            / 1000
            / steps
        )
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
            with torch.inference_mode(), self.autocast():
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


def main() -> None:
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

    def __init__(
        self, model_spec: ModelSpec, method: Optional[MethodSpec], threads: Optional[int] = None
    ) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.name = method.name if method else "base"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orthora.bench.workers"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
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


if __name__ == "__main__":
    main()
