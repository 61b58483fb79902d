"""LAPACK calls on the CPU with one thread: the eigendecompositions and factorisations of the local model's fit.

torch runs its CPU LAPACK calls (eigh, cholesky, inv) on its intra-op threads. For the small batched problems of
the local model (a (P, 128, 128) Gram per sketch shrink, (P, k, k) Woodbury matrices) the threads only add
synchronisation, and on a machine whose cores are busy (other processes, or torch's own pool oversubscribed)
they turn pathological: on the 2-core machine of bench/RESULTS.md, beside other jobs, one (784, 128, 128) float64
eigh took 8-15 s with 2 threads and 2.1 s with one, a 1536 x 1536 eigh 2.5-10 s against 2.0 s
(docs/DESIGN.md "The detector's choice of spatial model and lam_rel"). So these calls run with one thread; the
results are LAPACK's as before (the thread count only changes the rounding of blocked updates). CUDA tensors
are passed through unchanged.
"""

from __future__ import annotations

import torch

from .threads import one_thread


def eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` (ascending eigenvalues, eigenvectors in columns), one thread on the CPU."""
    with one_thread(matrix):
        return torch.linalg.eigh(matrix)


def cholesky(matrix: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.cholesky`` (lower), one thread on the CPU."""
    with one_thread(matrix):
        return torch.linalg.cholesky(matrix)


def inv(matrix: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.inv``, one thread on the CPU."""
    with one_thread(matrix):
        return torch.linalg.inv(matrix)


def cholesky_inverse(factor: torch.Tensor) -> torch.Tensor:
    """``torch.cholesky_inverse`` of a lower Cholesky factor, one thread on the CPU."""
    with one_thread(factor):
        return torch.cholesky_inverse(factor)


__all__ = ["cholesky", "cholesky_inverse", "eigh", "inv"]
