"""Setting up and reading the torch.distributed process group.

``torchrun`` (``python -m torch.distributed.run``) starts one process per rank and sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. ``distributed_session`` reads them, creates the
process group (gloo on CPU, nccl on GPU) and tears it down afterwards. Run without torchrun (no
WORLD_SIZE), the same code runs as a single process and no group is created, so the distributed entry
points also work as plain ones.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist

#: Environment variables torchrun sets for each worker.
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

#: How long a collective waits for the slowest rank before failing (a dead peer is usually noticed sooner).
DEFAULT_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: its rank, the number of ranks, its rank on this machine and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: Optional[str]  # None when running as a single process without a process group

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that writes files."""
        return self.rank == 0


def _int_env(name: str, default: Optional[int] = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise RuntimeError(f"environment variable {name} is not set: start this program with torchrun")
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from None


def launched_by_torchrun() -> bool:
    """True when the torchrun variables (at least WORLD_SIZE and RANK) are present."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def default_backend(device: Optional[str] = None) -> str:
    """nccl when the work runs on CUDA, gloo otherwise."""
    if device is None:
        return "nccl" if torch.cuda.is_available() else "gloo"
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def current_env(group: Optional[dist.ProcessGroup] = None) -> DistEnv:
    """The DistEnv of this process: from the initialised process group, else a single-process one."""
    if dist.is_available() and dist.is_initialized():
        backend = str(dist.get_backend(group))
        local_rank = _int_env("LOCAL_RANK", 0)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        return DistEnv(dist.get_rank(group), dist.get_world_size(group), local_rank, device, backend)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return DistEnv(0, 1, 0, device, None)


def init_distributed(backend: Optional[str] = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistEnv:
    """Create the default process group from torchrun's variables and return this process's DistEnv.

    Without torchrun's variables this returns a single-process DistEnv and creates nothing. With nccl,
    each process is pinned to GPU ``LOCAL_RANK`` first, as nccl requires one device per rank.
    """
    if dist.is_initialized():
        return current_env()
    if not launched_by_torchrun():
        return current_env()
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed support")
    rank, world_size = _int_env("RANK"), _int_env("WORLD_SIZE")
    local_rank = _int_env("LOCAL_RANK", 0)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise RuntimeError(f"environment variable {name} is not set: start this program with torchrun")
    backend = backend or default_backend()
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("backend 'nccl' needs CUDA GPUs; use backend='gloo' on CPU")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return current_env()


def shutdown_distributed() -> None:
    """Destroy the default process group if one exists."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed_session(backend: Optional[str] = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[DistEnv]:
    """``with distributed_session() as env:`` -- a process group for the block (if torchrun started us).

    A group that already existed before the block is left alone; one created here is destroyed on exit,
    also when the block raises.
    """
    owned = not (dist.is_available() and dist.is_initialized()) and launched_by_torchrun()
    env = init_distributed(backend, timeout_s)
    try:
        yield env
    finally:
        if owned:
            shutdown_distributed()
