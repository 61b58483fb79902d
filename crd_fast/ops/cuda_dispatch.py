"""Which path CUDA tensors take, per device: native -> CuPy -> reference, checked once and never raising.

For each CUDA device, the first path that passes its checks is used (docs/GPU.md "Which path a GPU gets"):

1. "native", the kernels compiled into ``_C``: the build has CUDA kernels, it carries code for the device
   (a real architecture of the same major version at or below it, or PTX at or below it), and a probe (a
   tiny head launched and compared with the reference) passes;
2. "cupy", the same source compiled by NVRTC: CuPy imports, the source compiles for this device, and the
   probe passes;
3. "reference", the pure-torch head (always works).

Devices below :data:`MIN_CAPABILITY` go straight to the reference. The decision is made at the first
call on a device, cached per device, and when a path that is installed could not be used, or the
reference is what remains, one ``RuntimeWarning`` says so and why. ``crd_fast.backends()`` reports the
decision of every device. ``CRD_FAST_CUDA_BACKEND`` forces a path (benchmarks and checks): no probe, no
fallback.

Each op decides on its own (:data:`OPS`): ``crd_fast::crd_head`` and ``crd_fast::crd_residual`` (the local
head's fused part) take the same steps with their own probe, cache entry and warning, so a residual kernel
that fails its probe sends only the residual op to the reference. The native path of the residual op also
needs a ``_C`` built with the residual kernels (an older CUDA build lacks them: absent, not failed).
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import cuda as kernels
from . import cupy_jit, native, reference, streams
from .kernel_config import CONFIG

PATHS = ("native", "cupy", "reference")
#: The ops that decide a path per device; the first is the default of :func:`decide`.
HEAD, RESIDUAL = "crd_head", "crd_residual"
OPS = (HEAD, RESIDUAL)
#: Environment override of the CUDA path (for benchmarks and checks): native, cupy or reference.
BACKEND_ENV = "CRD_FAST_CUDA_BACKEND"
#: Oldest device the kernels are built for (Turing, sm_75: the oldest CUDA 13 supports).
MIN_CAPABILITY = (7, 5)


@dataclass(frozen=True)
class Choice:
    """The path of one device and why: ``skipped`` maps each path passed over to the reason."""

    path: str
    reason: str
    skipped: dict[str, str] = field(default_factory=dict)
    device: str = ""
    capability: Optional[tuple[int, int]] = None

    def as_dict(self) -> dict:
        cap = f"{self.capability[0]}.{self.capability[1]}" if self.capability else None
        return {
            "device": self.device,
            "capability": cap,
            "path": self.path,
            "reason": self.reason,
            "skipped": dict(self.skipped),
        }


# ---- device facts (functions, so tests fake them on a CPU-only machine) -----------------------------------
def device_index(device: torch.device) -> int:
    device = torch.device(device)
    return device.index if device.index is not None else torch.cuda.current_device()


def capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))  # type: ignore[return-value]


def device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


# ---- static checks -----------------------------------------------------------------------------------------
def image_for(archs: Optional[tuple[str, ...]], cap: tuple[int, int]) -> Optional[bool]:
    """Whether a build for CMake CUDA architectures ``archs`` has code that runs on ``cap``; None if unknown.

    "80-real" is SASS for sm_80 (runs on 8.x at or above 8.0), "90-virtual" PTX (JIT-compiled for any
    device at or above 9.0), a bare "90" both. Keywords such as "native" or "all" are unknown.
    """
    if not archs:
        return None
    want = 10 * cap[0] + cap[1]
    for arch in archs:
        number, _, kind = arch.partition("-")
        if not number.isdigit():
            return None
        a = int(number)
        if kind in ("", "real") and a // 10 == cap[0] and a <= want:
            return True
        if kind in ("", "virtual") and a <= want:
            return True
    return False


def native_problem(cap: tuple[int, int]) -> Optional[tuple[str, bool]]:
    """Why the compiled kernels cannot serve a device of ``cap``, and whether it is plain absence; else None."""
    if CONFIG is None:
        return "crd_head_kernels.cuh is missing from this install", True
    if not native.has_native_cuda():
        why = "crd_fast.ops._C has no CUDA kernels"
        if not native.has_native():
            why = f"_C not built ({native.import_error()})"
        return why, True
    archs = native.cuda_archs()
    if image_for(archs, cap) is False:
        return f"_C carries code for {','.join(archs or ())}, none runs on sm_{cap[0]}{cap[1]}", False
    return None


def native_residual_problem() -> Optional[tuple[str, bool]]:
    """Why the compiled module lacks the residual kernels (absent: a build from before them), else None."""
    if native.has_native_cuda() and not hasattr(native.compiled(), "crd_residual_cuda"):
        return "crd_fast.ops._C was built before the crd_residual kernels (rebuild it)", True
    return None


def cupy_problem(index: int) -> Optional[tuple[str, bool]]:
    """Why the CuPy build cannot serve device ``index`` (compiling it once if needed), and whether absent."""
    if not cupy_jit.available():
        return "cupy is not installed (pip install crd-fast[cupy])", True
    error = cupy_jit.compile_error(index)
    return (f"NVRTC build failed: {error}", False) if error else None


# ---- the probe ---------------------------------------------------------------------------------------------
def _probe_case(run: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> Optional[str]:
    """``run()`` -> (kernel result, reference); the problem (a failed launch or a wrong result) or None."""
    try:
        got, want = run()
        got = got.double().cpu()  # asynchronous launch errors surface here, inside the try
    except Exception as exc:  # no kernel image, launch failure, compile failure: the path is unusable
        return f"probe launch failed: {type(exc).__name__}: {str(exc).strip()[:200]}"
    return _compare(got, want)


def probe(path: str, device: torch.device) -> Optional[str]:
    """Runs a tiny head through ``path`` on ``device`` and compares it with the reference; the problem or None."""

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        maps = [torch.randn(1, 3, 5, 4, generator=gen), torch.randn(1, 2, 3, 3, generator=gen)]
        matrix, offset = torch.randn(3, 5, generator=gen), torch.randn(5, generator=gen)
        want = reference.crd_head(maps, matrix, offset)
        ops = kernels.prepare([m.to(device) for m in maps], matrix.to(device), offset.to(device), "concat", 1)
        return kernels.run(ops, path), want

    return _probe_case(run)


def probe_residual(path: str, device: torch.device) -> Optional[str]:
    """:func:`probe` for the residual kernels: a tiny crd_residual (odd grid, two layers) against the reference."""

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(1)
        maps = [torch.randn(2, 3, 5, 4, generator=gen), torch.randn(2, 2, 3, 3, generator=gen)]
        matrix, q = torch.randn(3, 5, generator=gen), torch.randn(20, 3, generator=gen)
        want = reference.crd_residual(maps, matrix, q)
        ops = kernels.prepare_residual([m.to(device) for m in maps], matrix.to(device), q.to(device), "concat", 1)
        return kernels.run_residual(ops, path), want

    return _probe_case(run)


def _compare(got: torch.Tensor, want: torch.Tensor) -> Optional[str]:
    if got.shape != want.shape:
        return f"probe result has shape {tuple(got.shape)}, the reference {tuple(want.shape)}"
    err = float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want))
    if not err < 1e-4:  # float32 kernels agree to ~1e-7 here; NaN fails too
        return f"probe result differs from the reference (relative error {err:.2e})"
    return None


def _probe(op: str, path: str, device: torch.device) -> Optional[str]:
    # looked up at call time, so tests can fake either probe
    return probe(path, device) if op == HEAD else probe_residual(path, device)


def _native_problem(op: str, cap: tuple[int, int]) -> Optional[tuple[str, bool]]:
    problem = native_problem(cap)
    if problem is None and op == RESIDUAL:
        problem = native_residual_problem()
    return problem


# ---- the decision ------------------------------------------------------------------------------------------
class _Choices:
    """Decisions per (op, device index)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_index: dict[tuple[str, int], Choice] = {}

    def get(self, index: int, op: str = HEAD) -> Optional[Choice]:
        with self._lock:
            return self._by_index.get((op, index))

    def put(self, index: int, choice: Choice, op: str = HEAD) -> None:
        with self._lock:
            self._by_index[(op, index)] = choice

    def clear(self) -> None:
        with self._lock:
            self._by_index.clear()


CHOICES = _Choices()


def forced() -> Optional[str]:
    """The path forced by ``CRD_FAST_CUDA_BACKEND``, or None; ValueError for an unknown name."""
    value = os.environ.get(BACKEND_ENV)
    if not value:
        return None
    if value not in PATHS:
        raise ValueError(f"{BACKEND_ENV} must be one of {PATHS}, got {value!r}")
    return value


def decide(device: torch.device, op: str = HEAD) -> Choice:
    """The path of ``op`` (one of :data:`OPS`) on CUDA ``device``, cached per (op, device) after the first decision.

    See the module docstring for the steps; ValueError for an unknown op.
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    path = forced()
    index = device_index(device)
    if path is not None:
        return Choice(path, f"forced by {BACKEND_ENV}", device=f"cuda:{index}", capability=capability(index))
    hit = CHOICES.get(index, op)
    if hit is not None:
        return hit
    cap = capability(index)
    name = f"cuda:{index} ({device_name(index)}, sm_{cap[0]}{cap[1]})"
    skipped: dict[str, str] = {}
    failed = False  # an installed path could not be used: worth a warning
    capture = streams.capturing(torch.device("cuda", index))
    choice: Optional[Choice] = None
    if cap < MIN_CAPABILITY:
        skipped = {p: f"sm_{cap[0]}{cap[1]} is below the oldest supported sm_75" for p in ("native", "cupy")}
        failed = True
    else:
        for path in ("native", "cupy"):
            if capture:  # no compile, no probe (nor caching) while capturing: static checks only
                ready = _native_problem(op, cap) is None if path == "native" else cupy_jit.available()
                if ready:
                    return Choice(path, "static checks only (first use inside CUDA-graph capture)", skipped, name, cap)
                continue
            problem = _native_problem(op, cap) if path == "native" else cupy_problem(index)
            if problem is None:
                why = _probe(op, path, torch.device("cuda", index))
                problem = None if why is None else (why, False)
            if problem is None:
                choice = Choice(path, "checks and probe passed", skipped, name, cap)
                break
            skipped[path] = problem[0]
            failed = failed or not problem[1]
    if choice is None and capture:  # nothing installed that could run: decided again after the capture
        return Choice("reference", "no kernel path installed (inside CUDA-graph capture)", skipped, name, cap)
    if choice is None:
        choice = Choice("reference", "no kernel path could be used", skipped, name, cap)
    if failed or choice.path == "reference":
        details = "; ".join(f"{p}: {why}" for p, why in skipped.items())
        warnings.warn(
            f"crd_fast: CUDA device {name} uses the {choice.path} path of {op} ({details}); see docs/GPU.md",
            RuntimeWarning,
            stacklevel=3,
        )
    CHOICES.put(index, choice, op)
    return choice


def device_report() -> list[dict]:
    """The crd_head decision for every visible CUDA device (probing each once), with the crd_residual one
    under the key "crd_residual"; [] without CUDA."""
    if not torch.cuda.is_available():
        return []
    report = []
    for i in range(torch.cuda.device_count()):
        entry = decide(torch.device("cuda", i)).as_dict()
        residual = decide(torch.device("cuda", i), RESIDUAL)
        entry[RESIDUAL] = {"path": residual.path, "reason": residual.reason, "skipped": dict(residual.skipped)}
        report.append(entry)
    return report


def reset() -> None:
    """Forgets every decision and CuPy build (tests; a changed environment)."""
    CHOICES.clear()
    cupy_jit.MODULES.clear()
