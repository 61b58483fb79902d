"""The head plan: the indexing tables and folded operands that every fused kernel reads.

Both the CPU fused pass (csrc/cpu/crd_head.pyx) and the CUDA kernels (csrc/cuda/crd_head_kernels.cuh)
take the same two tables built here, so their spatial indexing is one piece of code:

* 3x3 average pooling (zero padding counted) and bilinear resizing (align_corners=False) are both
  separable, so the composite "pool, then resize to the first layer's grid" of layer l is
  A_l = R_y P_y (x) R_x P_x: a (H_0 x H_l) matrix along y and a (W_0 x W_l) one along x. Every row of
  these matrices is a band of at most 4 contiguous taps (2 bilinear taps widened by the 3-tap pool).
  The matrices are computed by running torch's own avg_pool / interpolate on identity inputs, so they
  are exactly the reference's maps, not a re-derivation of its index formulas.

* ``plan`` (int32) = L layer headers (C_l, H_l, W_l, channel offset_l), then for each layer
  H_0 + W_0 (start, count) pairs: rows 0..H_0-1 for y, then W_0 rows for x.
  ``weights`` (float32 / float64) = for each layer, the same H_0 + W_0 rows of 4 tap weights (zero padded).

* Matrix folding (docs/DESIGN.md "Linearity"): the PatchCore reduction is linear, y_pc = R y_concat, so
  ||P (R y - mu)|| = ||(P R) y - P mu||; the kernels always see concat-space operands P' = P R (r x sum C_l)
  and q = P mu, computed once in float64 and cached per matrix.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..core.embedding import EMBEDDINGS, patchcore_reduce
from . import streams

#: Most taps one output row/column reads from one layer (2 bilinear taps, each widened by the 3-tap pool).
MAX_TAPS = 4
#: Ints per layer header in ``plan``.
HEADER = 4


def axis_matrix(n_src: int, n_out: int) -> torch.Tensor:
    """(n_out, n_src) float64 matrix of "3-tap average pool (zero pad counted), then bilinear resize" on one axis."""
    if n_src < 1 or n_out < 1:
        raise ValueError(f"axis sizes must be positive, got n_src={n_src}, n_out={n_out}")
    eye = torch.eye(n_src, dtype=torch.float64)
    # channel c of this (1, n_src, n_src, 1) image is the unit impulse at row c.
    impulses = eye[None, :, :, None]
    pooled = F.avg_pool2d(impulses, kernel_size=(3, 1), stride=1, padding=(1, 0), count_include_pad=True)
    if n_src != n_out:  # the reference skips the resize when the grid already matches
        pooled = F.interpolate(pooled, size=(n_out, 1), mode="bilinear", align_corners=False)
    return pooled[0, :, :, 0].T.contiguous()  # [o, c] = response at output o to an impulse at c


def axis_taps(n_src: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Band form of ``axis_matrix``: (n_out, 2) int32 (start, count) and (n_out, 4) float64 weights."""
    a = axis_matrix(n_src, n_out)
    idx = torch.zeros((n_out, 2), dtype=torch.int32)
    w = torch.zeros((n_out, MAX_TAPS), dtype=torch.float64)
    for o in range(n_out):
        nz = torch.nonzero(a[o]).flatten()
        start, stop = int(nz.min()), int(nz.max()) + 1
        if stop - start > MAX_TAPS:  # cannot happen for 2-tap bilinear after a 3-tap pool
            raise AssertionError(f"axis band of {stop - start} taps (n_src={n_src}, n_out={n_out})")
        idx[o, 0], idx[o, 1] = start, stop - start
        w[o, : stop - start] = a[o, start:stop]
    return idx, w


@dataclass(frozen=True)
class Geometry:
    """Shapes of one head call: per-layer (C, H, W), the output grid and the batch."""

    channels: tuple[int, ...]
    sizes: tuple[tuple[int, int], ...]
    batch: int

    @property
    def out_size(self) -> tuple[int, int]:
        return self.sizes[0]

    @property
    def num_layers(self) -> int:
        return len(self.channels)

    @property
    def total_channels(self) -> int:
        return int(sum(self.channels))

    @property
    def offsets(self) -> tuple[int, ...]:
        out, acc = [], 0
        for c in self.channels:
            out.append(acc)
            acc += c
        return tuple(out)


def geometry_of(feature_maps: Sequence[torch.Tensor]) -> Geometry:
    return Geometry(
        channels=tuple(int(f.shape[1]) for f in feature_maps),
        sizes=tuple((int(f.shape[2]), int(f.shape[3])) for f in feature_maps),
        batch=int(feature_maps[0].shape[0]),
    )


def build_tables(geom: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``plan`` (int32) and float64 ``weights`` tables of the module docstring, on the CPU."""
    h0, w0 = geom.out_size
    headers, taps, weights = [], [], []
    for (c, (h, w)), off in zip(zip(geom.channels, geom.sizes), geom.offsets):
        headers.append(torch.tensor([c, h, w, off], dtype=torch.int32))
        iy, wy = axis_taps(h, h0)
        ix, wx = axis_taps(w, w0)
        taps.append(torch.cat([iy, ix]).flatten())
        weights.append(torch.cat([wy, wx]).flatten())
    plan = torch.cat(headers + taps).contiguous()
    return plan, torch.cat(weights).contiguous()


class _TableCache:
    """Tables per (geometry without batch, weight dtype, device): tiny, built once per shape.

    Device entries follow the stream rules of crd_fast/ops/streams.py (complete when made, kept alive
    for other streams, never made inside CUDA-graph capture).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tables: dict[tuple, tuple[tuple[torch.Tensor, torch.Tensor], Optional[int]]] = {}

    def get(self, geom: Geometry, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (geom.channels, geom.sizes, dtype, str(device))
        with self._lock:
            hit = self._tables.get(key)
        if hit is not None:
            streams.before_use(hit[0], device, hit[1])
            return hit[0]
        streams.before_create(device, "plan tables")
        plan, weights = build_tables(geom)
        value = (plan.to(device), weights.to(device=device, dtype=dtype))
        origin = streams.after_create(device)
        with self._lock:
            if len(self._tables) > 64:  # shapes are few in practice; bound it anyway
                self._tables.clear()
            self._tables[key] = (value, origin)
        return value

    def __contains__(self, key: tuple) -> bool:
        with self._lock:
            return key in self._tables

    def clear(self) -> None:
        with self._lock:
            self._tables.clear()


_TABLES = _TableCache()


def tables(geom: Geometry, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached (plan int32, weights ``dtype``) on ``device`` for this geometry."""
    return _TABLES.get(geom, dtype, device)


def reduction_matrix(channels: Sequence[int], target_dim: int) -> torch.Tensor:
    """R (target_dim x sum C) in float64 with patchcore_reduce(y) = R y, from the reference function itself."""
    total = int(sum(channels))
    eye = torch.eye(total, dtype=torch.float64)
    return patchcore_reduce(eye, list(channels), target_dim).T.contiguous()


def fold_matrix(
    matrix: torch.Tensor, offset: torch.Tensor, channels: Sequence[int], embedding: str, target_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P', q) in float64 on the matrix's device: P' = P (concat) or P R (patchcore), q = P mu."""
    if embedding not in EMBEDDINGS:
        raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")
    p = matrix.to(torch.float64)
    q = p @ offset.to(device=p.device, dtype=torch.float64)
    if embedding == "patchcore":
        p = p @ reduction_matrix(channels, target_dim).to(p.device)
    return p.contiguous(), q.contiguous()


class _FoldCache:
    """Folded, cast operands per (matrix, offset) tensor pair, invalidated when either changes in place.

    Folding costs a (r x d x sum C) product and a cast of the whole matrix; a head calls the op with the
    same model tensors every batch, so this is done once. Entries hold weak references: a freed matrix
    never matches a new one that happens to reuse its memory.
    """

    def __init__(self, size: int = 8) -> None:
        self._lock = threading.Lock()
        self._size = size
        self._entries: list[tuple[tuple, weakref.ref, weakref.ref, tuple[torch.Tensor, torch.Tensor], Optional[int]]]
        self._entries = []

    def get(
        self,
        matrix: torch.Tensor,
        offset: torch.Tensor,
        params: tuple,
        compute: Callable[[], tuple[torch.Tensor, torch.Tensor]],
        device: Optional[torch.device] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached value for (``matrix``, ``offset``, ``params``), else ``compute()`` (cached when possible).

        ``device`` (default: the matrix's) is where the value lives; its entries follow the stream rules of
        crd_fast/ops/streams.py.
        """
        device = matrix.device if device is None else torch.device(device)
        key = (matrix._version, offset._version, matrix.data_ptr(), offset.data_ptr(), tuple(matrix.shape), params)
        with self._lock:
            for k, mref, oref, value, origin in self._entries:
                if k == key and mref() is matrix and oref() is offset:
                    streams.before_use(value, device, origin)
                    return value
        streams.before_create(device, "folded matrix")
        value = compute()
        origin = streams.after_create(device)
        try:
            entry = (key, weakref.ref(matrix), weakref.ref(offset), value, origin)
        except TypeError:  # some tensor subclasses refuse weak references: just do not cache
            return value
        with self._lock:
            self._entries.insert(0, entry)
            del self._entries[self._size :]
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


FOLDS = _FoldCache()


def folded_operands(
    matrix: torch.Tensor,
    offset: torch.Tensor,
    channels: tuple[int, ...],
    embedding: str,
    target_dim: int,
    dtype: torch.dtype,
    acc_dtype: Optional[torch.dtype] = None,
    transposed: bool = False,
    device: Optional[torch.device] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached (P' in ``dtype``, q in ``acc_dtype``) for the kernels, contiguous, on ``device``.

    P' is (r, sum C_l), or (sum C_l, r) with ``transposed`` (the CPU path's BLAS layout). ``device``
    defaults to the matrix's device.
    """
    dev = matrix.device if device is None else torch.device(device)
    acc = acc_dtype or dtype

    def fold() -> tuple[torch.Tensor, torch.Tensor]:
        p, q = fold_matrix(matrix.detach(), offset.detach(), channels, embedding, target_dim)
        if transposed:
            p = p.T
        return p.to(device=dev, dtype=dtype).contiguous(), q.to(device=dev, dtype=acc).contiguous()

    params = (channels, embedding, int(target_dim), dtype, acc, bool(transposed), str(dev))
    return FOLDS.get(matrix, offset, params, fold, dev)
