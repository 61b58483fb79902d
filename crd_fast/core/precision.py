"""Compute precision of the backbone and the head: "auto", "fp32", "bf16" or "fp16", chosen at run time.

    choice = resolve_precision("auto", torch.device("cpu"))
    choice.precision, choice.reason     # e.g. "bf16", "processor has native bf16 (avx512_bf16) ..."
    with choice.autocast():
        maps = extractor(x.contiguous(memory_format=torch.channels_last))

* "fp32": float32 everywhere (the exact path);
* "bf16": the backbone under ``torch.autocast`` in bfloat16 (oneDNN / cuDNN accumulate in float32) and,
  on the CPU, the head's per-layer projection GEMM in bfloat16 (float32 accumulation), whose bf16 result
  the fused pass reads directly with float32 arithmetic; the fit's statistics stay float64 either way;
* "fp16": the same with float16 (meant for CUDA devices without bf16);
* "auto": bf16 where the hardware runs it natively (AVX512_BF16 or AMX_BF16 on the CPU, a CUDA device
  with bf16) and, on the CPU, where it also pays: a native bf16 instruction set is not always faster than
  float32 (Intel cores without AMX issue one bf16 dot product per cycle against two float32 FMAs), so "auto"
  times one wide_resnet bottleneck block both ways, once per process, and keeps bf16 only if it is at least
  ``AUTO_BF16_MIN_SPEEDUP`` times faster; fp32 elsewhere. ``PrecisionChoice.reason`` says what was chosen
  and why, with the measured ratio.

With bf16/fp16, and with the fp32 that "auto" chose, the backbone runs channels_last (oneDNN's convolutions
are faster in that layout, and the fused head reads channels_last maps without a copy). An explicit "fp32"
keeps the contiguous layout: its scores stay bit-identical to earlier versions' (channels_last makes fp32
~1.10x faster end to end on both processors measured, at ~1e-7 differences).

Tolerances (docs/DESIGN.md "Compute precision"): fp32 scores agree to
~1e-5 relative; bf16 rounds every activation to 8 significant bits, so feature maps differ by ~1%
(relative Frobenius error) and patch scores by ~1-2%. ``TOLERANCE`` holds the bounds the tests check.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from ..choices import DEFAULT_PRECISION, PRECISIONS  # noqa: F401  (names a detector accepts; its default)

#: The autocast dtype of each concrete precision (None: no autocast).
AUTOCAST_DTYPES: dict[str, Optional[torch.dtype]] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Relative error bounds the tests hold each precision to, against the float64 reference:
#: ||features - ref|| / ||ref|| and max |score - ref| / max |ref score|.
TOLERANCE: dict[str, dict[str, float]] = {
    "fp32": {"features": 1e-4, "scores": 1e-4},
    "bf16": {"features": 3e-2, "scores": 3e-2},
    "fp16": {"features": 5e-3, "scores": 5e-3},
}
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
#: "auto" keeps bf16 on the CPU only when the probe block runs at least this much faster than in float32
#: (a margin over timing noise: below it the ~1% bf16 feature error buys too little).
AUTO_BF16_MIN_SPEEDUP = 1.15


def check_precision_name(precision: str) -> str:
    """``precision`` when it is one of ``PRECISIONS``; a clear error otherwise."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The processor's feature flags from /proc/cpuinfo (empty where that file does not exist)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_native_bf16() -> tuple[bool, str]:
    """(True, why) when this processor runs bfloat16 arithmetic natively; (False, why) otherwise.

    Native means an AVX512_BF16 or AMX_BF16 flag and a oneDNN build that uses it
    (``torch.ops.mkldnn._is_mkldnn_bf16_supported``); without them bf16 is emulated and slower than fp32.
    """
    flags = sorted(f for f in _CPU_BF16_FLAGS if f in cpu_flags())
    capability = torch.backends.cpu.get_cpu_capability()
    if not flags:
        return False, f"processor has no avx512_bf16/amx_bf16 flag (torch CPU capability {capability})"
    try:
        onednn = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = False
    if not onednn:
        return False, f"processor has {'/'.join(flags)} but this torch build's oneDNN does not use bf16"
    return True, f"processor has native bf16 ({'/'.join(flags)}, torch CPU capability {capability})"


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup(batch: int = 4, rounds: int = 3) -> float:
    """How many times faster one wide_resnet50_2 layer3 bottleneck block runs under bf16 autocast than in
    float32 on this processor (both channels_last, as the detector runs them); measured once per process.

    The block (1x1 512->256, 3x3 256->256, 1x1 256->1024 with batch norm and ReLU, on a (4, 512, 14, 14)
    input: ~0.8 GMAC) has the backbone's mix of convolutions; the two precisions alternate ``rounds`` times
    after a warm-up and the best time of each counts, so load on a shared machine hits both alike. It takes
    about 0.1 s on two cores.
    """
    nn = torch.nn
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        block = (
            nn.Sequential(
                nn.Conv2d(512, 256, 1, bias=False),
                nn.BatchNorm2d(256),
                nn.ReLU(),
                nn.Conv2d(256, 256, 3, padding=1, bias=False),
                nn.BatchNorm2d(256),
                nn.ReLU(),
                nn.Conv2d(256, 1024, 1, bias=False),
                nn.BatchNorm2d(1024),
            )
            .eval()
            .to(memory_format=torch.channels_last)
        )
        x = torch.randn(batch, 512, 14, 14).contiguous(memory_format=torch.channels_last)
    finally:
        torch.random.set_rng_state(generator_state)  # the probe leaves the caller's random stream alone

    def seconds(bf16: bool) -> float:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            start = time.perf_counter()
            block(x)
            return time.perf_counter() - start

    seconds(False), seconds(True)  # first calls: oneDNN primitive creation and weight reorders
    best = {False: float("inf"), True: float("inf")}
    for _ in range(rounds):
        for bf16 in (False, True):
            best[bf16] = min(best[bf16], seconds(bf16))
    return best[False] / best[True]


def bf16_pays(device: torch.device) -> tuple[bool, str]:
    """Whether "auto" should run bf16 on ``device``, and why: native bf16 and, on the CPU, a measured speedup
    of at least ``AUTO_BF16_MIN_SPEEDUP`` (``cpu_bf16_speedup``). Tests monkeypatch this or its parts."""
    native, why = native_bf16(device)
    if not native or device.type != "cpu":
        return native, why
    speedup = cpu_bf16_speedup()
    measured = f"a bf16 bottleneck block measured {speedup:.2f}x its float32 speed here"
    if speedup >= AUTO_BF16_MIN_SPEEDUP:
        return True, f"{why}; {measured}"
    return False, f"{why}, but {measured} (auto needs {AUTO_BF16_MIN_SPEEDUP:.2f}x)"


def cuda_native_bf16(device: torch.device) -> tuple[bool, str]:
    """(True, why) when the CUDA ``device`` computes bf16 natively (compute capability 8.0 or newer)."""
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    name = torch.cuda.get_device_name(index)
    if major >= 8 and torch.cuda.is_bf16_supported(including_emulation=False):
        return True, f"{name} (sm_{major}{minor}) has native bf16"
    return False, f"{name} (sm_{major}{minor}) has no native bf16"


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether ``device`` runs bf16 natively, and why (the function "auto" asks; tests monkeypatch it)."""
    if device.type == "cpu":
        return cpu_native_bf16()
    if device.type == "cuda":
        return cuda_native_bf16(device)
    return False, f"no bf16 detection for device type {device.type!r}"


@dataclass(frozen=True)
class PrecisionChoice:
    """A resolved precision: what was asked, what runs, on which device type, and why."""

    requested: str
    precision: str
    device_type: str
    reason: str

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        """The autocast dtype (None for fp32)."""
        return AUTOCAST_DTYPES[self.precision]

    @property
    def channels_last(self) -> bool:
        """Whether the backbone runs channels_last: with reduced precision, and with float32 that "auto" chose
        (it promises speed: channels_last float32 measured 1.10x the contiguous path end to end on the Intel
        Xeon and on Zen 4, bench/suites/bench_precision.py). An explicit "fp32" keeps the contiguous layout, so
        its scores stay bit-identical to those of model files written before compute precisions (channels_last
        convolutions round differently, ~1e-7)."""
        return self.precision != "fp32" or self.requested == "auto"

    @property
    def head_gemm_dtype(self) -> Optional[torch.dtype]:
        """dtype of the CPU head's projection GEMM (None: the maps' own float32)."""
        return self.autocast_dtype if self.device_type == "cpu" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        """A context running the backbone in this precision (a no-op for fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.autocast_dtype)

    def describe(self) -> str:
        """One line for logs: 'precision bf16 (auto): <reason>'."""
        return f"precision {self.precision} ({self.requested}): {self.reason}"


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> PrecisionChoice:
    """The concrete precision for ``precision`` on ``device``.

    "auto" takes bf16 where ``bf16_pays`` says yes (native bf16 that measured faster than float32 on the
    CPU) and fp32 elsewhere. An explicit "bf16" or "fp16" is
    honoured even without native support (torch emulates it: the results keep bf16's tolerance, but it
    is usually slower than fp32); the reason says so.
    """
    check_precision_name(precision)
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda") and precision != "fp32":
        if precision == "auto":
            return PrecisionChoice(precision, "fp32", dev.type, f"no reduced precision on {dev.type}: fp32")
        raise ValueError(f"precision {precision!r} is supported on cpu and cuda devices, not {dev.type}")
    if precision == "fp32":
        return PrecisionChoice(precision, "fp32", dev.type, "requested")
    if precision == "auto":
        pays, why = bf16_pays(dev)
        return PrecisionChoice(precision, "bf16" if pays else "fp32", dev.type, why)
    native, why = native_bf16(dev)
    if precision == "bf16":
        return PrecisionChoice(precision, "bf16", dev.type, "requested" + ("" if native else f" (emulated: {why})"))
    note = "" if dev.type == "cuda" else " (CPU float16 is emulated)"
    return PrecisionChoice(precision, "fp16", dev.type, "requested" + note)


_HEAD_GEMM_DTYPE: contextvars.ContextVar[Optional[torch.dtype]] = contextvars.ContextVar(
    "crd_head_gemm_dtype", default=None
)


@contextlib.contextmanager
def head_gemm_dtype(dtype: Optional[torch.dtype]) -> Iterator[None]:
    """Within this context the CPU fused head runs its per-layer projection GEMM in ``dtype`` (bf16/fp16).

    The fused pass computes in float32: it reads a bf16 result as it is (crd_fast/ops/cpu.py) and an fp16 one
    taken to float32. A context variable, so threads and tasks that did not enter the context keep float32.
    """
    if dtype not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"the head GEMM dtype must be None, bfloat16 or float16, got {dtype}")
    token = _HEAD_GEMM_DTYPE.set(dtype)
    try:
        yield
    finally:
        _HEAD_GEMM_DTYPE.reset(token)


def current_head_gemm_dtype() -> Optional[torch.dtype]:
    """The dtype set by the innermost ``head_gemm_dtype`` context (None outside one)."""
    return _HEAD_GEMM_DTYPE.get()
