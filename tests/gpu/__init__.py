"""The GPU tests: every CUDA kernel path of every op against the float64 reference (or the same-roundings model),
edge cases, streams, graphs and compute-sanitizer. Marked ``cuda`` and skipped without a CUDA device;
bench/gpu_check.py runs them on a lent GPU and writes their table (docs/GPU.md).

A package, so that its modules import as ``gpu.<name>`` with tests/ on ``sys.path`` (``helpers`` included).
"""
