"""Command line of the benchmark: ``python -m orthora.bench --profile NAME`` (or ``python scripts/benchmark.py``).

Profiles (``--profile``):

* ``cpu-small``  a few minutes: MiniLM-L6, batch 4 x 128, a few methods, 7 rounds.
* ``cpu``        the full CPU cost table: all-MiniLM-L6-v2, batch 16 x 128, every method.
* ``gpu``        a ~1.1B-parameter Llama-style decoder (random weights), bf16, batch 8 x 1024 on one CUDA device.
* ``llm-cpu``    the same decoder shape on CPU: bf16 autocast, batch 1 x 2048, gradient checkpointing on and off.
* ``scaling``    orthora vs LoRA step time / memory against width, block size and sequence length.
* ``quality``    GLUE + SQuAD fine-tuning through ``orthora.train``.
* ``micro``      isolated fwd+bwd timings of the rotation against a LoRA pair.

``--dry-run`` runs a profile's code path on CPU with a tiny config (used by the tests).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import cost, quality, scaling
from .budgets import METHOD_SETS
from .report import RESULTS_DIR, render_cost, slim, write_outputs

PROFILES = (*cost.COST_PROFILES, "scaling", "quality", "micro")  # llm-cpu is a cost profile with two variants


def build_parser(prog: str = "python -m orthora.bench") -> argparse.ArgumentParser:
    """Every option of every profile."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=PROFILES, required=True)
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny model on CPU, same code path (smoke test)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: per profile)")
    parser.add_argument(
        "--methods",
        default=None,
        help="method set: all, " + ", ".join(METHOD_SETS) + " (default: per profile)",
    )
    parser.add_argument(
        "--paired",
        action="store_true",
        help="run a LoRA step next to every other method's step (A B A C ...); ratios from those pairs",
    )
    parser.add_argument("--no-profiler", action="store_true", help="skip the torch.profiler breakdown")
    parser.add_argument(
        "--profiler",
        action="store_true",
        help="llm-cpu: add the torch.profiler breakdown (off by default there)",
    )
    parser.add_argument(
        "--checkpointing",
        choices=("both", "on", "off"),
        default="both",
        help="llm-cpu: gradient checkpointing on, off, or both variants (default)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per worker (CPU default 1: stable on a shared machine; 0 = torch default)",
    )
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    parser.add_argument("--no-write", action="store_true", help="print only")
    quality.add_arguments(parser)
    return parser


def run_profile(args: argparse.Namespace, command: str) -> tuple[dict, str, str]:
    """Run the chosen profile: (report, markdown, file tag)."""
    all_cores = args.profile in ("gpu", "llm-cpu") and not args.dry_run  # one 1B model step at a time
    threads = (None if all_cores else 1) if args.threads is None else (args.threads or None)
    dry = "-dryrun" if args.dry_run else ""
    if args.profile == "llm-cpu":
        variants = (
            tuple(cost.CHECKPOINTING_VARIANTS)
            if args.checkpointing == "both"
            else (f"checkpointing-{args.checkpointing}",)
        )
        report = cost.run_llm_cpu(
            dry_run=args.dry_run,
            rounds=args.rounds,
            methods=args.methods,
            profile_ops=args.profiler,
            threads=threads,
            paired=args.paired,
            variants=variants,
        )
        report["command"] = command
        return report, cost.llm_cpu_markdown(report, command), "llm-cpu" + dry
    if args.profile in cost.COST_PROFILES:
        report = cost.run_cost(
            args.profile,
            dry_run=args.dry_run,
            rounds=args.rounds,
            methods=args.methods,
            profile_ops=not args.no_profiler,
            threads=threads,
            paired=args.paired,
        )
        report["command"] = command
        return report, render_cost(report, command), args.profile + dry
    if args.profile == "micro":
        import torch

        torch.set_num_threads(threads or torch.get_num_threads())
        report = cost.run_micro(
            **(
                {"tokens": 32, "reps": 2, "widths": (64,), "block": 8, "cases": cost.MICRO_DRY_CASES}
                if args.dry_run
                else {}
            )
        )
        report["command"] = command
        return report, cost.micro_markdown(report, command), "micro"
    if args.profile == "scaling":
        report = scaling.run_scaling(quick=args.dry_run, rounds=args.rounds or 3, threads=threads)
        report["command"] = command
        return report, scaling.scaling_markdown(report, command), "scaling" + dry
    if threads:
        import torch

        torch.set_num_threads(threads)
    return quality.run_profile(args, command)


def main(argv: Sequence[str] | None = None, prog: str = "python -m orthora.bench") -> int:
    """Parse, run, print the markdown and write ``<tag>-<date>.json`` / ``.md`` (unless ``--no-write``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    report, md, tag = run_profile(args, f"{prog} " + " ".join(argv))
    print(md)
    if not args.no_write:
        j, p = write_outputs(slim(report), md, tag, Path(args.out_dir))
        print(f"\nwrote {j} and {p}")
    return 0
