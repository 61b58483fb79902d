"""The kernel layer: the fused ops as torch custom ops, their reference, and every backend behind them.

    scores = crd_fast.ops.crd_head(feature_maps, matrix, offset, embedding="concat", target_dim=1024)
    residuals = crd_fast.ops.crd_residual(feature_maps, matrix, q, embedding="concat", target_dim=1024)

* ``registry``: ``OpSpec``, one record per op, and ``register``, which makes it ``torch.ops.crd_fast.<name>`` with
  the same default, CPU, CUDA and fake kernels for every op (the one CUDA path: decide, operands, launch);
* ``head_op``, ``residual_op``: the two ops' specs (schema, checks, reference, CPU kernel, CUDA operands, kernels,
  launchers, probe) and their public functions; ``inputs``: the input checks they share;
* ``reference``: the pure-PyTorch specification every path is tested against;
* ``plan``: the tap tables and folded operands every kernel reads (one indexing scheme for all paths);
* ``cpu``: per-layer BLAS projection plus the Cython fused pass (csrc/cpu/crd_head.pyx);
* ``cuda_dispatch``: the GPU backends (native, CuPy) and which path each op takes on each device (probed once);
* ``operands``: what a CUDA launch reads (``Operands``) and the kernels that read it (``Kernels``);
* ``cuda_launch``: the launch contract and its checks, and the compiled launcher; ``cupy_jit``: the CuPy one;
* ``kernel_config``: the kernels' launch geometry, read from the shipped csrc/cuda/crd_head_kernels.cuh;
* ``streams``: the stream rules of the device caches;
* ``native``: the compiled module ``_C`` (loader, build facts, the residual-norm kernel);
* ``backends``: what this installation can run, and the path of each op on each GPU.

See docs/DESIGN.md ("Kernels and dispatch", "A new kernel or backend") and docs/GPU.md.
"""

from . import head_op, residual_op
from .backends import backends
from .head_op import check_head_inputs, crd_head
from .registry import output_dtype, register
from .residual_op import check_residual_inputs, crd_residual

# The one registration loop: every op of crd-fast becomes torch.ops.crd_fast.<name> here.
for _spec in (head_op.SPEC, residual_op.SPEC):
    register(_spec)

__all__ = ["backends", "check_head_inputs", "check_residual_inputs", "crd_head", "crd_residual", "output_dtype"]
