"""Head files of the position-aware ("local") CRD: what scoring needs, matrices in a storage precision.

The global head file (crd_fast/models/head_file.py, kind ``"crd_head"``) holds one projection matrix. The local
model (crd_fast/core/local.py) scores a patch y at grid position p, in the eigenbasis of the pooled covariance
C = U diag(s) U^T (docs/DESIGN.md "Position-aware CRD"), as

    main  = M (y - mu_p),     M = lam diag(inv_b) U^T,     inv_b = 1 / (a s + lam)
    score = || main - inv_b * (S_p K_p S_p^T main) ||,     K_p = (I + S_p^T diag(inv_b) S_p)^-1,

so a *local head file* (model-file kind ``"local_crd_head"``) holds

    matrix   (d, d)     M, in the storage precision (|entries| <= 1)
    vectors  (P, d, k)  S_p = U^T V_p sqrt((1 - a) E_p), in the storage precision
    inner    (P, k, k)  K_p, in the storage precision (exactly symmetric; eigenvalues in (0, 1])
    means    (P, d)     mu_p, float64 (subtracted from M y as q_p = M mu_p: cancellation, so never rounded)
    inv_b    (d,)       float64 (a diagonal scale of d numbers, not worth rounding)

plus metadata (precision, rank, lam, lam_rel, shrinkage, the patch grid and, when made from a detector, the
detector's metadata, as for the global head file). K_p is computed in float64 from the *stored* S_p, so the file
is the exact Woodbury form of the model with the stored vectors up to the rounding of K_p and M alone.

``rank`` means something else here than for the global head: a local head of rank r keeps the top-r per-position
directions (the first r columns of S_p, which come in descending order of C_p's eigenvalues) with K_p recomputed
for them: exactly the local model fitted at rank r. The shared d x d matrix stays full rank; the global head's
rank-r truncation of that matrix has no local counterpart and is refused.

Scoring (:meth:`LocalDeployHead.score`) computes in float32 by default, the way the exported head does;
float16 is a storage format only. ``crd_fast.deploy.measure_local_error`` (crd_fast/deploy/head_errors.py) reports
what a variant costs against the exact float64 model; crd_fast/deploy/head_files.py makes and reads head files of
any scoring model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from ..core.local import MAX_DIM, MAX_IMAGES, MAX_POSITIONS, LocalCRDModel
from ..io.model_file import PathLike, read_model_file, require, write_model_file
from ..scorers.local import LocalCRDScorer
from .head_file import PRECISIONS, check_precision, weights_file_of
from .local_head import LocalCRDHead

LOCAL_HEAD_KIND = "local_crd_head"
_TENSORS = ("matrix", "means", "inv_b", "vectors", "inner")


def _check_rank(rank: Optional[int], top: int) -> Optional[int]:
    if rank is None:
        return None
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= top:
        raise ValueError(
            f"rank of a local head must be an integer in [1, {top}] (the per-position directions the model keeps) "
            f"or None, got {rank!r}"
        )
    return rank


def truncated_model(model: LocalCRDModel, rank: Optional[int]) -> LocalCRDModel:
    """The local model with only the top-``rank`` per-position directions (None or the model's k: unchanged)."""
    rank = _check_rank(rank, model.rank)
    if rank is None or rank == model.rank:
        return model
    return dataclasses.replace(model, scaled_vectors=model.scaled_vectors[:, :, :rank].contiguous())


def _round(name: str, tensor: torch.Tensor, precision: str) -> torch.Tensor:
    """``tensor`` rounded to ``precision``, returned as float64 holding exactly the stored values."""
    stored = tensor.to(check_precision(precision))
    if not bool(torch.isfinite(stored).all()):
        raise ValueError(
            f"the local head's {name} does not fit in {precision} (entries up to {float(tensor.abs().max()):.3g}): "
            "store it in a wider precision or scale the features down"
        )
    return stored.to(torch.float64)


def _inner(vectors: torch.Tensor, inv_b: torch.Tensor) -> torch.Tensor:
    """K_p = (I + S_p^T diag(inv_b) S_p)^-1 in float64, exactly symmetric."""
    gram = vectors.transpose(1, 2) @ (inv_b[None, :, None] * vectors)
    eye = torch.eye(vectors.shape[2], dtype=torch.float64)
    k = torch.linalg.inv(eye + 0.5 * (gram + gram.transpose(1, 2)))
    return 0.5 * (k + k.transpose(1, 2))


def _square_grid(positions: int) -> Optional[tuple[int, int]]:
    side = math.isqrt(positions)
    return (side, side) if side * side == positions else None


@dataclass
class LocalDeployHead:
    """A scoring-only local CRD head: what a local head file holds (see the module docstring).

    ``matrix``, ``vectors`` and ``inner`` are float64 holding exactly the stored values of the storage
    ``precision``. ``rank`` is the number of per-position directions kept (k); ``model_rank`` the source model's.
    """

    matrix: torch.Tensor
    means: torch.Tensor
    inv_b: torch.Tensor
    vectors: torch.Tensor
    inner: torch.Tensor
    lam: float
    lam_rel: float
    shrinkage: float
    grid: Optional[tuple[int, int]]  # the (h, w) patch grid; None when unknown (P not square, no detector)
    precision: str = "fp64"
    model_rank: int = 0
    n_images: int = 0
    detector: Optional[dict[str, Any]] = field(default=None)  # the source detector's metadata, when known

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_model(
        cls,
        model: LocalCRDModel,
        lam_rel: float,
        precision: str = "fp64",
        rank: Optional[int] = None,
        grid: Optional[tuple[int, int]] = None,
        detector: Optional[dict[str, Any]] = None,
        n_images: int = 0,
    ) -> "LocalDeployHead":
        """The head of a local model at lam = lam_rel * trace(C) / d, keeping the top-``rank`` per-position
        directions (None: all k), with M, S_p and K_p stored in ``precision``. ``grid``: the (h, w) patch grid of
        the P positions (default: the detector's ``patch_grid``, else square when P is a square, else unknown)."""
        check_precision(precision)
        truncated = truncated_model(model, rank)
        lam = truncated.lam(lam_rel)
        inv_b = 1.0 / (truncated.shrinkage * truncated.eigenvalues + lam)
        matrix = _round("matrix", (lam * inv_b)[:, None] * truncated.eigenvectors.T, precision)
        vectors = _round("vectors", truncated.scaled_vectors, precision)
        inner = _round("inner", _inner(vectors, inv_b), precision)
        if grid is None:
            grid = tuple(detector["patch_grid"]) if detector and detector.get("patch_grid") else None
        grid = _square_grid(model.positions) if grid is None else (int(grid[0]), int(grid[1]))
        if grid is not None and grid[0] * grid[1] != model.positions:
            raise ValueError(
                f"grid {grid[0]}x{grid[1]} has {grid[0] * grid[1]} positions, the model has {model.positions}"
            )
        return cls(
            matrix=matrix,
            means=truncated.means.to(torch.float64).clone(),
            inv_b=inv_b,
            vectors=vectors,
            inner=inner,
            lam=float(lam),
            lam_rel=float(lam_rel),
            shrinkage=float(truncated.shrinkage),
            grid=grid,
            precision=precision,
            model_rank=model.rank,
            n_images=int(n_images),
            detector=detector,
        )

    @classmethod
    def from_scorer(
        cls,
        scorer: LocalCRDScorer,
        precision: str = "fp64",
        rank: Optional[int] = None,
        detector: Optional[dict[str, Any]] = None,
        grid: Optional[tuple[int, int]] = None,
    ) -> "LocalDeployHead":
        """The head of a fitted LocalCRDScorer at its lam_rel, keeping its top-``rank`` per-position directions
        (None: all of the scorer's rank k; at most k), stored in ``precision``."""
        if not isinstance(scorer, LocalCRDScorer):
            raise TypeError(f"expected a fitted LocalCRDScorer, got {type(scorer).__name__}")
        return cls.from_model(scorer.model(), scorer.lam_rel, precision, rank, grid, detector, scorer.n_images)

    # ---- properties -----------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def positions(self) -> int:
        return int(self.means.shape[0])

    @property
    def rank(self) -> int:
        """k, the per-position directions this head keeps."""
        return int(self.vectors.shape[2])

    def stored_bytes(self) -> int:
        """Bytes of the stored tensors (M, S, K in the storage precision; means and inv_b float64)."""
        item = PRECISIONS[self.precision].itemsize
        return item * (self.matrix.numel() + self.vectors.numel() + self.inner.numel()) + 8 * (
            self.means.numel() + self.inv_b.numel()
        )

    # ---- scoring --------------------------------------------------------------------------------------
    def score(self, grids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Scores (N, P) of (N, P, d) patch grids as deployed: q_p = M mu_p folded in float64, the rest in
        ``dtype`` (float32 by default, as the exported head computes), on the grids' device."""
        expected = (self.positions, self.dim)
        if not isinstance(grids, torch.Tensor) or grids.ndim != 3 or tuple(grids.shape[1:]) != expected:
            shape = tuple(grids.shape) if isinstance(grids, torch.Tensor) else type(grids).__name__
            raise ValueError(f"grids must be an (N, P={self.positions}, d={self.dim}) tensor, got {shape}")
        dev = grids.device
        q = (self.means @ self.matrix.T).to(device=dev, dtype=dtype)  # folded in float64, then cast
        main = grids.to(dtype) @ self.matrix.to(device=dev, dtype=dtype).T - q
        vectors, inner = self.vectors.to(device=dev, dtype=dtype), self.inner.to(device=dev, dtype=dtype)
        t = torch.einsum("npd,pdk->npk", main, vectors)
        c = torch.einsum("npk,pkj->npj", t, inner)
        corrected = main - torch.einsum("npj,pdj->npd", c, vectors) * self.inv_b.to(device=dev, dtype=dtype)
        return torch.linalg.vector_norm(corrected, dim=-1)

    def head(
        self,
        embedding: Optional[str] = None,
        target_dim: Optional[int] = None,
        layer_channels: Optional[Sequence[int]] = None,
        grid: Optional[tuple[int, int]] = None,
        use_fused: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> LocalCRDHead:
        """A LocalCRDHead with exactly the stored values (any precision fits a float64 head; fp32/fp16 a float32
        one). Embedding, target_dim and layer_channels default to the detector metadata's."""
        info = self.detector or {}
        embedding = embedding if embedding is not None else info.get("embedding")
        target_dim = target_dim if target_dim is not None else info.get("target_dim")
        layer_channels = layer_channels if layer_channels is not None else info.get("layer_channels")
        if embedding is None or target_dim is None:
            raise ValueError("this head file has no detector metadata: pass embedding= and target_dim=")
        grid = self.grid if grid is None else grid
        if grid is None:
            raise ValueError(f"this head file does not know its patch grid ({self.positions} positions): pass grid=")
        return LocalCRDHead(
            self.matrix,
            self.means,
            self.inv_b,
            self.vectors,
            self.inner,
            grid,
            embedding,
            int(target_dim),
            layer_channels,
            use_fused,
            dtype,
            self.lam,
        )

    def export_head(
        self, embedding: str, target_dim: int, layer_channels: Sequence[int], rank: Optional[int] = None
    ) -> tuple[LocalCRDHead, dict[str, Any]]:
        """The LocalCRDHead an ONNX export traces (pure-torch path) with exactly the stored values, and what the
        export metadata records about it. ``rank`` has no local form: this file's own per-position rank is kept."""
        if rank is not None:
            raise ValueError(
                f"rank={rank} makes the global head's rank-r W; a local head file has no such form (its own rank "
                "keeps per-position directions: make a local head file with rank= instead)"
            )
        info = self.detector or {}
        grid = tuple(info["patch_grid"]) if info.get("patch_grid") else None  # None: the file's own grid
        head = self.head(embedding, target_dim, layer_channels, grid=grid, use_fused=False).eval()
        facts = {"lam": self.lam, "rank": None, "error_bound": None, "spatial": "local", "local_rank": head.rank}
        return head, {**facts, "head_matrix_precision": self.precision}

    # ---- files ------------------------------------------------------------------------------------------
    def save(self, path: PathLike) -> None:
        """Write a local head file (safetensors + JSON, atomic), M, S and K in the storage precision."""
        dtype = PRECISIONS[self.precision]
        tensors = {
            "matrix": self.matrix.to(dtype),
            "vectors": self.vectors.to(dtype),
            "inner": self.inner.to(dtype),
            "means": self.means.to(torch.float64),
            "inv_b": self.inv_b.to(torch.float64),
        }
        fields = {
            "precision": self.precision,
            "d": self.dim,
            "positions": self.positions,
            "rank": self.rank,
            "model_rank": self.model_rank,
            "grid": None if self.grid is None else list(self.grid),
            "lam": self.lam,
            "lam_rel": self.lam_rel,
            "shrinkage": self.shrinkage,
            "n_images": self.n_images,
            "detector": self.detector,
        }
        write_model_file(
            path,
            LOCAL_HEAD_KIND,
            tensors,
            fields,
            check=type(self).from_file_state,
            inputs=weights_file_of(self.detector),
        )

    @classmethod
    def load(
        cls, path: PathLike, precision: Optional[str] = None, rank: Union[int, str, None] = "any"
    ) -> "LocalDeployHead":
        """Read a local head file, checking every field and tensor (ModelFileError naming the problem).

        ``precision``: refuse a file of another precision (None: any). ``rank``: refuse a file keeping another
        number of per-position directions ("any": any; None: require the source model's full k).
        """
        tensors, meta = read_model_file(path, LOCAL_HEAD_KIND)
        return cls.from_file_state(tensors, meta, path, precision, rank)

    @classmethod
    def from_file_state(
        cls,
        tensors: Mapping[str, torch.Tensor],
        meta: Mapping[str, Any],
        path: PathLike = "<memory>",
        precision: Optional[str] = None,
        rank: Union[int, str, None] = "any",
    ) -> "LocalDeployHead":
        """``load``'s checks and rebuild on a file's tensors and metadata (``save`` runs them before writing)."""
        missing = [n for n in _TENSORS if n not in tensors]
        require(not missing, path, f"tensors {missing} are missing")
        extra = sorted(set(tensors) - set(_TENSORS))
        require(not extra, path, f"unexpected tensors {extra}")
        stored = meta.get("precision")
        require(
            isinstance(stored, str) and stored in PRECISIONS,
            path,
            f"precision {stored!r} is not one of {tuple(PRECISIONS)}",
        )

        def integer(key: str, low: int, high: int) -> int:
            value = meta.get(key)
            require(
                isinstance(value, int) and not isinstance(value, bool) and low <= value <= high,
                path,
                f"{key}={value!r} is not an integer in [{low}, {high}]",
            )
            return value

        def real(key: str, low: float, high: float, open_low: bool) -> float:
            value = meta.get(key)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            number = float(value) if ok and abs(value) < 1e300 else math.nan  # a huge int would not fit a float
            ok = ok and math.isfinite(number) and (number > low if open_low else number >= low) and number <= high
            require(ok, path, f"{key}={value!r} is not a finite number in {'(' if open_low else '['}{low}, {high}]")
            return float(value)

        d = integer("d", 1, MAX_DIM)
        p = integer("positions", 1, MAX_POSITIONS)
        model_rank = integer("model_rank", 1, d)
        k = integer("rank", 1, model_rank)
        n_images = integer("n_images", 0, MAX_IMAGES)
        lam = real("lam", 0.0, math.inf, True)
        lam_rel = real("lam_rel", 0.0, math.inf, True)
        shrinkage = real("shrinkage", 0.0, 1.0, False)
        grid = meta.get("grid")
        require(
            grid is None
            or isinstance(grid, list)
            and len(grid) == 2
            and all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)
            and grid[0] * grid[1] == p,
            path,
            f"grid={grid!r} is not null or [h, w] with h * w = positions = {p}",
        )
        detector = meta.get("detector")
        require(detector is None or isinstance(detector, dict), path, "detector metadata is not a JSON object")
        if detector is not None:
            require(detector.get("d") in (None, d), path, f"detector metadata says d={detector.get('d')}, file d={d}")
            want_grid = detector.get("patch_grid")
            require(
                want_grid is None or want_grid == grid,
                path,
                f"detector metadata says patch_grid={want_grid}, file {grid}",
            )

        dtype = PRECISIONS[stored]
        expected = {
            "matrix": (dtype, (d, d)),
            "vectors": (dtype, (p, d, k)),
            "inner": (dtype, (p, k, k)),
            "means": (torch.float64, (p, d)),
            "inv_b": (torch.float64, (d,)),
        }
        for name, (want_dtype, want_shape) in expected.items():
            t = tensors[name]
            require(
                t.dtype == want_dtype,
                path,
                f"tensor {name!r} is {t.dtype}, expected {want_dtype}"
                + (f" (precision={stored})" if want_dtype == dtype else ""),
            )
            require(
                tuple(t.shape) == want_shape, path, f"tensor {name!r} has shape {tuple(t.shape)}, expected {want_shape}"
            )
            require(bool(torch.isfinite(t).all()), path, f"tensor {name!r} holds NaN or Inf")
        matrix, vectors, inner = (tensors[n].to(torch.float64) for n in ("matrix", "vectors", "inner"))
        inv_b = tensors["inv_b"]
        # inv_b = 1 / (a s + lam) with s >= 0 lies in (0, 1/lam]; |M| = lam inv_b |U| <= 1; K = (I + X)^-1, X PSD
        require(
            bool((inv_b > 0).all()) and float(inv_b.max()) * lam <= 1 + 1e-9,
            path,
            f"inv_b must lie in (0, 1/lam] (lam={lam:.6g})",
        )
        require(float(matrix.abs().max()) <= 1 + 1e-6, path, "matrix entries must lie in [-1, 1]")
        require(bool(torch.equal(inner, inner.transpose(1, 2))), path, "tensor 'inner' is not symmetric")
        require(
            float(inner.abs().max()) <= 1 + 1e-3 and bool((inner.diagonal(dim1=1, dim2=2) >= 0).all()),
            path,
            "tensor 'inner' must have entries in [-1, 1] and a non-negative diagonal (it is (I + X)^-1, X PSD)",
        )
        if precision is not None and stored != precision:
            raise ValueError(f"{path}: local head file holds precision={stored}, expected {precision}")
        if rank != "any" and k != (model_rank if rank is None else rank):
            raise ValueError(f"{path}: local head file keeps rank={k} of {model_rank}, expected {rank}")
        return cls(
            matrix=matrix,
            means=tensors["means"],
            inv_b=inv_b,
            vectors=vectors,
            inner=inner,
            lam=lam,
            lam_rel=lam_rel,
            shrinkage=shrinkage,
            grid=None if grid is None else (grid[0], grid[1]),
            precision=stored,
            model_rank=model_rank,
            n_images=n_images,
            detector=detector,
        )


__all__ = [
    "LOCAL_HEAD_KIND",
    "LocalDeployHead",
    "truncated_model",
]
