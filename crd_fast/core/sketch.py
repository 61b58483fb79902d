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
"""

from __future__ import annotations

from typing import Optional

import torch


class FrequentDirections:
    """P independent FD sketches of d-dimensional rows, ``ell`` directions each, in float64.

    ``rows()`` gives the current sketches B_p as a (P, m, d) view (m < 2 ell); ``discarded`` (P,) bounds their
    spectral-norm error, see the module docstring.
    """

    def __init__(self, positions: int, dim: int, ell: int, device: Optional[torch.device] = None) -> None:
        if positions <= 0 or dim <= 0:
            raise ValueError(f"positions and dim must be positive, got {positions} and {dim}")
        if isinstance(ell, bool) or not isinstance(ell, int) or ell < 2:
            raise ValueError(f"the sketch size ell must be an integer >= 2, got {ell!r}")
        self.positions, self.dim, self.ell = int(positions), int(dim), int(ell)
        self._buffer = torch.zeros(positions, 2 * ell, dim, dtype=torch.float64, device=device)
        self.filled = 0
        self.discarded = torch.zeros(positions, dtype=torch.float64, device=device)
        self.shrinks = 0

    @property
    def device(self) -> torch.device:
        return self._buffer.device

    def rows(self) -> torch.Tensor:
        """The sketches B_p, a (P, m, d) view of the buffer (m = ``filled`` < 2 ell)."""
        return self._buffer[:, : self.filled]

    def append(self, rows: torch.Tensor) -> "FrequentDirections":
        """Append (P, m, d) rows (row j of every position at once), shrinking whenever the buffer fills up."""
        if rows.ndim != 3 or rows.shape[0] != self.positions or rows.shape[2] != self.dim:
            raise ValueError(f"rows must be (P={self.positions}, m, d={self.dim}), got shape {tuple(rows.shape)}")
        rows = rows.to(device=self.device, dtype=torch.float64)
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

    def merge(self, other: "FrequentDirections") -> "FrequentDirections":
        """Add another sketch (same P, d and ell) into this one: its rows are appended, its deltas added."""
        if (other.positions, other.dim, other.ell) != (self.positions, self.dim, self.ell):
            raise ValueError(
                f"cannot merge an FD sketch of (P, d, ell) = {(other.positions, other.dim, other.ell)} into "
                f"{(self.positions, self.dim, self.ell)}"
            )
        rows = other.rows().clone()  # other may be self
        discarded = other.discarded.to(self.device).clone()
        self.append(rows)
        self.discarded += discarded
        self.shrinks += other.shrinks
        return self

    def _shrink(self) -> None:
        """Keep the top ell - 1 directions of every B_p, squared singular values reduced by the ell-th one."""
        b = self._buffer[:, : self.filled]
        gram = b @ b.transpose(1, 2)  # (P, m, m): eigenvalues sigma_j^2 of B_p, eigenvectors its left vectors
        sig2, left = torch.linalg.eigh(0.5 * (gram + gram.transpose(1, 2)))  # ascending
        sig2, left = sig2.flip(-1).clamp_min(0.0), left.flip(-1)
        keep = self.ell - 1
        delta = sig2[:, keep]  # the ell-th largest (index ell - 1)
        top = sig2[:, :keep]
        # Row j of the new sketch is sqrt(sigma_j^2 - delta) v_j^T with v_j^T = u_j^T B / sigma_j; the factor
        # sqrt(1 - delta / sigma_j^2) is in [0, 1], so a tiny sigma_j cannot blow up.
        factor = torch.where(top > 0, torch.sqrt((1.0 - delta[:, None] / top.clamp_min(1e-300)).clamp_min(0.0)), 0.0)
        new = (left[:, :, :keep].transpose(1, 2) @ b) * factor[:, :, None]
        self._buffer.zero_()
        self._buffer[:, :keep] = new
        self.filled = keep
        self.discarded += delta
        self.shrinks += 1

    @classmethod
    def from_rows(cls, rows: torch.Tensor, discarded: torch.Tensor, ell: int, shrinks: int = 0) -> "FrequentDirections":
        """A sketch holding ``rows`` (P, m, d) with m < 2 ell and the given deltas (P,) (as stored by a model file)."""
        if rows.ndim != 3:
            raise ValueError(f"sketch rows must be (P, m, d), got shape {tuple(rows.shape)}")
        p, m, d = rows.shape
        sketch = cls(p, d, ell, device=rows.device)
        if m >= 2 * ell:
            raise ValueError(f"a sketch of ell={ell} holds fewer than {2 * ell} rows, got {m}")
        if discarded.shape != (p,):
            raise ValueError(f"discarded must have shape ({p},), got {tuple(discarded.shape)}")
        sketch._buffer[:, :m] = rows.to(torch.float64)
        sketch.filled = m
        sketch.discarded = discarded.to(device=rows.device, dtype=torch.float64).clone()
        sketch.shrinks = int(shrinks)
        return sketch
