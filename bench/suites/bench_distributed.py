"""Distributed fit throughput with 1 and 2 processes (torchrun, gloo, this machine), and the bytes each
rank sends when the statistics are combined.

    cd bench/suites && python -m pytest bench_distributed.py --benchmark-only -s
    CRD_BENCH_DIST_SCALE=4 ...   # more data (default 1: a short run)

Each case launches ``torchrun --nproc-per-node W`` running this file as the worker. The workers time
``fit_distributed`` between two barriers (process start-up and imports excluded) and report the
slowest rank; pytest-benchmark times the whole launch. Two workloads:

- ``patches``: random (784, d) patch arrays (one 28 x 28 feature grid per "image"), d = 1536 as the
  default concat embedding; each rank generates only its own shard (seeded by item index).
- ``images``: a CRDDetector (resnet18, seeded random weights, 64 px crops) fitting in-memory images.

extra_info holds images/s, patches/s, the speed-up over one process, the time of one combine
(all_reduce_statistics) and ``bytes_per_rank``: the tensor sizes each rank hands to the collectives,
8 (d^2 + d + 3) bytes, the same whatever the number of images. On a 2-core machine shared with other
work, expect well under 2x: read the ratio, not the absolute times.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCALE = int(os.environ.get("CRD_BENCH_DIST_SCALE", "1"))
WORKLOADS = {
    "patches": {"n_items": 24 * SCALE, "d": 1536, "grid": 784},
    "images": {"n_items": 48 * SCALE, "crop": 64},
}
_single_process: dict[str, float] = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workload: str, world: int, out: Path, timeout: float = 600.0) -> dict:
    result = out / f"{workload}_{world}.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(world),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        os.path.abspath(__file__),
        "worker",
        workload,
        str(result),
    ]
    # One torch thread per process, so W processes use W cores: the comparison is of processes, not of
    # intra-op threads (which also fight the detector's image-loading threads on a small machine).
    env = dict(os.environ, OMP_NUM_THREADS="1", CRD_BENCH_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{workload} with {world} process(es) overran {timeout} s")
    assert proc.returncode == 0, log.decode(errors="replace")[-4000:]
    return json.loads(result.read_text())


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_fit_throughput(benchmark, tmp_path, workload, world):
    from crd_fast.distributed import all_reduce_bytes

    stats = benchmark.pedantic(_launch, args=(workload, world, tmp_path), rounds=1, iterations=1)
    d = stats["d"]
    bytes_per_rank = all_reduce_bytes(d, world)
    info = {
        "world_size": world,
        "n_images": stats["n_items"],
        "n_patches": stats["n_patches"],
        "d": d,
        "fit_s": stats["fit_s"],
        "images_per_s": stats["n_items"] / stats["fit_s"],
        "patches_per_s": stats["n_patches"] / stats["fit_s"],
        "combine_s": stats["combine_s"],
        "bytes_per_rank": bytes_per_rank["payload"],
        "ring_bytes_sent_per_rank": bytes_per_rank["ring_sent"],
    }
    if world == 1:
        _single_process[workload] = info["fit_s"]
    elif workload in _single_process:
        info["speedup_vs_1_process"] = _single_process[workload] / info["fit_s"]
    benchmark.extra_info.update(info)
    print(
        f"\n{workload} W={world}: "
        + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
    )


# ---- worker (runs on every rank under torchrun) ------------------------------------------------------
def _worker(workload: str, result_path: str) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    from crd_fast import CRDScorer
    from crd_fast.distributed import all_reduce_statistics, distributed_session, fit_distributed

    torch.set_num_threads(int(os.environ.get("CRD_BENCH_THREADS", "1")))
    cfg = WORKLOADS[workload]
    n = cfg["n_items"]
    with distributed_session(backend="gloo") as env:
        if workload == "patches":
            d, grid = cfg["d"], cfg["grid"]

            class LazyPatches:
                """Item i is generated when a rank asks for it: no rank holds the others' data."""

                def __len__(self) -> int:
                    return n

                def __getitem__(self, i: int) -> torch.Tensor:
                    g = torch.Generator().manual_seed(i)
                    return torch.randn(grid, d, generator=g, dtype=torch.float32)

            model, items, n_patches = CRDScorer(), LazyPatches(), n * grid
        else:
            from crd_fast.detector.detector import CRDDetector

            crop = cfg["crop"]
            model = CRDDetector(
                backbone="resnet18",
                weights="random",
                resize=crop,
                crop=crop,
                batch_size=8,
                spatial="global",
                lam_rel=0.01,
            )
            g = np.random.default_rng(0)
            items = [g.random((crop, crop, 3), dtype=np.float32) for _ in range(n)]
            d, n_patches = model.dim, n * model.patch_grid[0] * model.patch_grid[1]
            model.fit(items[:2], progress=False)  # warm-up (kernel selection, allocations), local only
        dist.barrier()
        start = time.perf_counter()
        fit_distributed(model, items)
        dist.barrier()
        fit_s = time.perf_counter() - start
        stats = model.model.scorer.statistics if workload == "images" else model.statistics
        start = time.perf_counter()
        all_reduce_statistics(stats)
        combine_s = time.perf_counter() - start
        times = torch.tensor([fit_s, combine_s], dtype=torch.float64)
        dist.all_reduce(times, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        if env.is_main:
            Path(result_path).write_text(
                json.dumps(
                    {
                        "n_items": n,
                        "n_patches": n_patches,
                        "d": d,
                        "fit_s": float(times[0]),
                        "combine_s": float(times[1]),
                    }
                )
            )


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "worker":
    _worker(sys.argv[2], sys.argv[3])
