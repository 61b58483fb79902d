"""The GPU check of crd-fast's kernels: the GPU tests (tests/gpu), then timings, written as one table.

    python bench/gpu_check.py [--build] [--quick] [--seed N] [--out DIR] [--no-sanitizer] [--no-timing]
    python bench/gpu_check.py --self-test        # on any machine, no GPU: arguments, test results, report

Run from the repository root on a machine with a GPU (docs/GPU.md "Running bench/gpu_check.py"); it is built to
finish in under 10 minutes on one data-centre GPU. Steps, each recorded as checks:

1. (--build) builds and installs crd-fast from this tree; fails on any ptxas spill in the build log.
2. ``pytest tests/gpu`` (tests/gpu/kernel_checks.py says what they check): every op runs a kernel on this device,
   no compiled kernel spills; every op's kernels through every backend (native, cupy) and dtype against the float64
   reference or the same-roundings model, outputs poisoned first, two runs identical, native vs CuPy bit for bit;
   views, B = 0, r = 0, 5 layers, a map of more than 2^31 elements; LocalCRDHead on the device; side streams,
   CUDA-graph capture and ``torch.compile(mode="reduce-overhead")``; compute-sanitizer's four tools. Each test is
   one check (a skipped test: a check that could not run here). ``--seed`` reaches them as $CRD_FAST_GPU_SEED;
   ``--quick`` leaves out the tests marked ``large``, ``--no-sanitizer`` those marked ``sanitizer``.
3. timings (CUDA events, median): fused paths vs the unfused float32 reference vs exact nearest-neighbour search by
   cuBLAS, with GB/s and TFLOP/s against this device's measured copy bandwidth and matmul peak; the residual
   kernels vs the unfused float32 reference.crd_residual on the same shapes.

Writes gpu_check.json and gpu_check.md (a table for bench/RESULTS.md) to --out (default $OUT or .), and the tests'
JUnit XML as gpu_tests.xml. Exit status: 0 every check passed; 1 a check failed; 2 no GPU or the build failed;
3 passed, but some checks could not run (e.g. no compute-sanitizer or no CuPy): the JSON says which.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
GPU_TESTS = ROOT / "tests" / "gpu"
DEFAULT_SEED = 20261201  # the default of tests/gpu/kernel_checks.py (tests/test_gpu_check.py holds them equal)
SEED_ENV = "CRD_FAST_GPU_SEED"


# ---- arguments and report: pure Python, self-tested on the CPU ------------------------------------------------
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", action="store_true", help="pip-install this tree first (needs nvcc)")
    parser.add_argument("--quick", action="store_true", help="leave out the large test inputs; fewer timing repeats")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"base seed of all inputs ({DEFAULT_SEED})")
    parser.add_argument("--out", default=os.environ.get("OUT") or ".", help="folder for gpu_check.json/.md")
    parser.add_argument("--no-sanitizer", action="store_true", help="skip the compute-sanitizer runs")
    parser.add_argument("--no-timing", action="store_true", help="skip the timings")
    parser.add_argument("--self-test", action="store_true", help="check this script's own logic on the CPU")
    parser.add_argument("--after-build", action="store_true", help=argparse.SUPPRESS)  # re-run after --build
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"--seed must be non-negative, got {args.seed}")
    return args


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
            lines += [
                f"| {c.step} | {c.name} | {'FAIL' if c.ok is False else 'not run'} | {_cell(c.note)} |" for c in bad
            ]
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


def _cell(text: str) -> str:
    """``text`` on one line of a Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


# ---- the GPU tests: run by pytest, read back from its JUnit XML --------------------------------------------------
def pytest_command(args: argparse.Namespace, junit: Path) -> list[str]:
    """``python -m pytest tests/gpu`` with the markers --quick and --no-sanitizer leave out, writing ``junit``."""
    markers = ["cuda"] + (["not large"] if args.quick else []) + (["not sanitizer"] if args.no_sanitizer else [])
    return [
        sys.executable,
        "-m",
        "pytest",
        str(GPU_TESTS),
        "-p",
        "no:cacheprovider",
        "-q",
        "-rfEs",
        "-m",
        " and ".join(markers),
        f"--junitxml={junit}",
        "-o",
        "junit_family=xunit1",  # keeps the per-test properties (error, tol) in the XML
    ]


def _first_line(text: Optional[str], limit: int = 400) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return (lines[0] if lines else "")[:limit]


def checks_from_junit(xml_text: str) -> list[Check]:
    """One check per test case of pytest's JUnit XML: step = the test file (test_gpu_<step>.py), name = the test with
    its parameters; ok = passed (True), failed or errored (False), skipped (None, the reason as note). Properties
    ``error`` and ``tol`` (record_property) become the check's numbers."""
    checks = []
    for case in ET.fromstring(xml_text).iter("testcase"):
        module = case.get("classname", "").rsplit(".", 1)[-1]
        step = module.removeprefix("test_gpu_").removeprefix("test_") or "tests"
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        numbers = {k: float(props[k]) for k in ("error", "tol") if props.get(k) not in (None, "")}
        failure = case.find("failure")
        error = case.find("error")
        skipped = case.find("skipped")
        if failure is not None or error is not None:
            bad = failure if failure is not None else error
            ok, note = False, _first_line(bad.get("message") or bad.text)
        elif skipped is not None:
            ok, note = None, _first_line(skipped.get("message") or skipped.text)
        else:
            ok, note = True, ""
        checks.append(Check(step, case.get("name", "?"), ok, numbers.get("error"), numbers.get("tol"), note))
    return checks


def run_gpu_tests(args: argparse.Namespace, out_dir: Path, report: Report, source_tree: bool = False) -> None:
    """Runs tests/gpu in a child pytest (a crash there does not take the timings down) and records its tests.

    The child runs in tests/, so it imports the installed crd-fast; ``source_tree``: none is installed, and it
    imports this source tree instead (the CuPy path and the reference)."""
    junit = out_dir / "gpu_tests.xml"
    junit.unlink(missing_ok=True)
    env = dict(os.environ, **{SEED_ENV: str(args.seed)})
    if source_tree:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = pytest_command(args, junit)
    print("running:", " ".join(cmd), flush=True)
    start = time.time()
    result = subprocess.run(cmd, cwd=GPU_TESTS.parent, env=env, check=False)
    report.info["gpu_tests"] = {"returncode": result.returncode, "seconds": round(time.time() - start, 1)}
    if not junit.is_file():
        report.add("tests", "pytest tests/gpu", False, note=f"no results (exit status {result.returncode})")
        return
    for check in checks_from_junit(junit.read_text()):
        report.add(check.step, check.name, check.ok, check.error, check.tol, check.note)
    if result.returncode not in (0, 1):  # 1: tests failed (recorded above); anything else: pytest itself failed
        report.add("tests", "pytest tests/gpu", False, note=f"exit status {result.returncode}")


SELF_TEST_XML = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="4">
<testcase classname="gpu.test_gpu_kernels" name="test_kernels_match_the_reference[crd_head-a-float32-native]">
<properties><property name="error" value="3e-08"/><property name="tol" value="2e-05"/></properties></testcase>
<testcase classname="gpu.test_gpu_kernels" name="test_kernels_match_the_reference[crd_head-a-float16-cupy]">
<properties><property name="error" value="0.5"/><property name="tol" value="2e-05"/></properties>
<failure message="AssertionError: norm-relative error 5.00e-01 (tol 2e-05), seed 7&#10;assert False">tb</failure>
</testcase>
<testcase classname="gpu.test_gpu_sanitizers" name="test_compute_sanitizer[memcheck]">
<skipped type="pytest.skip" message="compute-sanitizer not found">skip</skipped></testcase>
<testcase classname="gpu.test_gpu_streams" name="test_a_side_stream_behind_a_sleep[crd_head]">
<error message="failed on setup with RuntimeError: CUDA error">tb</error></testcase>
</testsuite></testsuites>
"""


def self_test() -> int:
    """This script's logic on the CPU: argument parsing, the pytest command, reading its results, the report."""
    args = parse_args(["--quick", "--seed", "7", "--out", "x", "--no-sanitizer"])
    assert (args.quick, args.seed, args.out, args.no_sanitizer, args.build) == (True, 7, "x", True, False)
    assert parse_args([]).seed == DEFAULT_SEED
    cmd = pytest_command(args, Path("r.xml"))
    assert cmd[cmd.index("-m", 3) + 1] == "cuda and not large and not sanitizer" and "--junitxml=r.xml" in cmd
    assert pytest_command(parse_args([]), Path("r.xml"))[cmd.index("-m", 3) + 1] == "cuda"
    checks = checks_from_junit(SELF_TEST_XML)
    assert [(c.step, c.ok) for c in checks] == [("kernels", True), ("kernels", False), ("sanitizers", None),
                                                ("streams", False)]  # fmt: skip
    assert (checks[0].error, checks[0].tol) == (3e-08, 2e-05) and checks[1].note.startswith("AssertionError: norm")
    assert checks[2].note == "compute-sanitizer not found" and "CUDA error" in checks[3].note
    report = Report(info={"device": "self-test", "capability": "0.0", "torch": "-", "seed": 7})
    report.checks += checks[:1]
    assert report.status() == 0
    report.checks.append(checks[2])
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
        assert "| sanitizers | test_compute_sanitizer[memcheck] | not run | compute-sanitizer not found |" in md
        assert "100 (5%)" in md
    report.checks.append(checks[1])
    assert report.status() == 1
    print("gpu_check self-test: ok")
    return 0


# ---- the build ---------------------------------------------------------------------------------------------
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


# ---- timings ------------------------------------------------------------------------------------------------
def kernel_paths(spec, device) -> list[str]:
    """The backends that can run ``spec``'s kernels on ``device`` (their static checks and compile; no probe)."""
    from crd_fast.ops import cuda_dispatch

    index = cuda_dispatch.device_index(device)
    cap = cuda_dispatch.capability(index)
    return [b.name for b in cuda_dispatch.BACKENDS if b.problem(spec.kernels, index, cap) is None]


def timings(args: argparse.Namespace, report: Report) -> None:
    """Fused paths vs the unfused float32 reference vs cuBLAS exact NN search, then the residual kernels vs the
    unfused float32 reference.crd_residual, at batch 8 and 32 of wide_resnet50_2-sized maps (r = d = 1536)."""
    import torch

    from crd_fast.ops import head_op, reference, residual_op

    dev = torch.device("cuda", torch.cuda.current_device())
    cap = torch.cuda.get_device_capability(dev)
    reps = 10 if args.quick else 30
    peaks = device_peaks()
    report.info["peaks"] = peaks

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

    def fused_rows(spec, label, xs, matrix, second):
        rows = []
        for path in kernel_paths(spec, dev):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                ops = [spec.cuda_operands([m.to(dtype) for m in x], matrix, second, "concat", 1024, cap) for x in xs]
                ms = cuda_time(lambda o, launch=spec.launchers[path]: launch(o), ops)
                rows.append((f"{label}{path} {str(ops[0].dtype).split('.')[1]}", ms, ops[0]))
        return rows

    gen = torch.Generator().manual_seed(args.seed + 500)
    d = r = 1536
    matrix = (torch.randn(r, d, generator=gen, dtype=torch.float64) / math.sqrt(d)).to(dev)
    offset = torch.randn(d, generator=gen, dtype=torch.float64).to(dev)
    for batch in (8, 32):
        inputs = [
            [torch.randn(batch, 512, 28, 28, device=dev), torch.randn(batch, 1024, 14, 14, device=dev)]
            for _ in range(3)
        ]
        n = batch * 28 * 28
        m32, o32 = matrix.float(), offset.float()
        t_ref = cuda_time(lambda x, m=m32, o=o32: reference.crd_head(x, m, o, "concat", dtype=torch.float32), inputs)
        rows = [("reference float32 (unfused)", t_ref, None)]
        rows += fused_rows(head_op.SPEC, "fused ", inputs, matrix, offset)
        queries = [torch.randn(n, d, device=dev) for _ in range(2)]
        for frac in (0.01, 0.1, 1.0):
            bank = torch.randn(int(200 * 784 * frac), d, device=dev)
            bank_sq = (bank * bank).sum(1)

            def nn_search(y, bank=bank, bank_sq=bank_sq):
                best = torch.full((y.shape[0],), math.inf, device=dev)
                y_sq = (y * y).sum(1, keepdim=True)
                for s in range(0, bank.shape[0], 32768):
                    dist = y_sq + bank_sq[None, s : s + 32768] - 2.0 * (y @ bank[s : s + 32768].T)
                    best = torch.minimum(best, dist.min(dim=1).values)
                return best.clamp_min_(0).sqrt_()

            rows.append((f"cuBLAS exact NN, bank {bank.shape[0]}", cuda_time(nn_search, queries, warmup=2), None))
            del bank, bank_sq
        # the residual kernels (the local head's fused part) on the same maps: q (784, r), out (n, r)
        q = torch.randn(28 * 28, r, generator=gen, dtype=torch.float64).to(dev)
        t_res = cuda_time(
            lambda x, m=m32, qq=q.float(): reference.crd_residual(x, m, qq, "concat", dtype=torch.float32), inputs
        )
        res_rows = [("residual reference float32 (unfused)", t_res, None)]
        res_rows += fused_rows(residual_op.SPEC, "residual fused ", inputs, matrix, q)
        for group, ref_ms in ((rows, t_ref), (res_rows, t_res)):
            for label, ms, ops in group:
                report.timings.append(timing_row(batch, label, ms, ref_ms, ops, n, d, r, peaks))
        torch.cuda.empty_cache()


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


def device_peaks() -> dict:
    """This device's achievable peaks: a 1 GiB device copy (GB/s, read + write) and an 8192^3 matmul per dtype."""
    import torch

    dev = torch.device("cuda", torch.cuda.current_device())

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

    src = torch.empty(1 << 28, device=dev)
    dst = torch.empty_like(src)
    copy = 2 * src.numel() * 4 / (best_ms(lambda s=src, d=dst: d.copy_(s)) / 1e3) / 1e9
    del src, dst
    matmul = {}
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        a = torch.randn(8192, 8192, device=dev).to(dtype)
        matmul[str(dtype).split(".")[1]] = 2 * 8192**3 / (best_ms(lambda a=a: a @ a, reps=3) / 1e3) / 1e12
        del a
    torch.cuda.empty_cache()
    return {"copy_gb_s": copy, "matmul_tflop_s": matmul, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}


# ---- the command --------------------------------------------------------------------------------------------
def _find_package() -> bool:
    """Use the installed crd-fast, else this source tree (CuPy path and reference without a build); True for the
    source tree."""
    if importlib.util.find_spec("crd_fast") is not None:
        return False
    sys.path.insert(0, str(ROOT))
    return True


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.self_test:
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
    source_tree = _find_package()
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    import crd_fast
    from crd_fast.ops import cuda_launch, native

    props = torch.cuda.get_device_properties(0)
    report.info.update(
        device=props.name,
        capability=f"{props.major}{props.minor}",
        sms=props.multi_processor_count,
        memory_gib=round(props.total_memory / 2**30, 1),
        torch=torch.__version__,
        seed=args.seed,
        crd_fast=str(Path(crd_fast.__file__).parent),
        backends=crd_fast.backends(),
    )
    if native.has_native_cuda():
        try:  # the registers and spills of every compiled kernel (tests/gpu checks the spills)
            report.info["kernel_attributes"] = cuda_launch.crd_head_cuda_attributes()
        except Exception as exc:  # noqa: BLE001 - e.g. no image for this device: the tests say so
            report.info["kernel_attributes"] = repr(exc)[:400]
    print(f"seed {args.seed}; {props.name} sm_{props.major}{props.minor}", flush=True)
    steps = [("tests", lambda: run_gpu_tests(args, out_dir, report, source_tree))]
    if not args.no_timing:
        steps.append(("timings", lambda: timings(args, report)))
    for name, step in steps:
        start = time.time()
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - a crashed step is a failed check, the rest still runs
            report.add(name, "step raised", False, note=repr(exc)[:400])
        print(f"  ({name}: {time.time() - start:.0f} s)", flush=True)
        report.write(out_dir)  # after every step: a timeout still leaves what was measured
    json_path, md_path = report.write(out_dir)
    print("\n" + md_path.read_text())
    print(f"wrote {json_path} and {md_path}; status {report.status()}")
    return report.status()


if __name__ == "__main__":
    sys.exit(main())
