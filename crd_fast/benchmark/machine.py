"""The machine a timing was taken on: CPU, cores, torch threads, which kernels are built, GPU, date."""

from __future__ import annotations

import os
import platform
from datetime import datetime
from typing import Any, Optional


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info() -> dict[str, Any]:
    """What a timing depends on: CPU, cores, torch version and threads, the fused CPU pass, GPU, date."""
    import torch

    from ..ops import cpu

    try:
        import faiss

        faiss_threads: Optional[int] = int(faiss.omp_get_max_threads())
    except ImportError:
        faiss_threads = None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": faiss_threads,
        "fused_cpu_pass": cpu.available(),
        "fused_cpu_openmp": cpu.openmp(),
        "fused_cpu_bf16_isa": cpu.bf16_isa(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
    }


#: Set to 1 to time a crd_fast without its compiled fused CPU pass (the pure-torch fallback) on purpose.
ALLOW_REFERENCE_ENV = "CRD_BENCH_ALLOW_REFERENCE"


def require_fused_cpu_pass() -> None:
    """Refuse to time a crd_fast whose compiled fused CPU pass is missing, unless ALLOW_REFERENCE_ENV is 1.

    A source checkout on ``sys.path`` (``python -m pytest bench/suites`` from the repository root puts it first)
    shadows the installed, compiled package: its head then runs the pure-torch fallback, several times slower,
    and every figure would misstate crd-fast's speed without anything failing.
    """
    from ..ops import cpu

    if cpu.available() or os.environ.get(ALLOW_REFERENCE_ENV) == "1":
        return
    package = os.path.dirname(os.path.dirname(cpu.__file__))
    raise RuntimeError(
        f"crd_fast imported from {package} has no compiled fused CPU pass, so a benchmark "
        "would time the pure-torch fallback: install the package (pip install .) and run from a directory where "
        f"the source tree does not shadow it (e.g. cd bench/suites), or set {ALLOW_REFERENCE_ENV}=1 to time the "
        "fallback"
    )


def describe_machine(info: dict[str, Any]) -> str:
    gpu = info["cuda"] or "none"
    return (
        f"{info['cpu']}, {info['cores']} cores; torch {info['torch']} with {info['torch_threads']} threads, "
        f"faiss threads {info['faiss_threads']}; fused CPU pass built: {info['fused_cpu_pass']} "
        f"(OpenMP {info['fused_cpu_openmp']}); GPU: {gpu}; {info['date']}"
    )
