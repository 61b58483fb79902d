"""GPU check of the fused CRD head: correctness of every kernel path, then timings. One call on a GPU machine.

    python bench/gpu_check.py [--build] [--quick] [--out DIR]

1. (--build) builds and installs crd-fast from this tree (pip, no build isolation), logging the ptxas
   register/spill report;
2. checks every path against the float64 reference on fresh random inputs of several shapes: compiled
   CUDA kernels (fp32, fp64, bf16, fp16), the same source through CuPy, the op's own dispatch, and the CPU
   fused path. Outputs and scratch are filled with NaN first, so an unwritten score fails; each GPU path
   runs twice and must give identical bits (a difference means a race);
3. times, with CUDA events (warm-up, median, inputs rotated so the L2 cache does not hold them): fused
   kernels, the unfused reference path in float32, and exact nearest-neighbour search by cuBLAS (torch
   matmul min-distance) over memory banks of 1%, 10% and 100% of 200 images' patches;
4. prints a short table last; writes gpu_check.json (and build.log) to --out or $OUT when given.

Exit status: 0 all checks passed, 1 a mismatch, 2 no GPU or the build failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(out_dir: Path | None) -> bool:
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-v", "-e", str(ROOT),
           "-Cbuild-dir=build/gpu", "-Ccmake.define.CRD_FAST_CUDA=ON"]
    print("building:", " ".join(cmd), flush=True)
    start = time.time()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    log = result.stdout + result.stderr
    if out_dir is not None:
        (out_dir / "build.log").write_text(log)
    reports = [line for line in log.splitlines() if "bytes spill stores" in line]
    spilling = [line.strip() for line in reports if "0 bytes spill stores, 0 bytes spill loads" not in line]
    print(f"build rc={result.returncode} in {time.time() - start:.0f} s; ptxas reports: {len(reports)}, with spills: {len(spilling)}")
    for line in spilling:
        print("  ", line)
    if result.returncode != 0:
        print(log[-4000:])
    return result.returncode == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", action="store_true", help="pip-install this tree first (needs nvcc, scikit-build-core, pybind11, cython)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_check.json and build.log")
    args = parser.parse_args()
    out_dir = Path(args.out) if args.out else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    if args.build and not build(out_dir):
        return 2
    try:
        import crd_fast  # noqa: F401  (installed, or editable)
    except ImportError:
        sys.path.insert(0, str(ROOT))  # not installed: the pure-Python source tree (CuPy path, reference)

    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    from crd_fast.core.embedding import embedding_dim
    from crd_fast.ops import native as _native, head_op as ops, reference
    from crd_fast.ops import cuda_launch
    from crd_fast import backends
    from crd_fast.ops import cpu as kcpu
    from crd_fast.ops import cuda as kcuda
    from crd_fast.ops import cupy_jit as cupy_module

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    info = {"device": props.name, "capability": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
            "torch": torch.__version__, "backends": backends()}
    print(json.dumps(info, indent=1, default=str), flush=True)
    report: dict = {"info": info, "checks": [], "timings": [], "attributes": []}

    kernel_backends = []
    if _native.has_native_cuda():
        kernel_backends.append("native")
        try:
            report["attributes"] = cuda_launch.crd_head_cuda_attributes()
            for a in report["attributes"]:
                print(f"  {a['name']:22s} regs {a['num_regs']:3d}  local {a['local_bytes']} B  shared {a['shared_bytes']} B  sm_{a['binary_version']}")
        except Exception as exc:  # pragma: no cover - diagnostic only
            print("attributes failed:", exc)
    if cupy_module.available():
        kernel_backends.append("cupy")
    print("kernel backends:", kernel_backends, flush=True)

    # ---- correctness -----------------------------------------------------------------------------
    gen = torch.Generator().manual_seed(int(time.time()) % 100000)  # fresh inputs every run
    cases = [
        ("odd 2 layers", [(2, 5, 7, 9), (2, 6, 4, 5)], "concat", 1024, 70),
        ("3 layers, downsample", [(3, 6, 6, 6), (3, 10, 3, 3), (3, 4, 11, 13)], "patchcore", 9, 9),
        ("single pixel", [(2, 3, 1, 1)], "concat", 1024, 1),
        ("wrn small-C patchcore", [(4, 64, 28, 28), (4, 128, 14, 14)], "patchcore", 96, 80),
        ("wide_resnet50_2 b8", [(8, 512, 28, 28), (8, 1024, 14, 14)], "concat", 1024, 1536),
    ]
    if args.quick:
        cases = cases[:3] + cases[-1:]
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-2}
    failures = 0

    def record(name, backend, dtype, err, norm_err, ok, note=""):
        nonlocal failures
        failures += 0 if ok else 1
        report["checks"].append(dict(case=name, path=backend, dtype=str(dtype).split(".")[1], max_rel=err, norm_rel=norm_err, ok=ok, note=note))
        print(f"  {'ok  ' if ok else 'FAIL'} {name:24s} {backend:10s} {str(dtype).split('.')[1]:9s} max rel {err:.2e}  norm rel {norm_err:.2e} {note}", flush=True)

    for name, shapes, emb, td, r in cases:
        d = embedding_dim([s[1] for s in shapes], emb, td)
        matrix = torch.randn(r, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
        offset = torch.randn(d, generator=gen, dtype=torch.float64)
        base = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            maps = [m.to(dtype) for m in base]
            want = reference.crd_head(maps, matrix, offset, emb, td)  # float64 of the same (rounded) values
            paths = list(kernel_backends) + ["op"] + (["cpu"] if dtype in (torch.float32, torch.float64) and kcpu.available() else [])
            for backend in paths:
                try:
                    if backend == "cpu":
                        got = ops.crd_head(maps, matrix, offset, emb, td)
                        note = ""
                    elif backend == "op":
                        got = ops.crd_head([m.to(dev) for m in maps], matrix.to(dev), offset.to(dev), emb, td).cpu()
                        note = f"({kcuda.cuda_backend()})"
                    else:
                        operands = kcuda.prepare([m.to(dev) for m in maps], matrix.to(dev), offset.to(dev), emb, td)
                        runs = []
                        for _ in range(2):
                            out = operands.new_out().fill_(float("nan"))
                            partial = operands.new_partial().fill_(float("nan"))
                            kcuda.run(operands, backend, out=out, partial=partial)
                            torch.cuda.synchronize()
                            runs.append(out.cpu())
                        got = runs[0]
                        note = "" if torch.equal(runs[0], runs[1]) or bool(torch.isnan(runs[0]).any()) else "NOT DETERMINISTIC"
                except Exception as exc:
                    record(name, backend, dtype, float("inf"), float("inf"), False, f"raised {type(exc).__name__}: {exc}")
                    continue
                finite = bool(torch.isfinite(got).all())
                err = float(((got.double() - want).abs() / want.abs()).max()) if finite else float("inf")
                norm_err = float(torch.linalg.vector_norm(got.double() - want) / torch.linalg.vector_norm(want)) if finite else float("inf")
                ok = finite and err < tol[dtype] and note != "NOT DETERMINISTIC"
                record(name, backend, dtype, err, norm_err, ok, note if finite else "unwritten (NaN) scores")

    # ---- timing --------------------------------------------------------------------------------------
    def cuda_time(fn, inputs, warmup=3, reps=20):
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
        return statistics.median(times), (max(times) - min(times))

    reps = 10 if args.quick else 30
    for batch in (8, 32):
        d, r = 1536, 1536
        matrix = (torch.randn(r, d, generator=gen, dtype=torch.float64) / math.sqrt(d)).to(dev)
        offset = torch.randn(d, generator=gen, dtype=torch.float64).to(dev)
        inputs = [[torch.randn(batch, 512, 28, 28, device=dev), torch.randn(batch, 1024, 14, 14, device=dev)] for _ in range(4)]
        n_patches = batch * 28 * 28
        rows = []
        m32, o32 = matrix.float(), offset.float()
        t_ref, spread = cuda_time(lambda x: reference.crd_head(x, m32, o32, "concat", dtype=torch.float32), inputs, reps=reps)
        rows.append(("reference fp32 (unfused)", t_ref, spread))
        for backend in kernel_backends:
            for dtype in (torch.float32, torch.bfloat16):
                ops_list = [kcuda.prepare([m.to(dtype) for m in x], matrix, offset, "concat", 1024) for x in inputs]
                t, s = cuda_time(lambda o: kcuda.run(o, backend), ops_list, reps=reps)
                rows.append((f"fused {backend} {str(dtype).split('.')[1]}", t, s))
        # exact 1-NN by cuBLAS: ||y||^2 + ||x||^2 - 2 y.x, min over the bank, chunked over the bank
        queries = [torch.randn(n_patches, d, device=dev) for _ in range(2)]
        for frac in (0.01, 0.1, 1.0):
            n_bank = int(200 * 784 * frac)
            bank = torch.randn(n_bank, d, device=dev)
            bank_sq = (bank * bank).sum(1)

            def nn_search(y, bank=bank, bank_sq=bank_sq):
                best = torch.full((y.shape[0],), float("inf"), device=dev)
                y_sq = (y * y).sum(1, keepdim=True)
                for start in range(0, bank.shape[0], 32768):
                    dist = y_sq + bank_sq[None, start : start + 32768] - 2.0 * (y @ bank[start : start + 32768].T)
                    best = torch.minimum(best, dist.min(dim=1).values)
                return best.clamp_min_(0).sqrt_()

            t, s = cuda_time(nn_search, queries, warmup=2, reps=max(5, reps // 3))
            rows.append((f"cuBLAS NN, bank {n_bank}", t, s))
            del bank, bank_sq
        for label, t, s in rows:
            report["timings"].append(dict(batch=batch, path=label, ms=t, spread_ms=s, patches_per_s=n_patches / (t / 1e3), vs_reference=t_ref / t))
        torch.cuda.empty_cache()

    if out_dir is not None:
        (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"\n{'batch':>5} {'path':28s} {'ms':>9} {'spread':>8} {'Mpatch/s':>9} {'vs ref':>7}")
    for row in report["timings"]:
        print(f"{row['batch']:5d} {row['path']:28s} {row['ms']:9.3f} {row['spread_ms']:8.3f} {row['patches_per_s'] / 1e6:9.2f} {row['vs_reference']:6.2f}x")
    bad = [c for c in report["checks"] if not c["ok"]]
    print(f"\nchecks: {len(report['checks']) - len(bad)} ok, {len(bad)} failed" + "".join(f"\n  FAIL {c}" for c in bad[:10]))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
