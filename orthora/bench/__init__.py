"""The cost and quality benchmark of orthora against PEFT's LoRA, OFT, BOFT and HRA, as library code.

``python -m orthora.bench --profile cpu-small`` (or ``python scripts/benchmark.py ...``) runs a profile; see
``docs/benchmarks.md``. Modules, by concern:

* `orthora.bench.budgets`  matched trainable-parameter budgets, method sets and the adapter config of each method;
* `orthora.bench.models`   what a benchmark trains: model specs, the MiniLM checkpoint, tiny and 1B Llama shapes;
* `orthora.bench.workers`  one method per subprocess, stepped over a JSON line protocol (time, memory, latency);
* `orthora.bench.cost`     the cost profiles (cpu-small, cpu, gpu, llm-cpu, micro): interleaved or paired steps;
* `orthora.bench.scaling`  orthora vs LoRA against width, block size, tokens and side;
* `orthora.bench.quality`  the GLUE/SQuAD quality sweep through `orthora.train`, its command line; its parts:
  `quality_methods` (the method table), `quality_runs` (one run and its score), `quality_plan` (LR search, claims,
  the worker loop) and `quality_report` (summary, tables, plots);
* `orthora.bench.report`   machine info, markdown tables and result files;
* `orthora.bench.cli`      the command line.
"""
