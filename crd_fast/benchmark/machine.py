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

    from ..ops import cpu as cpu_kernels

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
        "fused_cpu_pass": cpu_kernels.available(),
        "fused_cpu_openmp": cpu_kernels.openmp(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def describe_machine(info: dict[str, Any]) -> str:
    gpu = info["cuda"] or "none"
    return (
        f"{info['cpu']}, {info['cores']} cores; torch {info['torch']} with {info['torch_threads']} threads, "
        f"faiss threads {info['faiss_threads']}; fused CPU pass built: {info['fused_cpu_pass']} "
        f"(OpenMP {info['fused_cpu_openmp']}); GPU: {gpu}; {info['date']}"
    )
