"""Smoke test of an installed crd-fast wheel: run it with the wheel's Python from outside the source tree.

scripts/check_wheel.sh runs it in a fresh virtual environment with no compiler on PATH; cibuildwheel runs it as the
wheels' test-command (pyproject.toml, [tool.cibuildwheel]). Every check fails with a message naming the problem:

- crd_fast imports from the environment (not a source tree) and its compiled modules load: ``backends()`` reports
  the fused CPU pass, with OpenMP, and CUDA kernels as CRD_FAST_EXPECT_CUDA_KERNELS says ("0" for the CPU build);
- the compiled pass gives the float64 reference's scores on fresh random inputs;
- a detector with a seeded random resnet18 fits and predicts a few generated images, and its CPU head really runs
  through the compiled pass (docs/DESIGN.md "No silent loss of kernels").
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SystemExit(f"wheel smoke test FAILED: {message}")


def check_installed_package() -> dict:
    import crd_fast

    location = Path(crd_fast.__file__).resolve()
    check("site-packages" in location.parts, f"crd_fast was imported from {location}, not from an installed wheel")
    info = crd_fast.backends()
    check(info["native"], f"the compiled module _C did not load: {info['native_error']}")
    check(info["fused_cpu"], "the fused CPU pass (_crd_head_cpu) did not load")
    check(info["fused_cpu_openmp"], "the fused CPU pass was built without OpenMP")
    expect_cuda = os.environ.get("CRD_FAST_EXPECT_CUDA_KERNELS")  # "0": the CPU build, "1": the CUDA build
    if expect_cuda is not None:
        want = expect_cuda == "1"
        check(info["cuda_kernels"] == want, f"_C {'lacks' if want else 'contains'} the CUDA kernels (expected {want})")
    print(f"crd_fast {crd_fast.__version__} from {location.parent}")
    print(f"backends: { {k: v for k, v in info.items() if k != 'cuda_devices'} }")
    return info


def loaded_openmp_runtimes() -> list[str]:
    """Paths of the OpenMP runtimes mapped into this process (Linux: /proc/self/maps)."""
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        return []
    paths = {line.split()[-1] for line in maps.read_text().splitlines() if "libgomp" in line or "libomp" in line}
    return sorted(paths)


def check_pass_matches_reference() -> None:
    import torch

    from crd_fast.ops import crd_head, reference

    gen = torch.Generator().manual_seed(2024)
    # two layers at different resolutions (the resize and the concatenation the pass folds in), batch 3
    maps = [torch.randn(3, 8, 12, 10, generator=gen, dtype=torch.float64),
            torch.randn(3, 16, 6, 5, generator=gen, dtype=torch.float64)]  # fmt: skip
    matrix = torch.randn(24, 24, generator=gen, dtype=torch.float64) / 24**0.5
    offset = torch.randn(24, generator=gen, dtype=torch.float64)
    got = crd_head(maps, matrix, offset, "concat", 24)
    want = reference.crd_head(maps, matrix, offset, "concat", 24)
    err = float(((got - want).abs() / want.abs()).max())
    check(got.shape == want.shape == (3, 12, 10), f"crd_head returned shape {tuple(got.shape)}, expected (3, 12, 10)")
    check(err < 1e-10, f"the compiled pass differs from the float64 reference by {err:.3g} (relative)")
    print(f"compiled pass vs float64 reference: max relative error {err:.2e}")


def check_detector_uses_the_pass() -> None:
    import numpy as np
    import torch

    from crd_fast import CRDDetector
    from crd_fast.ops import cpu
    from crd_fast.synthetic.dataset import render_sample

    def batch(images: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255

    train = batch([render_sample("fabric", size=64, index=i, split="train")[0] for i in range(6)])
    test = batch([render_sample("fabric", size=64, index=0)[0], render_sample("fabric", 64, defect="hole")[0]])
    calls = []
    original = cpu.fused_head_cpu

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    det = CRDDetector(backbone="resnet18", weights="random", seed=0, resize=64, crop=64).fit(train, progress=False)
    cpu.fused_head_cpu = counting
    try:
        result = det.predict(test, progress=False)
    finally:
        cpu.fused_head_cpu = original
    scores = result.image_scores
    check(tuple(scores.shape) == (2,), f"predict returned {tuple(scores.shape)} image scores for 2 images")
    check(bool(np.isfinite(np.asarray(scores)).all()), f"predict returned non-finite scores {scores}")
    check(tuple(result.anomaly_maps.shape)[0] == 2, "predict returned no anomaly map per image")
    check(len(calls) > 0, "predict scored without the compiled fused CPU pass (the reference fallback ran)")
    print(f"detector: fitted 6 generated images, predicted 2 (scores {np.round(np.asarray(scores), 4).tolist()}), "
          f"the fused CPU pass ran {len(calls)} time(s)")  # fmt: skip


def check_command_line() -> None:
    exe = shutil.which("crd-fast") or str(Path(sys.executable).with_name("crd-fast"))
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=300, check=False)
    check(out.returncode == 0 and "demo" in out.stdout, f"`crd-fast --help` failed: {out.stderr[-2000:]}")


def main() -> None:
    check_installed_package()
    check_pass_matches_reference()
    check_detector_uses_the_pass()
    check_command_line()
    print(f"OpenMP runtimes loaded: {loaded_openmp_runtimes()}")
    print("wheel smoke test passed")


if __name__ == "__main__":
    main()
