"""The one GPU check of the fused CRD head: correctness of every kernel path, sanitizers, then timings.

    python bench/gpu_check.py [--build] [--quick] [--seed N] [--out DIR] [--no-sanitizer] [--no-timing]
    python bench/gpu_check.py --self-test        # on any machine, no GPU: arguments, tolerances, report

Run from the repository root on a machine with a GPU (docs/GPU.md "Running bench/gpu_check.py"); it is
built to finish in under 10 minutes on one data-centre GPU. Steps, each recorded as a check:

1. (--build) builds and installs crd-fast from this tree; fails on any ptxas spill in the build log.
2. dispatch: the op's decision for this device must be a kernel path (a silent reference run fails);
   kernel resources: no local-memory (spill) bytes in any compiled kernel.
3. correctness on inputs from fixed, printed seeds, for every kernel path (native, cupy) and dtype,
   outputs and scratch poisoned with NaN first: float32/float64 against the float64 reference with a
   norm-relative tolerance (max |error| / max |score|); float16/bfloat16 against a model that makes the
   kernel's own roundings (embedding rounded once to the operand type, folded matrix cast to it, float32
   q) at ~1e-5. Shapes: 1-4 layers, 5 layers (reference fallback through the op), d % 32 != 0, r = 65,
   N not a multiple of 64, a rank-1 case, B = 0, r = 0, channels_last, strided and offset views, and a
   feature map of more than 2^31 elements. Every kernel runs twice: identical bits (no races).
   The residual kernels (crd_fast::crd_residual, the local head's fused part: out = P' e_p - q[pos(p)], no norm)
   get the same treatment on their own cases (1-4 layers, odd grids, r = 1, 65, 70, 130, patchcore folding):
   float32/float64 against the float64 reference.crd_residual, float16/bfloat16 against the same-roundings model,
   outputs poisoned first, two runs identical; then LocalCRDHead on CUDA (fused) against the float64
   LocalCRDModel scores.
4. native vs CuPy: identical bits (same source, same code-generation flags), head and residual kernels.
5. streams: a launch on a side stream behind ``torch.cuda._sleep`` with only stream-level waits; CUDA-graph
   capture and replay; ``torch.compile(mode="reduce-overhead")``.
6. compute-sanitizer memcheck, racecheck, synccheck and initcheck on small shapes, every dtype and path.
7. timings (CUDA events, median): fused paths vs the unfused float32 reference vs exact nearest-neighbour
   search by cuBLAS, with GB/s and TFLOP/s against this device's measured copy bandwidth and matmul peak;
   the residual kernels vs the unfused float32 reference.crd_residual on the same shapes.

Writes gpu_check.json and gpu_check.md (a table for bench/RESULTS.md) to --out (default $OUT or .).
Exit status: 0 every check passed; 1 a check failed; 2 no GPU or the build failed; 3 passed, but some
steps could not run (e.g. no compute-sanitizer or no CuPy): the JSON says which.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SEED = 20261201
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
#: Norm-relative tolerances (max |got - want| / max |want|): float32/float64 against the float64 reference,
#: half precision against the same-roundings model (the kernel's remaining error is float32 accumulation).
TOLERANCES = {"float64": 1e-12, "float32": 2e-5, "float16": 2e-5, "bfloat16": 2e-5}


# ---- arguments, tolerances, report: pure Python, self-tested on the CPU ----------------------------------
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", action="store_true", help="pip-install this tree first (needs nvcc)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"base seed of all inputs ({DEFAULT_SEED})")
    parser.add_argument("--out", default=os.environ.get("OUT") or ".", help="folder for gpu_check.json/.md")
    parser.add_argument("--no-sanitizer", action="store_true", help="skip the compute-sanitizer runs")
    parser.add_argument("--no-timing", action="store_true", help="skip the timings")
    parser.add_argument("--self-test", action="store_true", help="check this script's own logic on the CPU")
    parser.add_argument("--sanitizer-target", action="store_true", help=argparse.SUPPRESS)  # the sanitized child
    parser.add_argument("--after-build", action="store_true", help=argparse.SUPPRESS)  # re-run after --build
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"--seed must be non-negative, got {args.seed}")
    return args


def norm_rel(got, want) -> float:
    """max |got - want| / max |want| over the whole map (inf when anything is not finite; 0 for empty maps)."""
    import torch

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


def expected_scores(maps, matrix, offset, embedding: str, target_dim: int, operand):
    """What a kernel with ``operand`` dtype should return, in float64: the reference for float32/float64
    operands, else the same-roundings model (embedding and folded matrix rounded once to ``operand``)."""
    import torch

    from crd_fast.core.embedding import embed_patches, patch_matrix
    from crd_fast.ops import reference
    from crd_fast.ops.plan import fold_matrix

    if operand in (torch.float32, torch.float64):
        return reference.crd_head(maps, matrix, offset, embedding, target_dim)
    b, _, h, w = maps[0].shape
    channels = [int(m.shape[1]) for m in maps]
    device = maps[0].device
    p, q = fold_matrix(matrix.double().to(device), offset.double().to(device), channels, embedding, target_dim)
    emb = patch_matrix(embed_patches([m.double() for m in maps], "concat")).to(operand).double()
    z = emb @ p.to(operand).double().T - q.float().double()
    return torch.linalg.vector_norm(z, dim=1).reshape(b, h, w)


def expected_residuals(maps, matrix, q, embedding: str, target_dim: int, operand):
    """What a residual kernel with ``operand`` dtype should return, (B, h, w, r) in float64: the reference for
    float32/float64 operands, else the same-roundings model (embedding and folded matrix rounded once to
    ``operand``, q in float32)."""
    import torch

    from crd_fast.core.embedding import embed_patches, patch_matrix
    from crd_fast.ops import reference
    from crd_fast.ops.plan import fold_matrix

    if operand in (torch.float32, torch.float64):
        return reference.crd_residual(maps, matrix, q, embedding, target_dim)
    b, _, h, w = maps[0].shape
    channels = [int(m.shape[1]) for m in maps]
    device = maps[0].device
    zero = torch.zeros(matrix.shape[1], dtype=torch.float64, device=device)
    p, _ = fold_matrix(matrix.double().to(device), zero, channels, embedding, target_dim)
    emb = patch_matrix(embed_patches([m.double() for m in maps], "concat")).to(operand).double()
    rows = (emb @ p.to(operand).double().T).reshape(b, h * w, -1)
    return (rows - q.to(device).float().double()).reshape(b, h, w, -1)


#: Residual-kernel cases: (name, map shapes, embedding, target_dim, r); q is (h0 w0, r).
RESIDUAL_CASES = [
    ("residual 1 layer, grid 7x9, r=70", [(2, 5, 7, 9)], "concat", 1024, 70),
    ("residual 2 layers, grid 9x7, r=130", [(2, 6, 9, 7), (2, 10, 4, 5)], "concat", 1024, 130),
    ("residual 3 layers patchcore, r=9", [(3, 6, 6, 6), (3, 10, 3, 3), (3, 4, 11, 13)], "patchcore", 9, 9),
    ("residual 4 layers, d=45, r=65", [(2, 9, 9, 9), (2, 12, 5, 5), (2, 16, 3, 3), (2, 8, 2, 2)], "concat", 1024, 65),
    ("residual rank 1, single pixel", [(2, 3, 1, 1)], "concat", 1024, 1),
    ("residual wide_resnet50_2 b2, r=1024", [(2, 512, 28, 28), (2, 1024, 14, 14)], "concat", 1024, 1024),
]


@dataclass
class Check:
    step: str
    name: str
    ok: Optional[bool]  #: None: could not run here (a skip, with the reason in ``note``)
    error: Optional[float] = None
    tol: Optional[float] = None
    note: str = ""


@dataclass
class Report:
    info: dict = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    timings: list[dict] = field(default_factory=list)

    def add(self, step: str, name: str, ok: Optional[bool], error=None, tol=None, note: str = "") -> Check:
        check = Check(step, name, ok, error, tol, note)
        self.checks.append(check)
        mark = {True: "ok  ", False: "FAIL", None: "skip"}[ok]
        num = f" err {error:.2e} (tol {tol:.0e})" if error is not None and tol is not None else ""
        print(f"  {mark} [{step}] {name}{num} {note}", flush=True)
        return check

    def status(self) -> int:
        if any(c.ok is False for c in self.checks):
            return 1
        if not self.checks or any(c.ok is None for c in self.checks):
            return 3
        return 0

    def write(self, out_dir: Path) -> tuple[Path, Path]:
        """gpu_check.json and gpu_check.md in ``out_dir``, each written whole or not at all."""
        out_dir.mkdir(parents=True, exist_ok=True)
        data = {
            "status": self.status(),
            "info": self.info,
            "checks": [asdict(c) for c in self.checks],
            "timings": self.timings,
        }
        paths = (out_dir / "gpu_check.json", out_dir / "gpu_check.md")
        for path, text in zip(paths, (json.dumps(data, indent=1, default=str), self.markdown())):
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
        return paths

    def markdown(self) -> str:
        info = self.info
        lines = [
            f"### GPU check: {info.get('device', '?')} (sm_{info.get('capability', '?')}), "
            f"torch {info.get('torch', '?')}, seed {info.get('seed', '?')}",
            "",
        ]
        kinds = (("ok", True), ("failed", False), ("skipped", None))
        counts = {k: sum(1 for c in self.checks if c.ok is v) for k, v in kinds}
        lines += [f"Checks: {counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} not run.", ""]
        bad = [c for c in self.checks if c.ok is not True]
        if bad:
            lines += ["| step | check | result | note |", "|---|---|---|---|"]
            lines += [f"| {c.step} | {c.name} | {'FAIL' if c.ok is False else 'not run'} | {c.note} |" for c in bad]
            lines.append("")
        if self.timings:
            lines += [
                "| batch | path | ms (median) | Mpatch/s | vs reference | GB/s (% of copy) | TFLOP/s (% of matmul) |",
                "|---:|---|---:|---:|---:|---:|---:|",
            ]
            for t in self.timings:
                gbs = f"{t['gb_s']:.0f} ({100 * t['gb_s_frac']:.0f}%)" if t.get("gb_s") is not None else ""
                tfs = f"{t['tflop_s']:.1f} ({100 * t['tflop_s_frac']:.0f}%)" if t.get("tflop_s") is not None else ""
                lines.append(
                    f"| {t['batch']} | {t['path']} | {t['ms']:.3f} | {t['patches_per_s'] / 1e6:.2f} | "
                    f"{t['vs_reference']:.2f}x | {gbs} | {tfs} |"
                )
        return "\n".join(lines) + "\n"


def self_test() -> int:
    """This script's logic on the CPU: argument parsing, the tolerance model, the report files."""
    import torch

    args = parse_args(["--quick", "--seed", "7", "--out", "x", "--no-sanitizer"])
    assert (args.quick, args.seed, args.out, args.no_sanitizer, args.build) == (True, 7, "x", True, False)
    assert parse_args([]).seed == DEFAULT_SEED
    gen = torch.Generator().manual_seed(DEFAULT_SEED)
    maps = [torch.randn(2, 5, 6, 7, generator=gen), torch.randn(2, 6, 3, 4, generator=gen)]
    matrix, offset = torch.randn(65, 11, generator=gen) / 11**0.5, torch.randn(11, generator=gen)
    for dtype in (torch.float16, torch.bfloat16):
        half = [m.to(dtype) for m in maps]
        model = expected_scores(half, matrix, offset, "concat", 1, dtype)
        ref = expected_scores(half, matrix, offset, "concat", 1, torch.float32)  # the float64 reference
        # the model makes the kernel's own roundings: skipping one of them is caught, which the old
        # 3e-2 max-relative tolerance could not tell apart from a wrong kernel
        assert norm_rel(model, ref) > 2 * TOLERANCES[str(dtype).split(".")[1]], norm_rel(model, ref)
        assert norm_rel(model * (1 + 1e-6), model) < TOLERANCES["float16"]
        assert norm_rel(model * (1 + 1e-3), model) > TOLERANCES["float16"]
    q = torch.randn(42, 65, generator=gen)  # one offset per position of the 6x7 grid
    for dtype in (torch.float16, torch.bfloat16):
        half = [m.to(dtype) for m in maps]
        model = expected_residuals(half, matrix, q, "concat", 1, dtype)
        ref = expected_residuals(half, matrix, q, "concat", 1, torch.float32)
        assert model.shape == ref.shape == (2, 6, 7, 65)
        assert norm_rel(model, ref) > 2 * TOLERANCES[str(dtype).split(".")[1]], norm_rel(model, ref)
        assert norm_rel(model + 1e-6 * model.abs().max(), model) < TOLERANCES["float16"]
    assert norm_rel(torch.zeros(0, 3, 3), torch.zeros(0, 3, 3)) == 0.0
    assert norm_rel(torch.full((1, 2, 2), math.nan), torch.ones(1, 2, 2)) == math.inf
    assert norm_rel(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2)) == 0.0  # a rank-0 map: no division by zero
    report = Report(info={"device": "self-test", "capability": "0.0", "torch": torch.__version__, "seed": 7})
    report.add("correctness", "a", True, 1e-7, 2e-5)
    assert report.status() == 0
    report.add("sanitizer", "b", None, note="compute-sanitizer not found")
    assert report.status() == 3
    report.timings.append(
        dict(
            batch=8,
            path="fused native float32",
            ms=1.0,
            patches_per_s=6272e3,
            vs_reference=3.0,
            gb_s=100.0,
            gb_s_frac=0.05,
            tflop_s=10.0,
            tflop_s_frac=0.2,
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        json_path, md_path = report.write(Path(tmp))
        data = json.loads(json_path.read_text())
        assert data["status"] == 3 and len(data["checks"]) == 2 and data["timings"][0]["ms"] == 1.0
        md = md_path.read_text()
        assert "| sanitizer | b | not run | compute-sanitizer not found |" in md and "100 (5%)" in md
    report.add("correctness", "c", False)
    assert report.status() == 1
    print("gpu_check self-test: ok")
    return 0


# ---- on the GPU ---------------------------------------------------------------------------------------------
def build(out_dir: Path) -> int:
    """pip-installs this tree (editable, CUDA ON); the log goes to build.log. Returns pip's exit status."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-build-isolation",
        "--no-deps",
        "-v",
        "-e",
        str(ROOT),
        "-Cbuild-dir=build/gpu",
        "-Ccmake.define.CRD_FAST_CUDA=ON",
    ]
    print("building:", " ".join(cmd), flush=True)
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    (out_dir / "build.log").write_text(result.stdout + result.stderr)
    return result.returncode


def check_build_log(log: str, returncode: int, report: Report) -> None:
    """The build's checks: pip succeeded, and ptxas reported no spills for any kernel."""
    reports = [line for line in log.splitlines() if "bytes spill stores" in line]
    spilling = [line.strip() for line in reports if "0 bytes spill stores, 0 bytes spill loads" not in line]
    report.add("build", "pip install -e . (CUDA ON)", returncode == 0, note=f"rc={returncode}")
    report.add(
        "build",
        "ptxas: no spills",
        bool(reports) and not spilling,
        note=f"{len(reports)} reports, {len(spilling)} spilling" + "".join(f"; {s}" for s in spilling[:3]),
    )


def find_sanitizer() -> Optional[str]:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "compute-sanitizer").is_file():
            return str(Path(root) / "bin" / "compute-sanitizer")
    return None


class GpuRun:
    """The GPU steps, sharing one report, device and seed."""

    def __init__(self, args: argparse.Namespace, report: Report) -> None:
        import torch

        from crd_fast.ops import cuda as kcuda
        from crd_fast.ops import cuda_dispatch, cupy_jit, native

        self.torch, self.kcuda, self.args, self.report = torch, kcuda, args, report
        self.dev = torch.device("cuda")
        self.cap = torch.cuda.get_device_capability()
        self.paths = []
        if native.has_native_cuda():
            self.paths.append("native")
        cupy_error = cupy_jit.compile_error(torch.cuda.current_device())
        if cupy_error is None:
            self.paths.append("cupy")
        self.cupy_error = cupy_error
        self.dispatch = cuda_dispatch

    def inputs(self, seed: int, shapes, rank: int, embedding="concat", target_dim=1024):
        torch = self.torch
        from crd_fast.core.embedding import embedding_dim

        gen = torch.Generator().manual_seed(seed)
        maps = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        d = embedding_dim([s[1] for s in shapes], embedding, target_dim)
        matrix = torch.randn(rank, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
        offset = torch.randn(d, generator=gen, dtype=torch.float64)
        return maps, matrix, offset

    def launch(self, path, maps, matrix, offset, embedding, target_dim):
        """Scores through one kernel path, outputs poisoned first; runs twice, returns (scores, same_bits)."""
        torch, kcuda = self.torch, self.kcuda
        ops = kcuda.prepare(
            [m.to(self.dev) for m in maps], matrix.to(self.dev), offset.to(self.dev), embedding, target_dim, self.cap
        )
        runs = []
        for _ in range(2):
            out = ops.new_out().fill_(math.nan)
            partial = ops.new_partial().fill_(math.nan)
            kcuda.run(ops, path, out=out, partial=partial)
            torch.cuda.synchronize()
            runs.append(out.cpu())
        return runs[0], torch.equal(runs[0], runs[1]), ops.dtype

    def residual_inputs(self, seed: int, shapes, rank: int, embedding="concat", target_dim=1024):
        """Maps and matrix as :meth:`inputs`, with q (h0 w0, r): one offset per grid position."""
        torch = self.torch
        maps, matrix, _ = self.inputs(seed, shapes, rank, embedding, target_dim)
        gen = torch.Generator().manual_seed(seed + 10_000)
        h0, w0 = shapes[0][2], shapes[0][3]
        return maps, matrix, torch.randn(h0 * w0, rank, generator=gen, dtype=torch.float64)

    def launch_residual(self, path, maps, matrix, q, embedding, target_dim):
        """Residuals through one kernel path, output poisoned first; runs twice, returns (out, same_bits, operand)."""
        torch, kcuda = self.torch, self.kcuda
        ops = kcuda.prepare_residual(
            [m.to(self.dev) for m in maps], matrix.to(self.dev), q.to(self.dev), embedding, target_dim, self.cap
        )
        runs = []
        for _ in range(2):
            out = ops.new_residual_out().fill_(math.nan)
            kcuda.run_residual(ops, path, out=out)
            torch.cuda.synchronize()
            runs.append(out.cpu())
        return runs[0], torch.equal(runs[0], runs[1]), ops.dtype

    # step 2
    def dispatch_and_resources(self) -> None:
        from crd_fast.ops import cuda_launch, native

        choice = self.dispatch.decide(self.dev)
        self.report.info["dispatch"] = choice.as_dict()
        self.report.add(
            "dispatch",
            "the op runs a kernel on this device",
            choice.path != "reference",
            note=f"path {choice.path}: {choice.reason}; skipped {choice.skipped}",
        )
        residual = self.dispatch.decide(self.dev, self.dispatch.RESIDUAL)
        self.report.info["dispatch_residual"] = residual.as_dict()
        self.report.add(
            "dispatch",
            "the residual op runs a kernel on this device",
            residual.path != "reference",
            note=f"path {residual.path}: {residual.reason}; skipped {residual.skipped}",
        )
        self.report.add(
            "dispatch",
            "at least one kernel path",
            bool(self.paths),
            note=f"paths {self.paths}; cupy: {self.cupy_error or 'ok'}",
        )
        if "cupy" not in self.paths:
            self.report.add("dispatch", "CuPy path present", None, note=self.cupy_error or "")
        if native.has_native_cuda():
            attrs = cuda_launch.crd_head_cuda_attributes()
            self.report.info["kernel_attributes"] = attrs
            spills = [a["name"] for a in attrs if a["local_bytes"]]
            self.report.add("resources", "no local memory (spills) in compiled kernels", not spills, note=str(spills))

    # step 3
    def correctness(self) -> None:
        seed = self.args.seed
        cases = [
            ("2 layers, odd sizes, r=70", [(2, 5, 7, 9), (2, 6, 4, 5)], "concat", 1024, 70),
            ("3 layers patchcore, downsampling", [(3, 6, 6, 6), (3, 10, 3, 3), (3, 4, 11, 13)], "patchcore", 9, 9),
            (
                "4 layers, d=45 (d%32!=0), r=65",
                [(2, 9, 9, 9), (2, 12, 5, 5), (2, 16, 3, 3), (2, 8, 2, 2)],
                "concat",
                1024,
                65,
            ),
            ("rank 1, single pixel", [(2, 3, 1, 1)], "concat", 1024, 1),
            ("N=3*13*11 (not a multiple of 64), d=50", [(3, 20, 13, 11), (3, 30, 7, 6)], "concat", 1024, 33),
            ("wide_resnet50_2 b4, r=1536", [(4, 512, 28, 28), (4, 1024, 14, 14)], "concat", 1024, 1536),
        ]
        self.check_cases(
            "correctness", cases[:5] if self.args.quick else cases, seed, self.inputs, self.launch, expected_scores
        )
        self.edge_cases()

    def check_cases(self, step: str, cases, seed: int, inputs, launch, expected) -> None:
        """Every case x dtype x kernel path: ``launch`` (result, two runs identical, operand dtype) against
        ``expected`` in the norm-relative sense at the operand dtype's tolerance; a raise is a failed check."""
        torch = self.torch
        for i, (name, shapes, emb, td, r) in enumerate(cases):
            maps64, matrix, second = inputs(seed + i, shapes, r, emb, td)
            for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
                maps = [m.to(dtype) for m in maps64]
                label = str(dtype).split(".")[1]
                for path in self.paths:
                    try:
                        got, same, operand = launch(path, maps, matrix, second, emb, td)
                    except Exception as exc:  # noqa: BLE001 - any failure of a kernel path is a failed check
                        self.report.add(step, f"{name} {path} {label}", False, note=f"raised {exc!r}")
                        continue
                    want = expected(maps, matrix, second, emb, td, operand)
                    tol = TOLERANCES[str(operand).split(".")[1]]
                    err = norm_rel(got, want)
                    note = f"seed {seed + i}" + ("" if same else "; two runs differ (race?)")
                    self.report.add(step, f"{name} {path} {label}", err < tol and same, err, tol, note)

    # step 3, residual mode
    def residual(self) -> None:
        cases = RESIDUAL_CASES[:5] if self.args.quick else RESIDUAL_CASES
        self.check_cases(
            "residual", cases, self.args.seed + 600, self.residual_inputs, self.launch_residual, expected_residuals
        )
        self.local_head()

    def local_head(self) -> None:
        """LocalCRDHead on this device (eager: the fused residual op) against the float64 LocalCRDModel scores."""
        torch = self.torch
        from crd_fast.core.embedding import embed_patches, patch_matrix
        from crd_fast.core.local import LocalCRDModel, local_eigenpairs_from_patches
        from crd_fast.models.local_head import LocalCRDHead

        gen = torch.Generator().manual_seed(self.args.seed + 700)
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
        for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
            label = str(dtype).split(".")[1]
            try:
                head = LocalCRDHead.from_model(
                    model, lam_rel, layer_channels=[s[0] for s in specs], grid=(h, w), dtype=dtype
                ).to(self.dev)
                got = head([m.to(dtype).to(self.dev) for m in test]).cpu()
            except Exception as exc:  # noqa: BLE001
                self.report.add("local head", f"LocalCRDHead {label} vs LocalCRDModel", False, note=repr(exc))
                continue
            err = norm_rel(got, want)
            ok = got.dtype == dtype and err < tol
            self.report.add("local head", f"LocalCRDHead {label} vs LocalCRDModel", ok, err, tol, note=f"k={k}")

    def edge_cases(self) -> None:
        torch = self.torch
        from crd_fast.ops import head_op, reference

        seed = self.args.seed + 100
        maps, matrix, offset = self.inputs(seed, [(3, 8, 9, 10), (3, 12, 5, 5)], 20)
        dev = [m.float().to(self.dev) for m in maps]
        m32, o32 = matrix.float().to(self.dev), offset.float().to(self.dev)
        want = reference.crd_head([m.float() for m in maps], matrix, offset)
        tol = TOLERANCES["float32"]

        def op(ms, m=m32, o=o32):
            return head_op.crd_head(ms, m, o)

        views = {
            "channels_last": [m.to(memory_format=torch.channels_last) for m in dev],
            "strided batch view": [torch.stack([m, m], dim=1).flatten(0, 1)[::2] for m in dev],  # not contiguous
            "storage offset view": [torch.cat([m[:1], m])[1:] for m in dev],
        }
        for name, ms in views.items():
            self.report.add("edge", name, norm_rel(op(ms).cpu(), want) < tol, norm_rel(op(ms).cpu(), want), tol)
        empty = op([m[:0] for m in dev])
        self.report.add("edge", "B = 0", tuple(empty.shape) == (0, 9, 10))
        zero = op(dev, m32[:0])
        self.report.add("edge", "r = 0 scores 0", bool((zero == 0).all()) and tuple(zero.shape) == (3, 9, 10))
        five, m5, o5 = self.inputs(seed + 1, [(2, 4, 6, 6), (2, 3, 3, 3), (2, 5, 4, 4), (2, 2, 2, 2), (2, 3, 5, 5)], 7)
        got5 = head_op.crd_head(
            [m.float().to(self.dev) for m in five], m5.float().to(self.dev), o5.float().to(self.dev)
        )
        err5 = norm_rel(got5.cpu(), reference.crd_head([m.float() for m in five], m5, o5))
        self.report.add("edge", "5 layers (reference fallback through the op)", err5 < tol, err5, tol)
        self.big_input()

    def big_input(self) -> None:
        """One feature map of more than 2^31 elements (4.3 GB in float16): 64-bit offsets in the gather."""
        torch = self.torch
        shape = (4, 8200, 256, 256)
        if math.prod(shape) * 2 * 1.5 > torch.cuda.get_device_properties(self.dev).total_memory:
            self.report.add("edge", "input over 2^31 elements", None, note="not enough device memory")
            return
        gen = torch.Generator(device=self.dev).manual_seed(self.args.seed + 200)
        big = torch.randn(shape, generator=gen, device=self.dev, dtype=torch.float16)
        cpu_gen = torch.Generator().manual_seed(self.args.seed + 201)
        matrix = torch.randn(8, shape[1], generator=cpu_gen, dtype=torch.float64) / math.sqrt(shape[1])
        offset = torch.randn(shape[1], generator=cpu_gen, dtype=torch.float64)
        for path in self.paths:
            try:
                ops = self.kcuda.prepare([big], matrix.to(self.dev), offset.to(self.dev), "concat", 1024, self.cap)
                got = self.kcuda.run(ops, path)[-1:].cpu()  # the last image: every offset past 2^31
            except Exception as exc:  # noqa: BLE001
                self.report.add("edge", f"input over 2^31 elements ({path})", False, note=repr(exc))
                continue
            want = expected_scores([big[-1:]], matrix, offset, "concat", 1024, torch.float16)  # on the GPU
            err = norm_rel(got, want)
            self.report.add(
                "edge",
                f"input over 2^31 elements ({path})",
                err < TOLERANCES["float16"],
                err,
                TOLERANCES["float16"],
                note=f"{math.prod(shape)} elements",
            )
        del big
        torch.cuda.empty_cache()

    # step 4
    def native_vs_cupy(self) -> None:
        torch = self.torch
        if self.paths != ["native", "cupy"]:
            self.report.add("bits", "native vs CuPy", None, note=f"needs both paths, have {self.paths}")
            return
        shapes = [(3, 40, 14, 14), (3, 72, 7, 7)]
        for prefix, inputs, launch, seed in (
            ("", self.inputs, self.launch, self.args.seed + 300),
            ("residual ", self.residual_inputs, self.launch_residual, self.args.seed + 301),
        ):
            maps64, matrix, second = inputs(seed, shapes, 100)
            for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
                maps = [m.to(dtype) for m in maps64]
                a, _, _ = launch("native", maps, matrix, second, "concat", 1024)
                b, _, _ = launch("cupy", maps, matrix, second, "concat", 1024)
                self.report.add(
                    "bits",
                    f"{prefix}native vs CuPy {str(dtype).split('.')[1]}",
                    torch.equal(a, b),
                    note="" if torch.equal(a, b) else f"max diff {float((a - b).abs().max()):.2e}",
                )

    # step 5
    def streams_and_graphs(self) -> None:
        torch = self.torch
        from crd_fast.ops import head_op, reference

        maps64, matrix, offset = self.inputs(self.args.seed + 400, [(4, 32, 20, 20), (4, 48, 10, 10)], 40)
        maps = [m.float().to(self.dev) for m in maps64]
        m32, o32 = matrix.float().to(self.dev), offset.float().to(self.dev)
        want = reference.crd_head([m.cpu() for m in maps], matrix, offset)
        tol = TOLERANCES["float32"]
        head_op.crd_head(maps, m32, o32)  # prepared (tables, folds) on the default stream
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            torch.cuda._sleep(50_000_000)  # keeps the side stream busy while the host moves on
            fresh = [m * 1.0 for m in maps]  # made on the side stream, after the sleep
            got = head_op.crd_head(fresh, m32, o32)
        torch.cuda.current_stream().wait_stream(side)  # stream-level wait only, no device synchronize
        got = got.cpu()
        self.report.add("streams", "side stream behind _sleep", norm_rel(got, want) < tol, norm_rel(got, want), tol)

        static = [m.clone() for m in maps]
        try:
            capture_stream = torch.cuda.Stream()
            capture_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(capture_stream):
                head_op.crd_head(static, m32, o32)  # warm-up on the capture stream
            torch.cuda.current_stream().wait_stream(capture_stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = head_op.crd_head(static, m32, o32)
            new64, _, _ = self.inputs(self.args.seed + 401, [(4, 32, 20, 20), (4, 48, 10, 10)], 40)
            for s, n in zip(static, new64):
                s.copy_(n.float())
            graph.replay()
            torch.cuda.synchronize()
            want_new = reference.crd_head([n.float() for n in new64], matrix, offset)
            err = norm_rel(static_out.cpu(), want_new)
            self.report.add("graphs", "CUDA-graph capture + replay on new inputs", err < tol, err, tol)
        except Exception as exc:  # noqa: BLE001
            self.report.add("graphs", "CUDA-graph capture + replay on new inputs", False, note=repr(exc))
        try:
            compiled = torch.compile(
                lambda a, b: head_op.crd_head([a, b], m32, o32).amax(dim=(1, 2)), mode="reduce-overhead"
            )
            for _ in range(3):  # cudagraph trees record on the later calls
                out = compiled(*maps)
            torch.cuda.synchronize()
            err = norm_rel(out.cpu(), want.amax(dim=(1, 2)))
            self.report.add("graphs", "torch.compile(mode='reduce-overhead')", err < tol, err, tol)
        except Exception as exc:  # noqa: BLE001
            self.report.add("graphs", "torch.compile(mode='reduce-overhead')", False, note=repr(exc))

    # step 6
    def sanitizers(self) -> None:
        sanitizer = find_sanitizer()
        if sanitizer is None:
            for tool in SANITIZER_TOOLS:
                self.report.add("sanitizer", tool, None, note="compute-sanitizer not found")
            return
        for tool in SANITIZER_TOOLS:
            cmd = [
                sanitizer,
                "--tool",
                tool,
                "--kernel-name",
                "kns=crd_",  # crd_head_* and crd_residual_*
                "--error-exitcode",
                "9",
                sys.executable,
                str(Path(__file__).resolve()),
                "--sanitizer-target",
                "--seed",
                str(self.args.seed),
            ]
            start = time.time()
            try:
                result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
                text = (result.stdout + result.stderr).strip().splitlines()
                ok = result.returncode == 0 and any("sanitizer target: ok" in line for line in text)
                note = f"rc={result.returncode} in {time.time() - start:.0f} s; " + " | ".join(text[-3:])
            except subprocess.TimeoutExpired:
                ok, note = False, "timed out after 120 s"
            self.report.add("sanitizer", tool, ok, note=note[:400])

    # step 7
    def timings(self) -> None:
        torch, kcuda = self.torch, self.kcuda
        from crd_fast.ops import reference

        reps = 10 if self.args.quick else 30
        peaks = self.peaks()
        self.report.info["peaks"] = peaks

        def cuda_time(fn, inputs, warmup=3):
            for i in range(warmup):
                fn(inputs[i % len(inputs)])
            torch.cuda.synchronize()
            times = []
            for i in range(reps):
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(inputs[i % len(inputs)])
                stop.record()
                stop.synchronize()
                times.append(start.elapsed_time(stop))
            return statistics.median(times)

        gen = torch.Generator().manual_seed(self.args.seed + 500)
        d = r = 1536
        matrix = (torch.randn(r, d, generator=gen, dtype=torch.float64) / math.sqrt(d)).to(self.dev)
        offset = torch.randn(d, generator=gen, dtype=torch.float64).to(self.dev)
        for batch in (8, 32):
            inputs = [
                [torch.randn(batch, 512, 28, 28, device=self.dev), torch.randn(batch, 1024, 14, 14, device=self.dev)]
                for _ in range(3)
            ]
            n = batch * 28 * 28
            m32, o32 = matrix.float(), offset.float()
            t_ref = cuda_time(
                lambda x, m=m32, o=o32: reference.crd_head(x, m, o, "concat", dtype=torch.float32), inputs
            )
            rows = [("reference float32 (unfused)", t_ref, None)]
            for path in self.paths:
                for dtype in (torch.float32, torch.bfloat16, torch.float16):
                    ops = [
                        kcuda.prepare([m.to(dtype) for m in x], matrix, offset, "concat", 1024, self.cap)
                        for x in inputs
                    ]
                    ms = cuda_time(lambda o, p=path: kcuda.run(o, p), ops)
                    rows.append((f"fused {path} {str(ops[0].dtype).split('.')[1]}", ms, ops[0]))
            queries = [torch.randn(n, d, device=self.dev) for _ in range(2)]
            for frac in (0.01, 0.1, 1.0):
                bank = torch.randn(int(200 * 784 * frac), d, device=self.dev)
                bank_sq = (bank * bank).sum(1)

                def nn_search(y, bank=bank, bank_sq=bank_sq):
                    best = torch.full((y.shape[0],), math.inf, device=self.dev)
                    y_sq = (y * y).sum(1, keepdim=True)
                    for s in range(0, bank.shape[0], 32768):
                        dist = y_sq + bank_sq[None, s : s + 32768] - 2.0 * (y @ bank[s : s + 32768].T)
                        best = torch.minimum(best, dist.min(dim=1).values)
                    return best.clamp_min_(0).sqrt_()

                rows.append((f"cuBLAS exact NN, bank {bank.shape[0]}", cuda_time(nn_search, queries, warmup=2), None))
                del bank, bank_sq
            # the residual kernels (the local head's fused part) on the same maps: q (784, r), out (n, r)
            q = torch.randn(28 * 28, r, generator=gen, dtype=torch.float64).to(self.dev)
            t_res = cuda_time(
                lambda x, m=m32, qq=q.float(): reference.crd_residual(x, m, qq, "concat", dtype=torch.float32), inputs
            )
            res_rows = [("residual reference float32 (unfused)", t_res, None)]
            for path in self.paths:
                for dtype in (torch.float32, torch.bfloat16, torch.float16):
                    ops = [
                        kcuda.prepare_residual([m.to(dtype) for m in x], matrix, q, "concat", 1024, self.cap)
                        for x in inputs
                    ]
                    ms = cuda_time(lambda o, p=path: kcuda.run_residual(o, p), ops)
                    res_rows.append((f"residual fused {path} {str(ops[0].dtype).split('.')[1]}", ms, ops[0]))
            for group, ref_ms in ((rows, t_ref), (res_rows, t_res)):
                for label, ms, ops in group:
                    self.report.timings.append(self.timing_row(batch, label, ms, ref_ms, ops, n, d, r, peaks))
            torch.cuda.empty_cache()

    @staticmethod
    def timing_row(batch, label, ms, ref_ms, ops, n, d, r, peaks) -> dict:
        """One timing row; GB/s and TFLOP/s for fused rows (the residual kernels also write the (n, r) output)."""
        row = dict(
            batch=batch,
            path=label,
            ms=ms,
            patches_per_s=n / (ms / 1e3),
            vs_reference=ref_ms / ms,
            gb_s=None,
            gb_s_frac=None,
            tflop_s=None,
            tflop_s_frac=None,
        )
        if ops is not None:
            elem = ops.maps[0].element_size()
            moved = sum(m.numel() for m in ops.maps) * elem + ops.matrix.numel() * elem + n * 4
            if ops.q.ndim == 2:  # residual: per-position q read, (n, r) written in the accumulation dtype
                acc = ops.q.element_size()
                moved += ops.q.numel() * acc + n * r * acc - n * 4
            flops = 2.0 * n * d * r
            row["gb_s"] = moved / (ms / 1e3) / 1e9
            row["gb_s_frac"] = row["gb_s"] / peaks["copy_gb_s"]
            row["tflop_s"] = flops / (ms / 1e3) / 1e12
            peak = peaks["matmul_tflop_s"].get(str(ops.dtype).split(".")[1])
            row["tflop_s_frac"] = row["tflop_s"] / peak if peak else None
        return row

    def peaks(self) -> dict:
        """This device's achievable peaks: a 1 GiB device copy (GB/s, read + write) and an 8192^3 matmul per dtype."""
        torch = self.torch

        def best_ms(fn, reps=10):
            fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(reps):
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                stop.record()
                stop.synchronize()
                times.append(start.elapsed_time(stop))
            return min(times)

        src = torch.empty(1 << 28, device=self.dev)
        dst = torch.empty_like(src)
        copy = 2 * src.numel() * 4 / (best_ms(lambda s=src, d=dst: d.copy_(s)) / 1e3) / 1e9
        del src, dst
        matmul = {}
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            a = torch.randn(8192, 8192, device=self.dev).to(dtype)
            matmul[str(dtype).split(".")[1]] = 2 * 8192**3 / (best_ms(lambda a=a: a @ a, reps=3) / 1e3) / 1e12
            del a
        torch.cuda.empty_cache()
        return {"copy_gb_s": copy, "matmul_tflop_s": matmul, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}


def sanitizer_target(args: argparse.Namespace) -> int:
    """The child a sanitizer runs: small head and residual launches of every path and dtype (the tool judges)."""
    import torch

    report = Report()
    run = GpuRun(args, report)
    maps64, matrix, offset = run.inputs(args.seed, [(2, 5, 7, 9), (2, 6, 4, 5)], 70)
    _, _, q = run.residual_inputs(args.seed, [(2, 5, 7, 9), (2, 6, 4, 5)], 70)
    for path in run.paths:
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            ops = run.kcuda.prepare(
                [m.to(dtype).to(run.dev) for m in maps64],
                matrix.to(run.dev),
                offset.to(run.dev),
                "concat",
                1024,
                run.cap,
            )
            run.kcuda.run(ops, path)
            res = run.kcuda.prepare_residual(
                [m.to(dtype).to(run.dev) for m in maps64],
                matrix.to(run.dev),
                q.to(run.dev),
                "concat",
                1024,
                run.cap,
            )
            run.kcuda.run_residual(res, path)
    torch.cuda.synchronize()
    print(f"sanitizer target: ok ({run.paths})")
    return 0 if run.paths else 1


def _find_package() -> None:
    """Use the installed crd-fast, else this source tree (CuPy path and reference without a build)."""
    try:
        import crd_fast  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(ROOT))


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.self_test:
        _find_package()
        return self_test()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = Report()
    if args.build:
        returncode = build(out_dir)
        if returncode != 0:
            check_build_log((out_dir / "build.log").read_text(), returncode, report)
            report.write(out_dir)
            return 2
        # a fresh interpreter, so the just-built editable install (its import hook is read at start-up) is used
        rest = [a for a in argv if a != "--build"]
        os.execv(sys.executable, [sys.executable, str(Path(__file__).resolve()), "--after-build", *rest])
    if args.after_build:
        check_build_log((out_dir / "build.log").read_text(), 0, report)
    _find_package()
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    if args.sanitizer_target:
        return sanitizer_target(args)
    import crd_fast

    props = torch.cuda.get_device_properties(0)
    report.info.update(
        device=props.name,
        capability=f"{props.major}{props.minor}",
        sms=props.multi_processor_count,
        memory_gib=round(props.total_memory / 2**30, 1),
        torch=torch.__version__,
        seed=args.seed,
        backends=crd_fast.backends(),
    )
    print(f"seed {args.seed}; {props.name} sm_{props.major}{props.minor}", flush=True)
    run = GpuRun(args, report)
    steps: list[Callable[[], Any]] = [
        run.dispatch_and_resources,
        run.correctness,
        run.residual,
        run.native_vs_cupy,
        run.streams_and_graphs,
    ]
    if not args.no_sanitizer:
        steps.append(run.sanitizers)
    if not args.no_timing:
        steps.append(run.timings)
    for step in steps:
        start = time.time()
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - a crashed step is a failed check, the rest still runs
            report.add(step.__name__, "step raised", False, note=repr(exc)[:400])
        print(f"  ({step.__name__}: {time.time() - start:.0f} s)", flush=True)
        report.write(out_dir)  # after every step: a timeout still leaves what was measured
    json_path, md_path = report.write(out_dir)
    print("\n" + md_path.read_text())
    print(f"wrote {json_path} and {md_path}; status {report.status()}")
    return report.status()


if __name__ == "__main__":
    sys.exit(main())
