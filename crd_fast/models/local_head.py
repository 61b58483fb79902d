"""LocalCRDHead: backbone feature maps -> position-aware ("local") CRD patch scores, as an exportable torch module.

The local model (crd_fast/core/local.py) in the eigenbasis of the pooled covariance C = U diag(s) U^T, with
inv_b = 1 / (a s + lam), S_p = U^T V_p sqrt((1 - a) E_p) and K_p = (I + S_p^T diag(inv_b) S_p)^-1, scores a patch
y at grid position p as (docs/DESIGN.md "Position-aware CRD")

    main  = M y - q_p,            M = lam diag(inv_b) U^T  (d x d, shared),   q_p = M mu_p
    score = || main - inv_b * (S_p K_p S_p^T main) ||.

``M y`` is the global head's projection (any d x d matrix: each layer projected first, then pooled and resized,
docs/DESIGN.md "Linearity"; the code is shared with CRDHead), ``q_p`` a per-position offset and the rest a
rank-k correction per patch (batched matmuls over the P positions).

With ``use_fused`` set, eager calls on CPU and CUDA tensors compute ``M y - q_p`` with the fused op
``crd_fast.ops.crd_residual`` (CPU: the Cython pass in its residual mode; CUDA: the residual kernels, or the
reference where the per-device decision says so, docs/GPU.md); elsewhere (other devices, tracing, export) the
pure-torch path runs. The correction and the norm are torch in both. On CUDA, float16 / bfloat16 maps are
tensor-core operands of the residual kernels (float32 accumulation and output), as in CRDHead.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..core.dtypes import compute_dtype
from ..core.embedding import check_embedding
from ..core.finite import all_finite
from ..core.local import LocalCRDModel
from ..ops import crd_residual as fused_crd_residual
from .head import _exporting, folded_blocks, folded_matrix, project_feature_maps


def _square_grid(positions: int) -> tuple[int, int]:
    side = math.isqrt(positions)
    if side * side != positions:
        raise ValueError(f"the model has {positions} positions, not a square grid: pass grid=(h, w)")
    return side, side


#: Devices whose eager calls take the fused residual op (it has a kernel for each).
FUSED_DEVICES = ("cpu", "cuda")


def _refresh_after_load(module: "LocalCRDHead", _incompatible_keys: object) -> None:
    """load_state_dict post-hook (a module-level function, so the head still pickles and deep-copies)."""
    module._refresh_offset_rows()


class LocalCRDHead(nn.Module):
    """The local CRD head: feature maps (one per layer) -> (B, h, w) patch scores on the first layer's grid.

    Build it with :meth:`from_model`. Buffers (in ``dtype``, float32 by default; all folded in float64):
    ``matrix`` M (d, d), ``folded`` M with the embedding folded in (d, sum C) as CRDHead's, ``offsets`` q_p
    laid out (d, h, w) on the patch grid, ``vectors`` S (P, d, k), ``inner`` K (P, k, k), ``inv_b`` (d,).

    Scores are float64 for float64 maps and float32 otherwise (the rule of crd_fast/core/dtypes.py); a float64
    head (``dtype=torch.float64``) scores float64 maps with float64 operands throughout.
    """

    def __init__(
        self,
        matrix: torch.Tensor,
        means: torch.Tensor,
        inv_b: torch.Tensor,
        vectors: torch.Tensor,
        inner: torch.Tensor,
        grid: tuple[int, int],
        embedding: str = "concat",
        target_dim: int = 1024,
        layer_channels: Optional[Sequence[int]] = None,
        use_fused: bool = True,
        dtype: torch.dtype = torch.float32,
        lam: Optional[float] = None,
    ) -> None:
        super().__init__()
        check_embedding(embedding)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        d = int(matrix.shape[0]) if matrix.ndim == 2 else -1
        p = int(means.shape[0]) if means.ndim == 2 else -1
        k = int(vectors.shape[2]) if vectors.ndim == 3 else -1
        if (
            matrix.ndim != 2
            or matrix.shape[1] != d
            or means.shape != (p, d)
            or inv_b.shape != (d,)
            or vectors.shape != (p, d, k)
            or inner.shape != (p, k, k)
        ):
            raise ValueError(
                "expected matrix (d, d), means (P, d), inv_b (d,), vectors (P, d, k), inner (P, k, k); got "
                f"{tuple(matrix.shape)}, {tuple(means.shape)}, {tuple(inv_b.shape)}, {tuple(vectors.shape)}, "
                f"{tuple(inner.shape)}"
            )
        h, w = (int(grid[0]), int(grid[1]))
        if h * w != p:
            raise ValueError(f"grid {h}x{w} has {h * w} positions, the model has {p}")
        if embedding == "patchcore" and layer_channels is None:
            raise ValueError(
                "the patchcore embedding needs layer_channels to fold its channel reduction into the matrix"
            )
        for name, t in (("matrix", matrix), ("means", means), ("inv_b", inv_b), ("vectors", vectors), ("inner", inner)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"the local model's {name} holds NaN or infinite values")
        self.embedding = embedding
        self.target_dim = int(target_dim)
        self.use_fused = bool(use_fused)
        self.layer_channels = None if layer_channels is None else [int(c) for c in layer_channels]
        self.grid = (h, w)
        self._shape = (d, p, k)  # python ints: traced as constants without warnings
        self.lam = None if lam is None else float(lam)
        m64 = matrix.detach().to(torch.float64)
        q64 = means.detach().to(device=m64.device, dtype=torch.float64) @ m64.T  # (P, d): q_p = M mu_p
        folded = m64 if self.layer_channels is None else folded_matrix(m64, self.layer_channels, embedding, target_dim)
        self.register_buffer("matrix", m64.to(dtype).contiguous())
        self.register_buffer("folded", folded.to(dtype).contiguous())
        self.register_buffer("offsets", q64.T.reshape(d, h, w).to(dtype).contiguous())
        # the same offsets as (P, d) rows for the fused op: derived, not saved; refreshed when a state dict is loaded
        self.register_buffer("offset_rows", q64.to(dtype).contiguous(), persistent=False)
        self.register_load_state_dict_post_hook(_refresh_after_load)
        self.register_buffer("vectors", vectors.detach().to(device=m64.device, dtype=dtype).contiguous())
        k64 = inner.detach().to(device=m64.device, dtype=torch.float64)
        self.register_buffer("inner", (0.5 * (k64 + k64.transpose(1, 2))).to(dtype).contiguous())  # exactly symmetric
        self.register_buffer("inv_b", inv_b.detach().to(device=m64.device, dtype=dtype).contiguous())

    @classmethod
    def from_model(
        cls,
        model: LocalCRDModel,
        lam_rel: float,
        embedding: str = "concat",
        target_dim: int = 1024,
        layer_channels: Optional[Sequence[int]] = None,
        use_fused: bool = True,
        grid: Optional[tuple[int, int]] = None,
        dtype: torch.dtype = torch.float32,
    ) -> "LocalCRDHead":
        """The head of a fitted local model at lam = lam_rel * trace(C) / d.

        ``grid`` is the (h, w) patch grid the model's P = h w positions lie on, row-major (default: a square
        grid). ``dtype`` is the buffers' dtype (float64 keeps the model's float64 values, for float64 scoring).
        """
        lam = model.lam(lam_rel)
        factors = model.factors(lam)
        matrix = (lam * factors.inv_b)[:, None] * model.eigenvectors.T  # lam diag(inv_b) U^T
        return cls(
            matrix,
            model.means,
            factors.inv_b,
            model.scaled_vectors,
            factors.k,
            _square_grid(model.positions) if grid is None else grid,
            embedding,
            target_dim,
            layer_channels,
            use_fused,
            dtype,
            lam,
        )

    def _refresh_offset_rows(self) -> None:
        with torch.no_grad():
            self.offset_rows = self.offsets.reshape(self.dim, self.positions).T.contiguous()

    @property
    def dim(self) -> int:
        return self._shape[0]

    @property
    def rank(self) -> int:
        """k, the rank of the per-position part."""
        return self._shape[2]

    @property
    def positions(self) -> int:
        return self._shape[1]

    def _check_maps(self, maps: list[torch.Tensor]) -> None:
        if not maps:
            raise ValueError("at least one feature map is needed")
        for i, f in enumerate(maps):
            if not isinstance(f, torch.Tensor) or f.ndim != 4:
                shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
                raise ValueError(f"feature map {i} must be a (B, C, H, W) tensor, got {shape}")
        channels = [int(f.shape[1]) for f in maps]
        if self.layer_channels is not None and channels != self.layer_channels:
            raise ValueError(f"feature maps have {channels} channels, the head was built for {self.layer_channels}")
        if sum(channels) != self.folded.shape[1]:
            raise ValueError(
                f"feature maps have {sum(channels)} channels in all, the head expects {self.folded.shape[1]}"
            )
        h, w = int(maps[0].shape[2]), int(maps[0].shape[3])
        if (h, w) != self.grid:
            raise ValueError(
                f"the first feature map gives a {h}x{w} patch grid ({h * w} positions); the local head was fitted "
                f"on a {self.grid[0]}x{self.grid[1]} grid ({self.positions} positions): use the same input size"
            )

    def forward(self, feature_maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """List of (B, C_l, H_l, W_l) maps -> (B, h, w) patch scores (float64 for float64 maps, else float32)."""
        maps = list(feature_maps)
        self._check_maps(maps)
        if self.use_fused and not _exporting() and maps[0].device.type in FUSED_DEVICES:
            scores = self.fused_forward(maps)
        else:
            scores = self.torch_forward(maps)
        if not _exporting() and not all_finite(scores):
            raise ValueError("the local head produced NaN or infinite scores: the feature maps hold NaN or infinity")
        return scores

    def torch_forward(self, feature_maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """The pure-torch (exportable) path: CRDHead's projection, minus q_p, rank-k correction, norm."""
        maps = list(feature_maps)
        self._check_maps(maps)
        dtype = compute_dtype(maps[0].dtype)
        maps = [f.to(dtype) for f in maps]
        total = project_feature_maps(maps, self.folded, self.layer_channels)  # (B, d, h, w)
        main = total - self.offsets.to(dtype)[None]
        b = main.shape[0]
        # (P, B, d), made contiguous: batched matmuls on the strided permute run several times slower
        rows = main.reshape(b, self.dim, self.positions).permute(2, 0, 1).contiguous()
        return self._correct_and_norm(rows).T.reshape(b, self.grid[0], self.grid[1])

    def fused_forward(self, feature_maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """The eager path: the fused residual op for M y - q_p, then the same correction and norm in torch."""
        maps = list(feature_maps)
        self._check_maps(maps)
        residual = fused_crd_residual(maps, self.folded, self.offset_rows, "concat", self.target_dim)
        b = residual.shape[0]
        rows = residual.reshape(b, self.positions, self.dim).transpose(0, 1)  # (P, B, d)
        return self._correct_and_norm(rows).T.reshape(b, self.grid[0], self.grid[1])

    def _correct_and_norm(self, main: torch.Tensor) -> torch.Tensor:
        """|| main - inv_b * (S_p K_p S_p^T main) || for (P, B, d) residual rows -> (P, B)."""
        dtype = main.dtype
        vectors, inner, inv_b = self.vectors.to(dtype), self.inner.to(dtype), self.inv_b.to(dtype)
        t = torch.matmul(main, vectors)  # (P, B, k): S_p^T main
        c = torch.matmul(t, inner)  # K_p t (K_p is symmetric)
        # einsum rather than a matmul with S_p^T: an exported graph then holds S once, not also a transposed copy
        corrected = main - torch.einsum("pbk,pdk->pbd", c, vectors) * inv_b
        return corrected.square().sum(dim=-1).sqrt()

    def half_weights(self) -> list[torch.Tensor]:
        """The weights an fp16 ONNX export stores in float16: the folded matrix's layer blocks, S and K (q_p and
        inv_b stay float32: q_p is subtracted from M y, a cancellation, and both are small next to S)."""
        return folded_blocks(self.folded, self.layer_channels) + [self.vectors, self.inner]

    def extra_repr(self) -> str:
        return (
            f"embedding={self.embedding!r}, d={self.dim}, k={self.rank}, grid={self.grid}, "
            f"layer_channels={self.layer_channels}, use_fused={self.use_fused}"
        )
