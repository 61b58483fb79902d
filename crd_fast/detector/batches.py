"""The detector's image pipeline: any accepted images -> normalised (B, 3, crop, crop) batches on its device.

``resolve_device`` turns the detector's ``device`` option into that device.

Files are decoded (crd_fast/io/images.py, with the decode-memory budget) and preprocessed in a small thread pool,
one batch ahead of the consumer; in-memory tensor batches are sliced directly. ``progress_bar`` is the tqdm bar
the detector's long loops show.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator, Optional, Union

import torch
from tqdm.auto import tqdm

from ..data.images import Images, count_images, iter_images
from ..features.preprocess import Preprocess, load_image
from ..io.images import decode_reservation

#: Most decoding threads, whatever the batch size and the machine.
MAX_WORKERS = 8

Batch = tuple[list[Optional[str]], torch.Tensor]


def resolve_device(device: Union[str, torch.device]) -> torch.device:
    """The torch device of a detector's ``device`` option ("cpu", "cuda", "cuda:N" or "auto")."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"invalid device {device!r} (use 'cpu', 'cuda', 'cuda:N' or 'auto')") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available on this machine")
    return dev


def _prepare(preprocess: Preprocess, index: int, path: Optional[str], image: Any) -> torch.Tensor:
    if isinstance(image, str):
        with decode_reservation(image):  # parallel decoding bounded by memory (crd_fast.io.limits)
            return preprocess(load_image(image))
    try:
        return preprocess(image)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"image {index}: {exc}") from exc


def iter_batches(images: Images, preprocess: Preprocess, device: torch.device, batch_size: int) -> Iterator[Batch]:
    """Yield (paths, normalised (B, 3, crop, crop) float32 batch on ``device``); paths are None for in-memory images."""
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        for start in range(0, images.shape[0], batch_size):
            chunk = images[start : start + batch_size].to(device)
            # contiguous: the same picture must give the same scores whatever the caller's memory layout
            yield [None] * chunk.shape[0], preprocess.batch(chunk).contiguous()
        return
    workers = max(1, min(batch_size, os.cpu_count() or 1, MAX_WORKERS))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        Job = tuple[list[Optional[str]], list[Future]]
        pending: Optional[Job] = None
        batch: list[tuple[int, Optional[str], Any]] = []

        def submit(items: list[tuple[int, Optional[str], Any]]) -> Job:
            return [p for _, p, _ in items], [pool.submit(_prepare, preprocess, *it) for it in items]

        def collect(job: Job) -> Batch:
            paths, futures = job
            return paths, torch.stack([f.result() for f in futures]).to(device)

        for index, (path, image) in enumerate(iter_images(images)):
            batch.append((index, path, image))
            if len(batch) == batch_size:
                job = submit(batch)
                batch = []
                if pending is not None:
                    yield collect(pending)
                pending = job
        if batch:
            job = submit(batch)
            if pending is not None:
                yield collect(pending)
            pending = job
        if pending is not None:
            yield collect(pending)


def known_count(images: Images) -> Optional[int]:
    """How many images ``images`` holds when that is known without reading them (None otherwise)."""
    try:
        return count_images(images)
    except (OSError, ValueError):
        return None


def progress_bar(images: Images, desc: str, progress: bool) -> tqdm:
    """A tqdm bar over ``images`` (its total when known), shown only when ``progress``."""
    return tqdm(total=known_count(images), desc=desc, unit="img", disable=not progress, dynamic_ncols=True)


__all__ = ["Batch", "MAX_WORKERS", "iter_batches", "known_count", "progress_bar", "resolve_device"]
