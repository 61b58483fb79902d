"""The op registry: one :class:`OpSpec` record per op, and :func:`register`, which makes it a torch custom op.

An op is described once, by data (crd_fast/ops/head_op.py and crd_fast/ops/residual_op.py hold the two of today):
its schema, input check, reference, output shape, CPU kernel, CUDA operands, kernels and launchers by backend, and
probe case. :func:`register` (called for every spec by crd_fast/ops/__init__.py) defines ``torch.ops.crd_fast.<name>``
with ``torch.library.custom_op`` and gives it the same four kernels for every op, each checking its inputs first:

* default (devices without a fused path): the reference, in the output dtype;
* ``"cpu"``: the op's CPU kernel (:func:`cpu_kernel`), or the reference when it is not built;
* ``"cuda"``: the one CUDA path (:func:`cuda_kernel`): the path crd_fast/ops/cuda_dispatch.py decided for this
  (op, device), the op's operands, the chosen backend's launcher; the reference for more maps than the kernels
  take, a reference decision, or operands that would have to be made inside CUDA-graph capture (one warning);
* fake: an empty tensor of the op's output shape, so ``torch.compile`` sees one opaque op with known shapes.

Every op takes the feature maps first and returns the score dtype of crd_fast/core/dtypes.py: float64 for float64
maps, float32 otherwise (:data:`output_dtype`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..core.dtypes import compute_dtype
from . import cuda_dispatch, streams
from .cuda_launch import Launcher
from .kernel_config import CONFIG
from .operands import Kernels, Operands

#: The namespace of every op: ``torch.ops.crd_fast.<name>``.
NAMESPACE = "crd_fast"

#: dtype of an op's result for feature maps of a dtype: the scoring rule of crd_fast/core/dtypes.py.
output_dtype = compute_dtype


def _always() -> bool:
    return True


@dataclass(frozen=True, eq=False)
class OpSpec:
    """One op of crd-fast, everything :func:`register` and the CUDA dispatch need to know about it.

    Callables taking the op's arguments get them as the schema lists them, feature maps first.
    """

    name: str  #: the op is ``torch.ops.crd_fast.<name>``
    schema: str  #: its torch schema, e.g. "(Tensor[] feature_maps, ...) -> Tensor"
    check: Callable[..., None]  #: refuses malformed arguments with an error naming the problem (shapes only)
    reference: Callable[..., Tensor]  #: the specification: the op's arguments, ``dtype=`` (float64 by default)
    out_shape: Callable[..., tuple[int, ...]]  #: the output shape for the op's arguments (the fake kernel)
    cpu: Optional[Callable[..., Tensor]] = None  #: the fused CPU kernel, on checked arguments
    cpu_ready: Callable[[], bool] = _always  #: whether ``cpu`` is built in this install
    #: the CUDA operands of checked arguments: the op's arguments, then ``capability=`` (None: the device's)
    cuda_operands: Optional[Callable[..., Operands]] = None
    kernels: Optional[Kernels] = None  #: its kernels in csrc/cuda/crd_head_kernels.cuh; None: CUDA takes the reference
    launchers: dict[str, Launcher] = field(default_factory=dict)  #: backend name -> launcher of ``kernels``
    probe_case: Optional[Callable[[], tuple]] = None  #: tiny CPU arguments the dispatch probes each backend with

    @property
    def qualname(self) -> str:
        return f"{NAMESPACE}::{self.name}"

    def torch_op(self) -> Any:
        """The registered op, ``torch.ops.crd_fast.<name>``."""
        return getattr(getattr(torch.ops, NAMESPACE), self.name)


#: Every registered op by name, in registration order (the first is the one crd_fast.backends() reports first).
OPS: dict[str, OpSpec] = {}


def reference_out(spec: OpSpec, *args: Any) -> Tensor:
    """The op's reference on checked arguments, in the output dtype, contiguous."""
    dtype = compute_dtype(args[0][0].dtype)
    return spec.reference(*args, dtype=dtype).contiguous()


def default_kernel(spec: OpSpec, *args: Any) -> Tensor:
    spec.check(*args)
    return reference_out(spec, *args)


def cpu_kernel(spec: OpSpec, *args: Any) -> Tensor:
    """The op on CPU tensors: its fused CPU kernel, or the reference when that is not built."""
    spec.check(*args)
    if spec.cpu is None or not spec.cpu_ready():
        return reference_out(spec, *args)
    return spec.cpu(*args)


def cuda_kernel(spec: OpSpec, *args: Any) -> Tensor:
    """The op on CUDA tensors: checks, then :func:`on_cuda`."""
    spec.check(*args)
    return on_cuda(spec, *args)


def on_cuda(spec: OpSpec, *args: Any) -> Tensor:
    """A checked op call on CUDA tensors: the kernel path the dispatch decided for this op on this device, or the
    reference (more maps than the kernels take, a reference decision, or tables to make inside CUDA-graph capture)."""
    feature_maps = args[0]
    if spec.kernels is None or CONFIG is None or len(feature_maps) > CONFIG.max_layers:
        return reference_out(spec, *args)
    choice = cuda_dispatch.decide(spec, feature_maps[0].device)
    if choice.path == "reference":
        return reference_out(spec, *args)
    assert spec.cuda_operands is not None, f"{spec.name} has kernels but no cuda_operands"
    maps = [f.detach() for f in feature_maps]
    try:
        operands = spec.cuda_operands(maps, *args[1:], capability=choice.capability)
    except streams.NotPrepared as exc:
        _warn_once(f"capture-{spec.name}", f"{exc}; this capture records the reference path")
        return reference_out(spec, *args)
    return spec.launchers[choice.path](operands)


def fake_kernel(spec: OpSpec, *args: Any) -> Tensor:
    spec.check(*args)
    first = args[0][0]
    return first.new_empty(spec.out_shape(*args), dtype=compute_dtype(first.dtype))


WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in WARNED:
        WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _bound(kernel: Callable[..., Tensor], spec: OpSpec, role: str) -> Callable[..., Tensor]:
    """``kernel`` with ``spec`` bound first, named after the op (torch.library reports kernels by name)."""

    def call(*args: Any) -> Tensor:
        return kernel(spec, *args)

    call.__name__ = call.__qualname__ = f"{spec.name}_{role}"
    call.__module__ = __name__
    return call


def register(spec: OpSpec) -> OpSpec:
    """Defines ``torch.ops.crd_fast.<spec.name>`` from ``spec.schema`` with its default, CPU, CUDA and fake kernels.

    ValueError when an op of that name is already registered.
    """
    if spec.name in OPS:
        raise ValueError(f"an op named {spec.qualname} is already registered")
    op = torch.library.custom_op(
        spec.qualname, _bound(default_kernel, spec, "default"), mutates_args=(), schema=spec.schema
    )
    op.register_kernel("cpu")(_bound(cpu_kernel, spec, "cpu"))
    op.register_kernel("cuda")(_bound(cuda_kernel, spec, "cuda"))
    op.register_fake(_bound(fake_kernel, spec, "fake"))
    OPS[spec.name] = spec
    return spec
