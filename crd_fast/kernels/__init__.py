"""Fused CRD head kernels behind ``crd_fast.ops.crd_head``.

* ``plan``: the tap tables and folded operands every kernel reads (one indexing scheme for all paths).
* ``cpu``: per-layer BLAS projection plus the Cython fused pass (csrc/cpu/crd_head.pyx).
* ``cuda``: the CUDA paths: kernels compiled into ``crd_fast._C``, or the same source compiled at run
  time by CuPy (``cupy_module``), selected by ``cuda.cuda_backend``.
"""
