"""One-call entry points for the command line: set up the process group, do the job, tear it down.

Meant for ``crd-fast fit --distributed`` and ``crd-fast predict`` started by torchrun; without
torchrun's variables they run as a single process. The model is built by a function of the DistEnv,
called once the group exists, so it can be placed on ``env.device`` (GPU ``LOCAL_RANK`` under nccl).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from ..io.model_file import PathLike
from .context import DEFAULT_TIMEOUT_S, DistEnv, default_backend, distributed_session
from .fit import fit_distributed
from .predict import ResultCallback, predict_sharded

ModelFactory = Callable[[DistEnv], Any]


def run_fit(
    build: ModelFactory,
    items: Sequence[Any],
    save_path: PathLike,
    *,
    update: bool = False,
    backend: Optional[str] = None,
    device: Optional[str] = None,
    shard_mode: str = "strided",
    progress: bool = True,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Any:
    """Fit ``build(env)`` on ``items`` over all torchrun ranks; rank 0 writes ``save_path``.

    ``backend`` defaults to nccl when ``device`` (or, if None, this machine) is CUDA, else gloo.
    ``update=True`` adds ``items`` to the already fitted model ``build`` returns (e.g. a loaded one).
    Returns the fitted model (the same on every rank).
    """
    with distributed_session(backend or default_backend(device), timeout_s) as env:
        model = build(env)
        return fit_distributed(
            model, items, update=update, save_path=save_path, shard_mode=shard_mode, progress=progress and env.is_main
        )


def run_predict(
    build: ModelFactory,
    items: Sequence[Any],
    output: Optional[PathLike] = None,
    *,
    on_result: Optional[ResultCallback] = None,
    backend: Optional[str] = None,
    device: Optional[str] = None,
    shard_mode: str = "strided",
    progress: bool = True,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[dict]:
    """Score ``items`` with ``build(env)`` over all torchrun ranks; rank 0 writes ``output`` (.csv/.json).

    Returns the records of every item in input order (on every rank).
    """
    with distributed_session(backend or default_backend(device), timeout_s) as env:
        model = build(env)
        return predict_sharded(
            model, items, output=output, on_result=on_result, shard_mode=shard_mode, progress=progress and env.is_main
        )
