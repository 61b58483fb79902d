"""Stream rules of the device-resident caches (plan tables, folded matrices): docs/GPU.md "Caches and streams".

A cached CUDA tensor is made once, on the stream of the call that first needed it, and then read by
calls on any stream. Three rules keep that safe:

* made complete: the creating stream is synchronized once when an entry is created, so a call on another
  stream never reads a half-written table (one host sync per new shape or matrix, never per call);
* kept alive: a call on another stream marks the entry's tensors with ``record_stream``, so an evicted
  entry's memory is not reused while that stream's kernels may still read it;
* never made inside CUDA-graph capture: creation copies from pageable host memory and synchronizes, both
  illegal while capturing. :class:`NotPrepared` is raised instead; the head op then records the reference
  path with one warning (call the op once before capturing to get the fused kernels).

Every CUDA query goes through the small functions below, so tests fake them on a CPU-only machine.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import torch


class NotPrepared(RuntimeError):
    """A device cache entry would have to be created inside CUDA-graph capture."""


def is_cuda(device: torch.device) -> bool:
    return torch.device(device).type == "cuda"


def current_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.current_stream(torch.device(device))


def stream_id(device: torch.device) -> Optional[int]:
    """Handle of the current stream of a CUDA ``device``; None for other devices."""
    return int(current_stream(device).cuda_stream) if is_cuda(device) else None


def capturing(device: torch.device) -> bool:
    """True while the current stream of a CUDA ``device`` is being captured into a CUDA graph."""
    if not is_cuda(device):
        return False
    with torch.cuda.device(torch.device(device)):
        return bool(torch.cuda.is_current_stream_capturing())


def synchronize(device: torch.device) -> None:
    current_stream(device).synchronize()


def record(tensor: torch.Tensor, device: torch.device) -> None:
    tensor.record_stream(current_stream(device))


def before_create(device: torch.device, what: str) -> None:
    """Refuses to create a cache entry for ``device`` inside CUDA-graph capture (see :class:`NotPrepared`)."""
    if capturing(device):
        raise NotPrepared(
            f"crd_fast: the {what} for this input shape/matrix is not prepared and cannot be made inside CUDA-graph "
            "capture; run the op once before capturing (docs/GPU.md)"
        )


def after_create(device: torch.device) -> Optional[int]:
    """Completes a new entry on ``device`` (CUDA: synchronizes its stream); returns the creating stream's id."""
    if not is_cuda(device):
        return None
    synchronize(device)
    return stream_id(device)


def before_use(tensors: Iterable[torch.Tensor], device: torch.device, origin: Optional[int]) -> None:
    """Marks an entry made on stream ``origin`` as in use by the current stream when that is another one."""
    if origin is None or not is_cuda(device):
        return
    if stream_id(device) != origin:
        for t in tensors:
            record(t, device)
