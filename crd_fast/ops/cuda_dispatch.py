"""Which path an op takes on each CUDA device: native -> CuPy -> reference, checked once and never raising.

For each (op, CUDA device), the first backend of :data:`BACKENDS` that passes its checks is used
(docs/GPU.md "Which path a GPU gets"):

1. "native", the kernels compiled into ``_C``: the build has CUDA kernels, it has the op's kernels (a build from
   before them lacks them: absent, not failed), it carries code for the device (a real architecture of the same
   major version at or below it, or PTX at or below it), and the op's probe (a tiny call launched and compared
   with the reference) passes;
2. "cupy", the same source compiled by NVRTC: CuPy imports, the source compiles for this device, and the
   probe passes;
3. "reference", the pure-torch op (always works).

Devices below :data:`MIN_CAPABILITY` go straight to the reference. The decision is made at the first call of an
op on a device and cached per (op, device); when a backend that is installed could not be used, or the reference
is what remains, one ``RuntimeWarning`` names the op, the path and why. Each op decides on its own, so a kernel
that fails its probe sends only its own op to the reference. ``crd_fast.backends()`` reports the decisions of
every device (:func:`device_report`). ``CRD_FAST_CUDA_BACKEND`` forces a path (benchmarks and checks): no probe,
no fallback.

A backend is one :class:`Backend` record: its launcher factory (an op's :class:`~crd_fast.ops.operands.Kernels`
-> launcher), its full check (which may compile) and its static check (inside CUDA-graph capture). An op's
launchers are :func:`launchers` of its kernels (crd_fast/ops/registry.py ``OpSpec``).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import torch

from . import cuda_launch, cupy_jit, native, streams
from .kernel_config import CONFIG
from .operands import Kernels

if TYPE_CHECKING:  # the registry uses this module; an op spec is only passed in
    from .registry import OpSpec

#: Environment override of the CUDA path (for benchmarks and checks): native, cupy or reference.
BACKEND_ENV = "CRD_FAST_CUDA_BACKEND"
#: Oldest device the kernels are built for (Turing, sm_75: the oldest CUDA 13 supports).
MIN_CAPABILITY = (7, 5)
#: A backend's problem with a device: (why, whether it is plain absence) or None when it can serve.
Problem = Optional[tuple[str, bool]]


@dataclass(frozen=True)
class Choice:
    """The path of one op on one device and why: ``skipped`` maps each path passed over to the reason."""

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


def native_problem(kernels: Kernels, cap: tuple[int, int]) -> Problem:
    """Why the compiled kernels cannot serve ``kernels`` on a device of ``cap``, and whether it is plain absence."""
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
    if not cuda_launch.has_compiled(kernels):
        return f"crd_fast.ops._C was built before the {kernels.name} kernels (rebuild it)", True
    return None


def cupy_problem(index: int) -> Problem:
    """Why the CuPy build cannot serve device ``index`` (compiling it once if needed), and whether absent."""
    if not cupy_jit.available():
        return "cupy is not installed (pip install crd-fast[cupy])", True
    error = cupy_jit.compile_error(index)
    return (f"NVRTC build failed: {error}", False) if error else None


# ---- the backends, in the order they are tried ---------------------------------------------------------------
@dataclass(frozen=True)
class Backend:
    """One way of running the kernels on a GPU.

    ``launcher(kernels)`` makes an op's launcher; ``problem(kernels, index, cap)`` says why it cannot serve that
    op on device ``index`` (may compile; None: it can, pending the probe); ``installed(kernels, cap)`` is the
    static part of that check, all that may run inside CUDA-graph capture.
    """

    name: str
    launcher: Callable[[Kernels], cuda_launch.Launcher]
    problem: Callable[[Kernels, int, tuple[int, int]], Problem]
    installed: Callable[[Kernels, tuple[int, int]], bool]


# module functions looked up at call time, so tests can fake either check
def _native_problem(kernels: Kernels, index: int, cap: tuple[int, int]) -> Problem:
    return native_problem(kernels, cap)


def _native_installed(kernels: Kernels, cap: tuple[int, int]) -> bool:
    return native_problem(kernels, cap) is None


def _cupy_problem(kernels: Kernels, index: int, cap: tuple[int, int]) -> Problem:
    return cupy_problem(index)


def _cupy_installed(kernels: Kernels, cap: tuple[int, int]) -> bool:
    return cupy_jit.available()


BACKENDS = (
    Backend("native", cuda_launch.compiled_launcher, _native_problem, _native_installed),
    Backend("cupy", cupy_jit.launcher, _cupy_problem, _cupy_installed),
)
#: Every path a device can take: the kernel backends in order, then the pure-torch reference.
PATHS = (*(b.name for b in BACKENDS), "reference")


def launchers(kernels: Kernels) -> dict[str, cuda_launch.Launcher]:
    """An op's launchers by backend name (what ``OpSpec.launchers`` holds)."""
    return {b.name: b.launcher(kernels) for b in BACKENDS}


# ---- the probe ---------------------------------------------------------------------------------------------
def _probe_case(run: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> Optional[str]:
    """``run()`` -> (kernel result, reference); the problem (a failed launch or a wrong result) or None."""
    try:
        got, want = run()
        got = got.double().cpu()  # asynchronous launch errors surface here, inside the try
    except Exception as exc:  # no kernel image, launch failure, compile failure: the path is unusable
        return f"probe launch failed: {type(exc).__name__}: {str(exc).strip()[:200]}"
    return _compare(got, want)


def probe(spec: OpSpec, path: str, device: torch.device) -> Optional[str]:
    """Runs the op's tiny probe case through ``path`` on ``device`` and compares it with the float64 reference;
    the problem (a failed launch or a wrong result) or None."""

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        maps, *rest = spec.probe_case()
        want = spec.reference(maps, *rest)
        moved = [t.to(device) if isinstance(t, torch.Tensor) else t for t in rest]
        ops = spec.cuda_operands([m.to(device) for m in maps], *moved)
        return spec.launchers[path](ops), want

    return _probe_case(run)


def _compare(got: torch.Tensor, want: torch.Tensor) -> Optional[str]:
    if got.shape != want.shape:
        return f"probe result has shape {tuple(got.shape)}, the reference {tuple(want.shape)}"
    err = float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want))
    if not err < 1e-4:  # float32 kernels agree to ~1e-7 here; NaN fails too
        return f"probe result differs from the reference (relative error {err:.2e})"
    return None


# ---- the decision ------------------------------------------------------------------------------------------
class _Choices:
    """Decisions per (op name, device index)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_index: dict[tuple[str, int], Choice] = {}

    def get(self, op: str, index: int) -> Optional[Choice]:
        with self._lock:
            return self._by_index.get((op, index))

    def put(self, op: str, index: int, choice: Choice) -> None:
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


def decide(spec: OpSpec, device: torch.device) -> Choice:
    """The path of the op ``spec`` on CUDA ``device``, cached per (op, device) after the first decision.

    See the module docstring for the steps.
    """
    path = forced()
    index = device_index(device)
    if path is not None:
        return Choice(path, f"forced by {BACKEND_ENV}", device=f"cuda:{index}", capability=capability(index))
    hit = CHOICES.get(spec.name, index)
    if hit is not None:
        return hit
    cap = capability(index)
    name = f"cuda:{index} ({device_name(index)}, sm_{cap[0]}{cap[1]})"
    skipped: dict[str, str] = {}
    failed = False  # an installed path could not be used: worth a warning
    capture = streams.capturing(torch.device("cuda", index))
    choice: Optional[Choice] = None
    if cap < MIN_CAPABILITY:
        skipped = {b.name: f"sm_{cap[0]}{cap[1]} is below the oldest supported sm_75" for b in BACKENDS}
        failed = True
    else:
        for backend in BACKENDS:
            if capture:  # no compile, no probe (nor caching) while capturing: static checks only
                if backend.installed(spec.kernels, cap):
                    reason = "static checks only (first use inside CUDA-graph capture)"
                    return Choice(backend.name, reason, skipped, name, cap)
                continue
            problem = backend.problem(spec.kernels, index, cap)
            if problem is None:
                why = probe(spec, backend.name, torch.device("cuda", index))
                problem = None if why is None else (why, False)
            if problem is None:
                choice = Choice(backend.name, "checks and probe passed", skipped, name, cap)
                break
            skipped[backend.name] = problem[0]
            failed = failed or not problem[1]
    if choice is None and capture:  # nothing installed that could run: decided again after the capture
        return Choice("reference", "no kernel path installed (inside CUDA-graph capture)", skipped, name, cap)
    if choice is None:
        choice = Choice("reference", "no kernel path could be used", skipped, name, cap)
    if failed or choice.path == "reference":
        details = "; ".join(f"{p}: {why}" for p, why in skipped.items())
        warnings.warn(
            f"crd_fast: CUDA device {name} uses the {choice.path} path of {spec.name} ({details}); see docs/GPU.md",
            RuntimeWarning,
            stacklevel=3,
        )
    CHOICES.put(spec.name, index, choice)
    return choice


def device_report(specs: Sequence[OpSpec]) -> list[dict]:
    """The decisions for every visible CUDA device (probing each once); [] without CUDA.

    One entry per device: the first op's decision (``Choice.as_dict``), and each other op's path, reason and skipped
    paths under its name (e.g. "crd_residual").
    """
    if not torch.cuda.is_available() or not specs:
        return []
    report = []
    for i in range(torch.cuda.device_count()):
        first, *others = specs
        entry = decide(first, torch.device("cuda", i)).as_dict()
        for spec in others:
            choice = decide(spec, torch.device("cuda", i))
            entry[spec.name] = {"path": choice.path, "reason": choice.reason, "skipped": dict(choice.skipped)}
        report.append(entry)
    return report


def reset() -> None:
    """Forgets every decision and CuPy build (tests; a changed environment)."""
    CHOICES.clear()
    cupy_jit.MODULES.clear()
