"""What the GPU tests check, as plain functions: cases, inputs, the tolerance model, one launch checked twice.

The tests in this folder call these with the real launchers on a GPU; tests/test_gpu_check.py calls the same ones
on the CPU with emulated launchers (right and deliberately broken), so the checks themselves are tested on every
machine. Nothing here needs CUDA.

Tolerance model: float32/float64 operands are compared with the float64 reference; float16/bfloat16 operands with
a model that makes the kernels' own roundings (each embedding value rounded once to the operand type, the folded
matrix cast to it, q in float32), so the remaining error is float32 accumulation and a kernel that skipped or
added a rounding is caught. Errors are norm-relative: max |got - want| / max |want| over the whole output.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from crd_fast.core.embedding import embed_patches, embedding_dim, patch_matrix
from crd_fast.ops import cuda_dispatch, reference, registry
from crd_fast.ops.plan import fold_matrix

#: Base seed of every input; bench/gpu_check.py passes --seed through CRD_FAST_GPU_SEED.
DEFAULT_SEED = 20261201
SEED_ENV = "CRD_FAST_GPU_SEED"
#: Norm-relative tolerances (max |got - want| / max |want|) per operand dtype: float32/float64 against the float64
#: reference, half precision against the same-roundings model (the kernel's remaining error is float32 accumulation).
TOLERANCES = {"float64": 1e-12, "float32": 2e-5, "float16": 2e-5, "bfloat16": 2e-5}
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
SANITIZER_TARGET = Path(__file__).resolve().parent / "sanitizer_target.py"


def seed() -> int:
    """The base seed: $CRD_FAST_GPU_SEED, else :data:`DEFAULT_SEED`."""
    value = os.environ.get(SEED_ENV)
    return int(value) if value else DEFAULT_SEED


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[1]


def norm_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| over the whole output (inf when anything is not finite or the shapes differ;
    0 for empty outputs)."""
    got, want = got.double().cpu(), want.double().cpu()
    if got.shape != want.shape:
        return math.inf
    if got.numel() == 0:
        return 0.0
    if not bool(torch.isfinite(got).all()):
        return math.inf
    scale = float(want.abs().max())
    err = float((got - want).abs().max())
    return err / scale if scale > 0 else (0.0 if err == 0 else math.inf)


def _rounded_projection(maps, matrix, embedding: str, target_dim: int, operand: torch.dtype) -> torch.Tensor:
    """(N, r) rows P' e of the same-roundings model: embedding and folded matrix rounded once to ``operand``."""
    channels = [int(m.shape[1]) for m in maps]
    device = maps[0].device
    zero = torch.zeros(matrix.shape[1], dtype=torch.float64, device=device)
    p, _ = fold_matrix(matrix.double().to(device), zero, channels, embedding, target_dim)
    emb = patch_matrix(embed_patches([m.double() for m in maps], "concat")).to(operand).double()
    return emb @ p.to(operand).double().T


def expected_scores(maps, matrix, offset, embedding: str, target_dim: int, operand: torch.dtype) -> torch.Tensor:
    """What head kernels with ``operand`` dtype should return, in float64: the reference for float32/float64
    operands, else the same-roundings model (q = P mu in float32)."""
    if operand in (torch.float32, torch.float64):
        return reference.crd_head(maps, matrix, offset, embedding, target_dim)
    b, _, h, w = maps[0].shape
    device = maps[0].device
    channels = [int(m.shape[1]) for m in maps]
    _, q = fold_matrix(matrix.double().to(device), offset.double().to(device), channels, embedding, target_dim)
    z = _rounded_projection(maps, matrix, embedding, target_dim, operand) - q.float().double()
    return torch.linalg.vector_norm(z, dim=1).reshape(b, h, w)


def expected_residuals(maps, matrix, q, embedding: str, target_dim: int, operand: torch.dtype) -> torch.Tensor:
    """What residual kernels with ``operand`` dtype should return, (B, h, w, r) in float64: the reference for
    float32/float64 operands, else the same-roundings model (q in float32)."""
    if operand in (torch.float32, torch.float64):
        return reference.crd_residual(maps, matrix, q, embedding, target_dim)
    b, _, h, w = maps[0].shape
    rows = _rounded_projection(maps, matrix, embedding, target_dim, operand).reshape(b, h * w, -1)
    return (rows - q.to(maps[0].device).float().double()).reshape(b, h, w, -1)


def head_offset(gen: torch.Generator, d: int, h0: int, w0: int, rank: int) -> torch.Tensor:
    """crd_head's third operand: a (d,) offset mu."""
    return torch.randn(d, generator=gen, dtype=torch.float64)


def residual_q(gen: torch.Generator, d: int, h0: int, w0: int, rank: int) -> torch.Tensor:
    """crd_residual's third operand: (h0 w0, r), one projected offset per grid position."""
    return torch.randn(h0 * w0, rank, generator=gen, dtype=torch.float64)


@dataclass(frozen=True)
class Case:
    """One input geometry: maps (B, C, H, W) per layer, embedding, target_dim and rank r. ``large``: left out by
    ``--quick`` (pytest -m "not large")."""

    name: str
    shapes: tuple[tuple[int, int, int, int], ...]
    embedding: str
    target_dim: int
    rank: int
    large: bool = False


@dataclass(frozen=True)
class OpCheck:
    """How the GPU tests check one op: its cases, its third operand, the expected result per operand dtype."""

    op: str  #: the op's name in crd_fast.ops.registry.OPS
    cases: tuple[Case, ...]
    second: Callable[[torch.Generator, int, int, int, int], torch.Tensor]  #: (gen, d, h0, w0, r) -> float64
    expected: Callable[..., torch.Tensor]  #: (maps, matrix, second, embedding, target_dim, operand) -> float64
    seed_offset: int  #: added to the base seed, so the ops see different inputs

    @property
    def spec(self) -> registry.OpSpec:
        return registry.OPS[self.op]

    def inputs(self, seed: int, shapes, rank: int, embedding: str = "concat", target_dim: int = 1024) -> tuple:
        """float64 (maps, matrix, second) on the CPU from ``seed``: maps of ``shapes``, an (r, d) matrix scaled by
        1/sqrt(d), the op's third operand."""
        gen = torch.Generator().manual_seed(seed)
        maps = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        d = embedding_dim([s[1] for s in shapes], embedding, target_dim)
        matrix = torch.randn(rank, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
        return maps, matrix, self.second(gen, d, shapes[0][2], shapes[0][3], rank)


# fmt: off
HEAD_CASES = (
    Case("2 layers odd sizes r=70", ((2, 5, 7, 9), (2, 6, 4, 5)), "concat", 1024, 70),
    Case("3 layers patchcore downsampling", ((3, 6, 6, 6), (3, 10, 3, 3), (3, 4, 11, 13)), "patchcore", 9, 9),
    Case("4 layers d=45 (d%32!=0) r=65", ((2, 9, 9, 9), (2, 12, 5, 5), (2, 16, 3, 3), (2, 8, 2, 2)), "concat",
         1024, 65),
    Case("rank 1 single pixel", ((2, 3, 1, 1),), "concat", 1024, 1),
    Case("N=3*13*11 (not a multiple of 64) d=50", ((3, 20, 13, 11), (3, 30, 7, 6)), "concat", 1024, 33),
    Case("2 layers 64x28x28+128x14x14 r=130", ((3, 64, 28, 28), (3, 128, 14, 14)), "concat", 1024, 130, True),
    Case("wide_resnet50_2 b4 r=1536", ((4, 512, 28, 28), (4, 1024, 14, 14)), "concat", 1024, 1536, True),
)
RESIDUAL_CASES = (
    Case("1 layer grid 7x9 r=70", ((2, 5, 7, 9),), "concat", 1024, 70),
    Case("2 layers grid 9x7 r=130", ((2, 6, 9, 7), (2, 10, 4, 5)), "concat", 1024, 130),
    Case("3 layers patchcore r=9", ((3, 6, 6, 6), (3, 10, 3, 3), (3, 4, 11, 13)), "patchcore", 9, 9),
    Case("4 layers d=45 r=65", ((2, 9, 9, 9), (2, 12, 5, 5), (2, 16, 3, 3), (2, 8, 2, 2)), "concat", 1024, 65),
    Case("rank 1 single pixel", ((2, 3, 1, 1),), "concat", 1024, 1),
    Case("wide_resnet50_2 b2 r=1024", ((2, 512, 28, 28), (2, 1024, 14, 14)), "concat", 1024, 1024, True),
)
# fmt: on
#: The checks of every op with CUDA kernels, by op name (a new op adds its entry here).
CHECKS = {
    "crd_head": OpCheck("crd_head", HEAD_CASES, head_offset, expected_scores, 0),
    "crd_residual": OpCheck("crd_residual", RESIDUAL_CASES, residual_q, expected_residuals, 600),
}


@dataclass(frozen=True)
class Outcome:
    """One kernel launch checked: norm-relative error against the expected result, its tolerance, and whether two
    runs gave identical bits."""

    error: float
    tol: float
    same_bits: bool
    seed: int

    @property
    def ok(self) -> bool:
        return self.error < self.tol and self.same_bits

    def describe(self) -> str:
        race = "" if self.same_bits else "; two runs differ (race?)"
        return f"norm-relative error {self.error:.2e} (tol {self.tol:.0e}), seed {self.seed}{race}"


def synchronize(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def launch_twice(spec, launcher, maps, matrix, second, embedding, target_dim, device, capability):
    """Runs ``launcher`` on the op's operands twice, outputs (and scratch) poisoned with NaN first.

    Returns (the first result on the CPU, whether both runs gave identical bits, the operand dtype).
    """
    ops = spec.cuda_operands(
        [m.to(device) for m in maps], matrix.to(device), second.to(device), embedding, target_dim, capability=capability
    )
    runs = []
    for _ in range(2):
        out = spec.kernels.new_out(ops).fill_(math.nan)
        partial = spec.kernels.new_partial(ops)
        if partial is not None:
            partial.fill_(math.nan)
        launcher(ops, out=out, partial=partial)
        synchronize(device)
        runs.append(out.cpu())
    return runs[0], torch.equal(runs[0], runs[1]), ops.dtype


def check_case(check: OpCheck, case: Case, index: int, dtype: torch.dtype, launcher, device, capability, base_seed):
    """One case of ``check`` at map dtype ``dtype`` through ``launcher``: its :class:`Outcome`."""
    case_seed = base_seed + check.seed_offset + index
    maps64, matrix, second = check.inputs(case_seed, case.shapes, case.rank, case.embedding, case.target_dim)
    maps = [m.to(dtype) for m in maps64]
    got, same, operand = launch_twice(
        check.spec, launcher, maps, matrix, second, case.embedding, case.target_dim, device, capability
    )
    want = check.expected(maps, matrix, second, case.embedding, case.target_dim, operand)
    return Outcome(norm_rel(got, want), TOLERANCES[dtype_name(operand)], same, case_seed)


def local_head_error(device, dtype: torch.dtype, base_seed: int) -> tuple[float, torch.dtype]:
    """LocalCRDHead on ``device`` (eager: the fused residual op) against the float64 LocalCRDModel scores:
    (norm-relative error, the head's output dtype)."""
    from crd_fast.core.local import LocalCRDModel, local_eigenpairs_from_patches
    from crd_fast.models.local_head import LocalCRDHead

    gen = torch.Generator().manual_seed(base_seed + 700)
    specs, n_train, k, lam_rel = [(32, 14, 13), (48, 7, 7)], 40, 8, 0.01
    base = [3 * torch.randn(1, *s, generator=gen, dtype=torch.float64) for s in specs]
    train = [b + torch.randn(n_train, *b.shape[1:], generator=gen, dtype=torch.float64) for b in base]
    test = [b + 1.5 * torch.randn(3, *b.shape[1:], generator=gen, dtype=torch.float64) for b in base]
    d, (h, w) = sum(s[0] for s in specs), specs[0][1:]
    grids = patch_matrix(embed_patches(train)).reshape(n_train, h * w, d)
    means, vals, vecs = local_eigenpairs_from_patches(grids, k)
    xc = (grids - means).reshape(-1, d)
    model = LocalCRDModel.build(means, xc.T @ xc / xc.shape[0], vals, vecs, 0.5)
    want = model.scores(patch_matrix(embed_patches(test)).reshape(3, h * w, d), lam_rel).reshape(3, h, w)
    head = LocalCRDHead.from_model(model, lam_rel, layer_channels=[s[0] for s in specs], grid=(h, w), dtype=dtype)
    got = head.to(device)([m.to(dtype).to(device) for m in test]).cpu()
    return norm_rel(got, want), got.dtype


#: Tolerances of LocalCRDHead against the float64 LocalCRDModel, per head dtype.
LOCAL_HEAD_TOLERANCES = {torch.float32: 1e-5, torch.float64: 1e-10}


def path_problem(spec: registry.OpSpec, path: str, device: torch.device) -> Optional[str]:
    """Why backend ``path`` cannot run ``spec``'s kernels on CUDA ``device`` (None: it can; no probe is run)."""
    index = cuda_dispatch.device_index(device)
    backend = {b.name: b for b in cuda_dispatch.BACKENDS}[path]
    problem = backend.problem(spec.kernels, index, cuda_dispatch.capability(index))
    return None if problem is None else problem[0]


def find_sanitizer() -> Optional[str]:
    """compute-sanitizer on PATH or in $CUDA_HOME / $CUDA_PATH / /usr/local/cuda; None when absent."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "compute-sanitizer").is_file():
            return str(Path(root) / "bin" / "compute-sanitizer")
    return None


def sanitizer_command(sanitizer: str, tool: str, seed: int) -> list[str]:
    """``tool`` of compute-sanitizer over the small launches of sanitizer_target.py, filtered to crd-fast's kernels
    (``crd_head_*`` and ``crd_residual_*``), exiting 9 on any error it reports."""
    return [
        sanitizer,
        "--tool",
        tool,
        "--kernel-name",
        "kns=crd_",
        "--error-exitcode",
        "9",
        sys.executable,
        str(SANITIZER_TARGET),
        "--seed",
        str(seed),
    ]


def sanitizer_passed(returncode: int, output: Sequence[str]) -> bool:
    """The tool's verdict: exit status 0 and the target's closing line (it ran to the end)."""
    return returncode == 0 and any("sanitizer target: ok" in line for line in output)
