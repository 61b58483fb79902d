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
rounded.

Memory: the buffer is kept in chunks of positions, each allocated empty and filled as rows arrive, so only the
rows held are resident; a shrink writes a chunk's kept rows into a fresh chunk and frees the full one, one chunk
(two, shrunk side by side) at a time. So the sketch never holds more than its 2 ell rows plus a chunk or two
(a single buffer would hold the full one and the kept rows, 1.5 times as much, while it shrinks).
"""

from __future__ import annotations

from typing import Optional

import torch

from .lapack import eigh
from .threads import chunk_map

#: The precisions a sketch may be stored in.
SKETCH_DTYPES = (torch.float32, torch.float64)
#: Bytes per chunk of the buffer, at least (each chunk is shrunk as one task, crd_fast/core/threads.py). Above
#: glibc's largest mmap threshold (32 MB), so a chunk is its own mapping: pages resident only once written, and
#: all of them returned to the system when the chunk is freed (smaller blocks would come from the heap and stay).
CHUNK_BYTES = 40 << 20
#: Positions centred at a time by ``append_centred`` (a few MB of float64: the temporary stays in cache).
_APPEND_CHUNK = 32


class FrequentDirections:
    """P independent FD sketches of d-dimensional rows, ``ell`` directions each, stored in ``dtype``.

    ``rows()`` gives the current sketches B_p as a (P, m, d) tensor (m < 2 ell; a copy), ``chunk_rows(i)`` those of
    the i-th chunk of positions (``chunk_slices()``; a view); ``discarded`` (P,) float64 bounds their spectral-norm
    error, see the module docstring.
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
        # positions per chunk: CHUNK_BYTES of float32 rows (a float64 sketch's chunks are twice as large)
        per_position = 2 * self.ell * self.dim * 4
        self._step = min(self.positions, max(1, -(-CHUNK_BYTES // per_position)))
        where = torch.device(device) if device is not None else torch.device("cpu")
        self._chunks = [self._empty(c, dtype, where) for c in self.chunk_slices()]
        self.filled = 0
        self.discarded = torch.zeros(positions, dtype=torch.float64, device=device)
        self.shrinks = 0

    def chunk_slices(self) -> list[slice]:
        """The positions of each chunk of the buffer."""
        return [slice(s, min(s + self._step, self.positions)) for s in range(0, self.positions, self._step)]

    def _empty(self, positions: slice, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        # empty, not zeros: pages are resident once written, and nothing past ``filled`` is ever read
        count = positions.stop - positions.start
        return torch.empty(count, 2 * self.ell, self.dim, dtype=dtype, device=device)

    @property
    def device(self) -> torch.device:
        return self._chunks[0].device

    @property
    def dtype(self) -> torch.dtype:
        """The storage precision (float32 or float64)."""
        return self._chunks[0].dtype

    def promote(self, dtype: torch.dtype = torch.float64) -> "FrequentDirections":
        """Store the sketch in ``dtype`` from now on, if that is wider than its precision now (never narrower)."""
        if dtype not in SKETCH_DTYPES:
            raise ValueError(f"a sketch is stored in float32 or float64, not {dtype}")
        if torch.finfo(dtype).bits > torch.finfo(self.dtype).bits:
            for i, positions in enumerate(self.chunk_slices()):
                wider = self._empty(positions, dtype, self.device)
                wider[:, : self.filled] = self._chunks[i][:, : self.filled]
                self._chunks[i] = wider
        return self

    def chunk_rows(self, index: int) -> torch.Tensor:
        """The sketches of the ``index``-th chunk of positions (``chunk_slices()``): a (c, m, d) view."""
        return self._chunks[index][:, : self.filled]

    def rows(self) -> torch.Tensor:
        """The sketches B_p, (P, m, d) (m = ``filled`` < 2 ell), in the storage precision: a copy."""
        return torch.cat([chunk[:, : self.filled] for chunk in self._chunks])

    def _write(self, rows: torch.Tensor, positions: slice, at: int) -> None:
        """Rows (c, m, d) of the ``positions`` (one chunk's) into buffer rows at.. at + m."""
        index = positions.start // self._step
        self._chunks[index][:, at : at + rows.shape[1]] = rows

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
        capacity = 2 * self.ell
        while start < total:
            take = min(capacity - self.filled, total - start)
            for positions in self.chunk_slices():
                self._write(rows[positions, start : start + take], positions, self.filled)
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
        capacity = 2 * self.ell
        while start < total:
            take = min(capacity - self.filled, total - start)
            part = batch[start : start + take]

            def centre(index: int, part: torch.Tensor = part, take: int = take) -> None:
                positions, chunk = self.chunk_slices()[index], self._chunks[index]
                for first in range(positions.start, positions.stop, _APPEND_CHUNK):
                    last = min(first + _APPEND_CHUNK, positions.stop)
                    centred = part[:, first:last].transpose(0, 1).to(torch.float64) - means[first:last, None, :]
                    chunk[first - positions.start : last - positions.start, self.filled : self.filled + take] = centred

            chunk_map(centre, range(len(self._chunks)), part)  # small ops: one thread each, chunks side by side
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
        rows = other.rows().to(self.device)  # a copy: other may be self
        discarded = other.discarded.to(self.device).clone()
        self.append(rows)
        self.discarded += discarded
        self.shrinks += other.shrinks
        return self

    def _shrink(self) -> None:
        """Keep the top ell - 1 directions of every B_p, squared singular values reduced by the ell-th one."""
        keep = self.ell - 1

        def shrink(index: int) -> torch.Tensor:
            chunk = self._chunks[index][:, : self.filled]
            gram = chunk @ chunk.transpose(1, 2)  # (c, m, m): eigenvalues sigma_j^2 of B_p, eigenvectors its left ones
            sig2, left = eigh(0.5 * (gram + gram.transpose(1, 2)))  # ascending
            sig2, left = sig2.flip(-1).clamp_min(0.0), left.flip(-1)
            delta = sig2[:, keep]  # the ell-th largest (index ell - 1)
            top = sig2[:, :keep]
            # Row j of the new sketch is sqrt(sigma_j^2 - delta) v_j^T with v_j^T = u_j^T B / sigma_j; the factor
            # sqrt(1 - delta / sigma_j^2) is in [0, 1], so a tiny sigma_j cannot blow up.
            tiny = torch.finfo(sig2.dtype).tiny
            factor = torch.where(top > 0, torch.sqrt((1.0 - delta[:, None] / top.clamp_min(tiny)).clamp_min(0.0)), 0.0)
            fresh = self._empty(slice(0, chunk.shape[0]), chunk.dtype, chunk.device)
            torch.mul(left[:, :, :keep].transpose(1, 2) @ chunk, factor[:, :, None], out=fresh[:, :keep])
            self._chunks[index] = fresh  # the full chunk is freed
            return delta

        deltas = chunk_map(shrink, range(len(self._chunks)), self._chunks[0])
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
        stored = narrow if dtype == torch.float32 else rows.to(torch.float64)
        for positions in sketch.chunk_slices():
            sketch._write(stored[positions], positions, 0)
        sketch.filled = m
        sketch.discarded = discarded.to(device=rows.device, dtype=torch.float64).clone()
        sketch.shrinks = int(shrinks)
        return sketch
