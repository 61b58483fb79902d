"""CPU fused head: per-layer BLAS projection at native resolution, then one fused Cython pass.

    Z_l = F_l^T P'_l^T        (B, H_l W_l, r), torch's BLAS, layer l at its own resolution
    score = ||sum_l A_l Z_l - q||   one pass over the output grid (csrc/cpu/crd_head.pyx)

For the default wide_resnet50_2 embedding this halves the multiply-adds of "embed, then project"
(layer3 is projected on 14x14 instead of 28x28) and never builds the (B, d, 28, 28) embedding.
With a bf16 head GEMM (crd_fast.core.precision.head_gemm_dtype) the bf16 projections go to the pass over bf16
projections (csrc/cpu/crd_head_bf16.h) without a float32 copy.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..core.precision import current_head_gemm_dtype
from .plan import FOLDS, Geometry, geometry_of, tables

try:  # compiled from csrc/cpu/crd_head.pyx; absent in a pure-Python checkout
    from . import _crd_head_cpu  # type: ignore[attr-defined]

    _IMPORT_ERROR: Optional[str] = None
except ImportError as exc:  # pragma: no cover - depends on the build
    _crd_head_cpu = None
    _IMPORT_ERROR = str(exc)

_REAL = {torch.float32: "float32", torch.float64: "float64"}


def available() -> bool:
    """True when the compiled fused pass imports."""
    return _crd_head_cpu is not None


def import_error() -> Optional[str]:
    return _IMPORT_ERROR


def openmp() -> bool:
    """True when the fused pass was compiled with OpenMP."""
    return _crd_head_cpu is not None and bool(_crd_head_cpu.openmp_compiled())


def _check(maps: Sequence[torch.Tensor], matrix_t: torch.Tensor, q: torch.Tensor, out: Optional[torch.Tensor]) -> None:
    """Last line of defence before pointers leave Python: every tensor exactly as the pass expects."""
    if len(maps) == 0:
        raise ValueError("at least one feature map is needed")
    dtype = maps[0].dtype
    if dtype not in _REAL:
        raise TypeError(f"the CPU fused pass takes float32 or float64 maps, got {dtype}")
    batch = maps[0].shape[0]
    for i, f in enumerate(maps):
        if f.device.type != "cpu" or f.dtype != dtype or f.ndim != 4 or f.shape[0] != batch:
            raise ValueError(
                f"feature map {i}: expected a CPU {dtype} (B={batch}, C, H, W) tensor, got "
                f"{f.dtype} {tuple(f.shape)} on {f.device}"
            )
    total = sum(int(f.shape[1]) for f in maps)
    if (
        matrix_t.dtype != dtype
        or matrix_t.ndim != 2
        or matrix_t.shape[0] != total
        or matrix_t.device.type != "cpu"
        or not matrix_t.is_contiguous()
    ):
        raise ValueError(
            f"matrix_t must be a contiguous CPU {dtype} ({total}, r) tensor (the folded matrix transposed), "
            f"got {matrix_t.dtype} {tuple(matrix_t.shape)}"
        )
    r = matrix_t.shape[1]
    if q.dtype != dtype or tuple(q.shape) != (r,) or not q.is_contiguous() or q.device.type != "cpu":
        raise ValueError(f"q must be a contiguous CPU {dtype} ({r},) tensor, got {q.dtype} {tuple(q.shape)}")
    if out is not None:
        h0, w0 = maps[0].shape[2:]
        if (
            out.dtype != dtype
            or tuple(out.shape) != (batch, h0, w0)
            or not out.is_contiguous()
            or out.device.type != "cpu"
        ):
            raise ValueError(
                f"out must be a contiguous CPU {dtype} {(batch, h0, w0)} tensor, got {out.dtype} {tuple(out.shape)}"
            )


def gemm_operand(
    matrix: torch.Tensor, second: torch.Tensor, params: tuple, matrix_t: torch.Tensor, dtype: torch.dtype
) -> Optional[torch.Tensor]:
    """``matrix_t`` in the reduced GEMM dtype (crd_fast.core.precision.head_gemm_dtype, float32 maps only;
    docs/DESIGN.md "Compute precision"), cast once per (matrix, offset or q) pair and cached with the folds under
    the op's fold ``params``; None when the GEMM runs in ``dtype`` itself."""
    gemm = current_head_gemm_dtype() if dtype == torch.float32 else None
    if gemm is None:
        return None

    def cast() -> tuple[torch.Tensor, torch.Tensor]:
        return matrix_t.to(gemm).contiguous(), matrix_t.new_empty(0)

    return FOLDS.get(matrix, second, (*params, "gemm operand", gemm), cast, torch.device("cpu"))[0]


def bf16_pass_available() -> bool:
    """True when the compiled module has the pass over bfloat16 projections (a module built before it lacks it)."""
    return _crd_head_cpu is not None and hasattr(_crd_head_cpu, "fused_pass_bf16")


def bf16_isa() -> Optional[str]:
    """Instruction set the bf16 pass runs here ("avx512", "avx2" or "baseline"); None when it is not built."""
    return str(_crd_head_cpu.bf16_isa()) if bf16_pass_available() else None


def _project_layers(
    maps: Sequence[torch.Tensor], matrix_t: torch.Tensor, geom: Geometry, gemm_matrix_t: Optional[torch.Tensor] = None
) -> list[torch.Tensor]:
    """Z_l = F_l^T P'_l^T per layer, (B H_l W_l, r) rows: one BLAS call each, at the layer's own resolution.

    Under crd_fast.core.precision.head_gemm_dtype (float32 maps only) the GEMM runs in bf16/fp16 with float32
    accumulation (oneDNN). A bf16 result stays bf16 when the compiled bf16 pass reads it (no float32 copy of the
    projections, docs/DESIGN.md "Compute precision"); an fp16 one is taken to float32 for the float32 pass.
    ``gemm_matrix_t`` is ``matrix_t`` already in the GEMM dtype (the op caches it); else it is cast here.
    """
    dtype = maps[0].dtype
    gemm = current_head_gemm_dtype() if dtype == torch.float32 else None
    weight = matrix_t
    if gemm is not None:
        usable = gemm_matrix_t is not None and gemm_matrix_t.dtype == gemm and gemm_matrix_t.shape == matrix_t.shape
        weight = gemm_matrix_t if usable else matrix_t.to(gemm)
    keep = gemm == torch.bfloat16 and bf16_pass_available()
    projected = []
    for f, off, c in zip(maps, geom.offsets, geom.channels):
        # one BLAS call per layer: (B H_l W_l, C_l) channels-last rows times the (C_l, r) block of P'^T. The
        # permute is free for channels_last maps; an NCHW map (or the cast to the GEMM dtype) costs one copy.
        if gemm is not None:
            f = f.to(dtype=gemm, memory_format=torch.channels_last)
        rows = f.permute(0, 2, 3, 1).reshape(-1, c)
        z = torch.mm(rows, weight[off : off + c])
        projected.append(z if gemm is None or keep else z.float())
    return projected


def _run_pass(
    maps: Sequence[torch.Tensor],
    matrix_t: torch.Tensor,
    q: torch.Tensor,
    out: torch.Tensor,
    geom: Geometry,
    num_threads: Optional[int],
    residual: bool,
    gemm_matrix_t: Optional[torch.Tensor],
) -> None:
    """Project each layer (BLAS), then run one compiled pass (norm or residual) over the output grid into ``out``."""
    assert _crd_head_cpu is not None
    dtype = maps[0].dtype
    h0, w0 = geom.out_size
    plan, weights = tables(geom, dtype, torch.device("cpu"))
    projected = _project_layers(maps, matrix_t, geom, gemm_matrix_t)
    threads = torch.get_num_threads() if num_threads is None else int(num_threads)
    args = (
        [z.data_ptr() for z in projected],
        plan.data_ptr(),
        weights.data_ptr(),
        q.data_ptr(),
        out.data_ptr(),
        geom.batch,
        h0,
        w0,
        int(matrix_t.shape[1]),
        max(s[1] for s in geom.sizes),
        threads,
    )
    if projected[0].dtype == torch.bfloat16:  # float32 arithmetic on bf16 projections, widened on load
        _crd_head_cpu.fused_pass_bf16(*args, residual)
    elif residual:
        _crd_head_cpu.fused_residual_pass(_REAL[dtype], *args)
    else:
        _crd_head_cpu.fused_pass(_REAL[dtype], *args)


def fused_head_cpu(
    maps: Sequence[torch.Tensor],
    matrix_t: torch.Tensor,
    q: torch.Tensor,
    out: Optional[torch.Tensor] = None,
    num_threads: Optional[int] = None,
    gemm_matrix_t: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """(B, H_0, W_0) scores ||P' e - q|| of the concat-space embeddings e of ``maps``.

    ``matrix_t`` is the folded P' transposed, a contiguous (sum C_l, r) tensor, and ``q`` = P mu
    (crd_fast.ops.plan.folded_operands(..., transposed=True)), both in the maps' dtype; ``out``
    (optional) is filled in place. Maps may be NCHW or channels_last: channels_last skips one copy.
    ``gemm_matrix_t`` (optional) is ``matrix_t`` cast to the dtype of crd_fast.core.precision.head_gemm_dtype,
    when the caller caches it; else a bf16/fp16 GEMM casts ``matrix_t`` per call.
    ``crd_fast.ops.crd_head`` is the checked, converting entry point.
    """
    if _crd_head_cpu is None:
        raise RuntimeError(f"the CPU fused pass is not built: {_IMPORT_ERROR}")
    _check(maps, matrix_t, q, out)
    geom = geometry_of(maps)
    dtype = maps[0].dtype
    batch, (h0, w0) = geom.batch, geom.out_size
    r = int(matrix_t.shape[1])
    if out is None:
        out = torch.empty((batch, h0, w0), dtype=dtype)
    if batch == 0 or r == 0:
        return out.zero_()  # an empty batch, or a rank-0 matrix: every score is ||0|| = 0
    _run_pass(maps, matrix_t, q, out, geom, num_threads, False, gemm_matrix_t)
    return out


def residual_available() -> bool:
    """True when the compiled module has the residual pass (a module built before it lacks it)."""
    return _crd_head_cpu is not None and hasattr(_crd_head_cpu, "fused_residual_pass")


def fused_residual_cpu(
    maps: Sequence[torch.Tensor],
    matrix_t: torch.Tensor,
    q: torch.Tensor,
    num_threads: Optional[int] = None,
    gemm_matrix_t: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """(B, H_0, W_0, r) residual vectors P' e_(y, x) - q[y, x] of the concat-space embeddings of ``maps``.

    As :func:`fused_head_cpu` without the norm, with one offset per grid position: ``q`` is a contiguous
    (H_0, W_0, r) tensor in the maps' dtype (the local head's q_p = matrix mu_p, docs/DESIGN.md "Position-aware
    CRD"). ``crd_fast.ops.crd_residual`` is the checked, converting entry point.
    """
    if not residual_available():
        raise RuntimeError(f"the CPU fused residual pass is not built: {_IMPORT_ERROR or 'module predates it'}")
    if len(maps) == 0:
        raise ValueError("at least one feature map is needed")
    h0, w0 = (int(s) for s in maps[0].shape[2:])
    r = int(matrix_t.shape[1]) if matrix_t.ndim == 2 else -1
    if q.dtype != maps[0].dtype or tuple(q.shape) != (h0, w0, r) or not q.is_contiguous() or q.device.type != "cpu":
        raise ValueError(
            f"q must be a contiguous CPU {maps[0].dtype} {(h0, w0, r)} tensor, got {q.dtype} {tuple(q.shape)}"
        )
    _check(maps, matrix_t, q[0, 0], None)  # q[0, 0] is one (r,) offset: the shared checks of the norm pass
    geom = geometry_of(maps)
    dtype = maps[0].dtype
    batch = geom.batch
    out = torch.empty((batch, h0, w0, r), dtype=dtype)
    if batch == 0 or r == 0:
        return out
    _run_pass(maps, matrix_t, q, out, geom, num_threads, True, gemm_matrix_t)
    return out
