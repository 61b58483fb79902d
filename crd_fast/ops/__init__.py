"""The kernel layer: the fused CRD head as a torch custom op, its reference, and every backend behind it.

    scores = crd_fast.ops.crd_head(feature_maps, matrix, offset, embedding="concat", target_dim=1024)

* ``head_op``: the ops ``torch.ops.crd_fast.crd_head`` and ``crd_residual`` (schema, input checks, fake, dispatch);
* ``reference``: the pure-PyTorch specification every path is tested against;
* ``plan``: the tap tables and folded operands every kernel reads (one indexing scheme for all paths);
* ``cpu``: per-layer BLAS projection plus the Cython fused pass (csrc/cpu/crd_head.pyx);
* ``cuda_dispatch``: which path each CUDA device takes (native -> CuPy -> reference, probed once per device);
* ``cuda``: operands built once (``prepare``) and run by the compiled launcher (``cuda_launch``) or the CuPy
  one (``cupy_jit``), both taking the same ``cuda_launch.Operands``;
* ``kernel_config``: the kernels' launch geometry, read from the shipped csrc/cuda/crd_head_kernels.cuh;
* ``streams``: the stream rules of the device caches;
* ``native``: the compiled module ``_C`` (loader, build facts, the residual-norm kernel);
* ``backends``: what this installation can run, and the path of each GPU.

See docs/DESIGN.md ("Kernels and dispatch") and docs/GPU.md.
"""

from .backends import backends
from .head_op import check_head_inputs, check_residual_inputs, crd_head, crd_residual, output_dtype

__all__ = ["backends", "check_head_inputs", "check_residual_inputs", "crd_head", "crd_residual", "output_dtype"]
