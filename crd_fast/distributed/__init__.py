"""Scale-out with torch.distributed: distributed fitting, sharded prediction, exact statistics merging.

Run the same script on every rank (``torchrun --nproc-per-node 2 script.py``)::

    from crd_fast.distributed import distributed_session, fit_distributed, predict_sharded
    with distributed_session() as env:                 # gloo on CPU, nccl on GPU; no-op without torchrun
        fit_distributed(detector, train_images, save_path="model.crd")   # rank 0 writes
        records = predict_sharded(detector, test_images, output="scores.csv")

Shards are strided: with W ranks, rank r takes items r, r + W, r + 2W, ... of the full ordered list.
"""

from .context import (
    DEFAULT_TIMEOUT_S,
    TORCHRUN_VARS,
    DistEnv,
    current_env,
    default_backend,
    distributed_session,
    init_distributed,
    launched_by_torchrun,
    shutdown_distributed,
)
from .fit import fit_distributed, install_statistics
from .launch import run_fit, run_predict
from .predict import RECORD_FIELDS, merge_records, predict_sharded, write_records
from .reduce import (
    DistributedError,
    all_gather_objects,
    all_reduce_bytes,
    all_reduce_statistics,
    exchange_status,
    rank_and_world,
)
from .sharding import SHARD_MODES, shard, shard_indices
from .steps import save_on_rank0

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "TORCHRUN_VARS",
    "DistEnv",
    "current_env",
    "default_backend",
    "distributed_session",
    "init_distributed",
    "launched_by_torchrun",
    "shutdown_distributed",
    "fit_distributed",
    "install_statistics",
    "save_on_rank0",
    "run_fit",
    "run_predict",
    "RECORD_FIELDS",
    "merge_records",
    "predict_sharded",
    "write_records",
    "DistributedError",
    "all_gather_objects",
    "all_reduce_bytes",
    "all_reduce_statistics",
    "exchange_status",
    "rank_and_world",
    "SHARD_MODES",
    "shard",
    "shard_indices",
]
