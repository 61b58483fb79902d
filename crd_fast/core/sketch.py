"""Frequent Directions (FD) sketches, one per patch position, of a stream of rows.

For each of P positions the sketch keeps a small matrix B_p (at most 2 ell - 1 rows of d numbers) with
B_p^T B_p ~= A_p^T A_p, where A_p stacks every row ever appended at that position. Rows are appended into a
(P, 2 ell, d) buffer; when it is full it is *shrunk* (Liberty 2013; Ghashami, Liberty, Phillips and Woodruff
2016): from the eigendecomposition of the small Gram B B^T, keep the top ell - 1 directions with their squared
singular values reduced by delta, the ell-th largest one (which zeroes the ell-th and drops the rest). Then

    0 <= A_p^T A_p - B_p^T B_p   (positive semi-definite),    || A_p^T A_p - B_p^T B_p ||_2 <= discarded_p,

where discarded_p is the sum of the deltas of all shrinks, and discarded_p <= ||A_p - [A_p]_k||_F^2 / (ell - k)
for every k < ell ([A]_k: the best rank-k approximation). A sketch that never shrank (fewer than 2 ell rows
appended) is the data itself: exact. Two sketches merge by appending one's rows to the other and adding the
deltas, with the same guarantee for the stacked rows. Memory: P * 2 ell * d numbers, whatever the number of rows.

The FD bound depends on A only through A^T A, so rows may be any factor of the scatter being sketched
(crd_fast/core/local.py appends batch-centred rows plus one mean-correction row per batch).

Storage precision: float64, or float32 (``dtype``) for a sketch of float32 features, where rounding a row to
float32 changes it no more than the features' own rounding did; a float32 sketch is shrunk in float32 too (the
Gram's eigenvalues to ~1e-6 of the largest, far inside the FD bound; tests/test_local_scorer.py). Appending
float64 rows to a float32 sketch first turns it into a float64 one (``promote``), so float64 data is never
rounded. The buffer is allocated empty and filled as rows arrive, so only the rows held are resident; a shrink
writes the kept rows into a fresh buffer and frees the full one.
"""

from __future__ import annotations

from typing import Optional

import torch

from .lapack import eigh
from .threads import chunk_map, one_thread

#: The precisions a sketch may be stored in.
SKETCH_DTYPES = (torch.float32, torch.float64)
#: Positions shrunk at a time (bounds the temporaries of a shrink to this many positions' products).
_SHRINK_CHUNK = 64
#: Positions centred at a time by ``append_centred`` (a few MB of float64: the temporary stays in cache).
_APPEND_CHUNK = 32


class FrequentDirections:
    """P independent FD sketches of d-dimensional rows, ``ell`` directions each, stored in ``dtype``.

    ``rows()`` gives the current sketches B_p as a (P, m, d) view (m < 2 ell); ``discarded`` (P,) float64 bounds
    their spectral-norm error, see the module docstring.
    """

    def __init__(
        self,
        positions: int,
        dim: int,
        ell: int,
        device: Optional[torch.device] = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        if positions <= 0 or dim <= 0:
            raise ValueError(f"positions and dim must be positive, got {positions} and {dim}")
        if isinstance(ell, bool) or not isinstance(ell, int) or ell < 2:
            raise ValueError(f"the sketch size ell must be an integer >= 2, got {ell!r}")
        if dtype not in SKETCH_DTYPES:
            raise ValueError(f"a sketch is stored in float32 or float64, not {dtype}")
        self.positions, self.dim, self.ell = int(positions), int(dim), int(ell)
        self._buffer = self._empty(dtype, torch.device(device) if device is not None else torch.device("cpu"))
        self.filled = 0
        self.discarded = torch.zeros(positions, dtype=torch.float64, device=device)
        self.shrinks = 0

    def _empty(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        # empty, not zeros: pages are resident once written, and nothing past ``filled`` is ever read
        return torch.empty(self.positions, 2 * self.ell, self.dim, dtype=dtype, device=device)

    @property
    def device(self) -> torch.device:
        return self._buffer.device

    @property
    def dtype(self) -> torch.dtype:
        """The storage precision (float32 or float64)."""
        return self._buffer.dtype

    def promote(self, dtype: torch.dtype = torch.float64) -> "FrequentDirections":
        """Store the sketch in ``dtype`` from now on, if that is wider than its precision now (never narrower)."""
        if dtype not in SKETCH_DTYPES:
            raise ValueError(f"a sketch is stored in float32 or float64, not {dtype}")
        if torch.finfo(dtype).bits > torch.finfo(self.dtype).bits:
            wider = self._empty(dtype, self.device)
            wider[:, : self.filled] = self._buffer[:, : self.filled]
            self._buffer = wider
        return self

    def rows(self) -> torch.Tensor:
        """The sketches B_p, a (P, m, d) view of the buffer (m = ``filled`` < 2 ell), in the storage precision."""
        return self._buffer[:, : self.filled]

    def append(self, rows: torch.Tensor, narrow: bool = False) -> "FrequentDirections":
        """Append (P, m, d) rows (row j of every position at once), shrinking whenever the buffer fills up.

        float64 rows turn a float32 sketch into a float64 one first (``promote``), unless ``narrow``: then they are
        stored in the sketch's precision (rows computed in float64 from float32 features); other rows are stored
        in the sketch's precision."""
        if rows.ndim != 3 or rows.shape[0] != self.positions or rows.shape[2] != self.dim:
            raise ValueError(f"rows must be (P={self.positions}, m, d={self.dim}), got shape {tuple(rows.shape)}")
        if rows.dtype == torch.float64 and not narrow:
            self.promote(torch.float64)
        start, total = 0, rows.shape[1]
        capacity = self._buffer.shape[1]
        while start < total:
            take = min(capacity - self.filled, total - start)
            self._buffer[:, self.filled : self.filled + take] = rows[:, start : start + take]
            self.filled += take
            start += take
            if self.filled == capacity:
                self._shrink()
        return self

    def append_centred(self, batch: torch.Tensor, means: torch.Tensor) -> "FrequentDirections":
        """Append the rows batch[i, p] - means[p] of a (b, P, d) batch (row i of every position), as ``append`` with
        ``narrow`` would: formed in float64 a few positions at a time straight into the buffer, with no float64 copy
        of the batch (a fresh 77 MB temporary costs more in page faults than the subtraction itself)."""
        if batch.ndim != 3 or batch.shape[1] != self.positions or batch.shape[2] != self.dim:
            raise ValueError(f"batch must be (b, P={self.positions}, d={self.dim}), got shape {tuple(batch.shape)}")
        if batch.dtype == torch.float64:
            self.promote(torch.float64)
        means = means.to(device=self.device, dtype=torch.float64)
        start, total = 0, batch.shape[0]
        capacity = self._buffer.shape[1]
        while start < total:
            take = min(capacity - self.filled, total - start)
            part = batch[start : start + take]
            with one_thread(part):  # small ops: threads would only synchronise (crd_fast/core/threads.py)
                for first in range(0, self.positions, _APPEND_CHUNK):
                    last = first + _APPEND_CHUNK
                    centred = part[:, first:last].transpose(0, 1).to(torch.float64) - means[first:last, None, :]
                    self._buffer[first:last, self.filled : self.filled + take] = centred
            self.filled += take
            start += take
            if self.filled == capacity:
                self._shrink()
        return self

    def merge(self, other: "FrequentDirections") -> "FrequentDirections":
        """Add another sketch (same P, d and ell) into this one: its rows are appended, its deltas added."""
        if (other.positions, other.dim, other.ell) != (self.positions, self.dim, self.ell):
            raise ValueError(
                f"cannot merge an FD sketch of (P, d, ell) = {(other.positions, other.dim, other.ell)} into "
                f"{(self.positions, self.dim, self.ell)}"
            )
        rows = other.rows().to(self.device).clone()  # other may be self
        discarded = other.discarded.to(self.device).clone()
        self.append(rows)
        self.discarded += discarded
        self.shrinks += other.shrinks
        return self

    def _shrink(self) -> None:
        """Keep the top ell - 1 directions of every B_p, squared singular values reduced by the ell-th one."""
        b = self._buffer[:, : self.filled]
        keep = self.ell - 1
        fresh = self._empty(b.dtype, b.device)

        def shrink(start: int) -> torch.Tensor:
            chunk = b[start : start + _SHRINK_CHUNK]
            gram = chunk @ chunk.transpose(1, 2)  # (c, m, m): eigenvalues sigma_j^2 of B_p, eigenvectors its left ones
            sig2, left = eigh(0.5 * (gram + gram.transpose(1, 2)))  # ascending
            sig2, left = sig2.flip(-1).clamp_min(0.0), left.flip(-1)
            delta = sig2[:, keep]  # the ell-th largest (index ell - 1)
            top = sig2[:, :keep]
            # Row j of the new sketch is sqrt(sigma_j^2 - delta) v_j^T with v_j^T = u_j^T B / sigma_j; the factor
            # sqrt(1 - delta / sigma_j^2) is in [0, 1], so a tiny sigma_j cannot blow up.
            tiny = torch.finfo(sig2.dtype).tiny
            factor = torch.where(top > 0, torch.sqrt((1.0 - delta[:, None] / top.clamp_min(tiny)).clamp_min(0.0)), 0.0)
            kept = left[:, :, :keep].transpose(1, 2) @ chunk
            fresh[start : start + _SHRINK_CHUNK, :keep] = kept * factor[:, :, None]
            return delta

        deltas = chunk_map(shrink, range(0, self.positions, _SHRINK_CHUNK), b)
        self._buffer = fresh  # the full buffer is freed
        self.filled = keep
        self.discarded += torch.cat(deltas).to(torch.float64)
        self.shrinks += 1

    @classmethod
    def from_rows(cls, rows: torch.Tensor, discarded: torch.Tensor, ell: int, shrinks: int = 0) -> "FrequentDirections":
        """A sketch holding ``rows`` (P, m, d) with m < 2 ell and the given deltas (P,) (as stored by a model file).

        float64 rows that float32 holds exactly (those of a sketch of float32 features) give a float32 sketch, which
        goes on like the one that was stored; any others a float64 one."""
        if rows.ndim != 3:
            raise ValueError(f"sketch rows must be (P, m, d), got shape {tuple(rows.shape)}")
        p, m, d = rows.shape
        if m >= 2 * ell:
            raise ValueError(f"a sketch of ell={ell} holds fewer than {2 * ell} rows, got {m}")
        if discarded.shape != (p,):
            raise ValueError(f"discarded must have shape ({p},), got {tuple(discarded.shape)}")
        narrow = rows.to(torch.float32)
        dtype = torch.float32 if bool(torch.equal(narrow.to(rows.dtype), rows)) else torch.float64
        sketch = cls(p, d, ell, device=rows.device, dtype=dtype)
        sketch._buffer[:, :m] = narrow if dtype == torch.float32 else rows.to(torch.float64)
        sketch.filled = m
        sketch.discarded = discarded.to(device=rows.device, dtype=torch.float64).clone()
        sketch.shrinks = int(shrinks)
        return sketch
