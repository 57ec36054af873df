"""Benchmark and profiling tool: ``python -m resnet_fast.bench`` (console script ``resnet-fast-bench``).

Modules, one job each: ``shapes`` (distinct convs/blocks/tails derived from the architecture config),
``timing`` (warm-up, CUDA-event medians and spread), ``ceilings`` (measured copy bandwidth and bf16 matmul
peak), ``reference`` (torch.nn reference models), ``impls`` (every implementation, through public APIs only),
``runner`` (rows, statuses, budget), ``suites`` (op/conv/block/model on the GPU), ``demo`` (CPU numerics demo),
``report`` (table, JSON, Markdown, PNG, schema check), ``profile`` (torch.profiler trace + kernel table).

Importing this package imports no kernels: the CLI must set the backend environment first.
"""
