"""NNScorer: exact k=1 nearest-neighbour distance to a memory bank, the baseline CRD replaces.

This is PatchCore's scoring rule without coreset selection: the score of a patch is its Euclidean
distance to the nearest stored normal patch. faiss ``IndexFlatL2`` serves CPU queries when faiss is
installed; otherwise (and for CUDA tensors) a chunked torch matmul does, with memory bounded by the
chunk sizes. ``subsample`` keeps a seeded random fraction of the patches (1% / 10% / 100% banks).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Optional

import torch

from ..choices import MAX_SEED
from ..core.dtypes import compute_dtype
from ..io.model_file import PathLike, read_model_file, require, write_model_file
from ._validation import ArrayLike, as_patch_matrix

_BACKENDS = ("auto", "faiss", "torch")


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class NNScorer:
    """Exact nearest-neighbour distance scorer with the same interface as ``CRDScorer``.

    Args:
        subsample: fraction in (0, 1] of the fitted patches kept in the bank (seeded random choice).
        backend: "faiss" (IndexFlatL2, CPU), "torch" (chunked matmul, any device) or "auto"
            (faiss for CPU queries when installed, torch otherwise).
        query_chunk, bank_chunk: rows per block of the torch path; memory ~ query_chunk * bank_chunk.
        seed: seed of the subsampling.
    """

    def __init__(
        self,
        subsample: Optional[float] = None,
        backend: str = "auto",
        query_chunk: int = 4096,
        bank_chunk: int = 16384,
        seed: int = 0,
    ) -> None:
        if subsample is not None and not (0.0 < subsample <= 1.0):
            raise ValueError(f"subsample must be in (0, 1], got {subsample!r}")
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        if backend == "faiss" and not _faiss_available():
            raise ImportError("backend='faiss' needs faiss: pip install faiss-cpu (or crd-fast[faiss])")
        if query_chunk < 1 or bank_chunk < 1:
            raise ValueError("query_chunk and bank_chunk must be positive")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
        self.subsample = subsample
        self.backend = backend
        self.query_chunk = int(query_chunk)
        self.bank_chunk = int(bank_chunk)
        self.seed = int(seed)
        self._generator = torch.Generator().manual_seed(self.seed)
        self._bank: Optional[torch.Tensor] = None  # float32, CPU
        self._index = None
        self._device_bank: dict[tuple[str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    # ---- fitting ---------------------------------------------------------------------------------
    def fit(self, X: ArrayLike) -> "NNScorer":
        """Build the bank from (N, d) normal patches, discarding any earlier fit."""
        x, _ = as_patch_matrix(X, "X", min_rows=1)
        self._bank = None
        self._generator = torch.Generator().manual_seed(self.seed)
        return self.partial_fit(x)

    def partial_fit(self, X: ArrayLike) -> "NNScorer":
        """Append (a subsample of) more normal patches to the bank."""
        dim = self._bank.shape[1] if self._bank is not None else None
        x, _ = as_patch_matrix(X, "X", dim=dim, min_rows=1)
        x = x.detach().to("cpu", torch.float32)
        if self.subsample is not None and self.subsample < 1.0:
            keep = max(1, int(math.ceil(self.subsample * x.shape[0])))
            idx = torch.randperm(x.shape[0], generator=self._generator)[:keep].sort().values
            x = x[idx]
        self._bank = x.contiguous() if self._bank is None else torch.cat([self._bank, x]).contiguous()
        self._index = None
        self._device_bank.clear()
        return self

    @property
    def bank(self) -> torch.Tensor:
        """The stored (n_bank, d) float32 memory bank."""
        if self._bank is None:
            raise RuntimeError("this NNScorer is not fitted yet: call fit(X) first")
        return self._bank

    @property
    def dim(self) -> int:
        return int(self.bank.shape[1])

    @property
    def n_samples(self) -> int:
        return int(self.bank.shape[0])

    @property
    def nbytes(self) -> int:
        """Memory held by the bank (what a deployed PatchCore-style model must carry)."""
        return self.bank.numel() * self.bank.element_size()

    # ---- scoring -----------------------------------------------------------------------------------
    def _use_faiss(self, device: torch.device) -> bool:
        if device.type != "cpu":
            return False
        return self.backend == "faiss" or (self.backend == "auto" and _faiss_available())

    def score(self, Y: ArrayLike) -> ArrayLike:
        """Distance from each row of ``Y`` to its nearest bank row; same kind and device as ``Y``."""
        y, kind = as_patch_matrix(Y, "Y", dim=self.dim, min_rows=0)
        if self._use_faiss(y.device):
            out = self._score_faiss(y)
        else:
            out = self._score_torch(y)
        return kind.wrap(out)

    __call__ = score

    def _score_faiss(self, y: torch.Tensor) -> torch.Tensor:
        import faiss

        if self._index is None:
            self._index = faiss.IndexFlatL2(self.dim)
            self._index.add(self.bank.numpy())
        if y.shape[0] == 0:
            return torch.empty(0, dtype=torch.float32)
        dist2, _ = self._index.search(y.to(torch.float32).contiguous().numpy(), 1)
        return torch.from_numpy(dist2[:, 0]).clamp_min_(0).sqrt_()

    def _score_torch(self, y: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(y.dtype)
        key = (str(y.device), dtype)
        if key not in self._device_bank:
            bank = self.bank.to(device=y.device, dtype=dtype)
            self._device_bank[key] = (bank, (bank * bank).sum(dim=1))
        bank, bank_sq = self._device_bank[key]
        y = y.to(dtype)
        out = torch.empty(y.shape[0], dtype=dtype, device=y.device)
        for qs in range(0, y.shape[0], self.query_chunk):
            q = y[qs : qs + self.query_chunk]
            q_sq = (q * q).sum(dim=1, keepdim=True)
            best = torch.full((q.shape[0],), math.inf, dtype=dtype, device=y.device)
            for bs in range(0, bank.shape[0], self.bank_chunk):
                d2 = q_sq - 2.0 * (q @ bank[bs : bs + self.bank_chunk].T) + bank_sq[bs : bs + self.bank_chunk]
                best = torch.minimum(best, d2.min(dim=1).values)
            out[qs : qs + self.query_chunk] = best.clamp_min(0).sqrt()
        return out

    # ---- persistence -------------------------------------------------------------------------------
    def save(self, path: PathLike) -> None:
        """Write the bank and settings to ``path`` (safetensors + JSON metadata), atomically."""
        fields = {"d": self.dim, "n": self.n_samples, "subsample": self.subsample, "seed": self.seed}
        write_model_file(path, "nn_scorer", {"bank": self.bank}, fields, check=type(self).from_file_state)

    @classmethod
    def load(cls, path: PathLike, backend: str = "auto") -> "NNScorer":
        """Read a bank written by ``save``."""
        tensors, meta = read_model_file(path, "nn_scorer")
        return cls.from_file_state(tensors, meta, path, backend)

    @classmethod
    def from_file_state(
        cls,
        tensors: Mapping[str, torch.Tensor],
        meta: Mapping[str, Any],
        path: PathLike = "<memory>",
        backend: str = "auto",
    ) -> "NNScorer":
        """``load``'s checks and rebuild on a file's tensors and metadata (``save`` runs them before writing)."""
        require("bank" in tensors, path, "tensor 'bank' is missing")
        bank = tensors["bank"]
        require(
            bank.ndim == 2 and tuple(bank.shape) == (meta.get("n"), meta.get("d")),
            path,
            "bank shape does not match n, d",
        )
        require(bank.dtype == torch.float32, path, f"bank dtype {bank.dtype}, expected float32")
        seed = meta.get("seed", 0)
        try:
            scorer = cls(subsample=meta.get("subsample"), backend=backend, seed=seed)
        except (TypeError, ValueError) as exc:
            require(False, path, str(exc))
        scorer._bank = bank.contiguous()
        return scorer

    def __repr__(self) -> str:
        fitted = f"n={self._bank.shape[0]}, d={self._bank.shape[1]}" if self._bank is not None else "unfitted"
        return f"NNScorer(subsample={self.subsample}, backend={self.backend!r}; {fitted})"
