"""The kernel layer: the fused CRD head as a torch custom op, its reference, and every backend behind it.

    scores = crd_fast.ops.crd_head(feature_maps, matrix, offset, embedding="concat", target_dim=1024)

* ``head_op``: the op ``torch.ops.crd_fast.crd_head`` (schema, input checks, fake, per-device dispatch);
* ``reference``: the pure-PyTorch specification every path is tested against;
* ``plan``: the tap tables and folded operands every kernel reads (one indexing scheme for all paths);
* ``cpu``: per-layer BLAS projection plus the Cython fused pass (csrc/cpu/crd_head.pyx);
* ``cuda``: the CUDA paths, kernels compiled into ``_C`` or the same source built by CuPy (``cupy_jit``),
  sharing one launch contract (``cuda_launch``);
* ``native``: the compiled module ``_C`` (loader, build facts, the residual-norm kernel);
* ``backends``: what this installation can run.

See docs/DESIGN.md ("Kernels and dispatch").
"""

from .backends import backends
from .head_op import check_head_inputs, crd_head, output_dtype

__all__ = ["backends", "check_head_inputs", "crd_head", "output_dtype"]
