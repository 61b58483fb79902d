"""The child compute-sanitizer runs (tests/gpu/test_gpu_sanitizers.py): small launches of every op's kernels through
every backend that can run them here, in every dtype. The tool judges; this prints "sanitizer target: ok" at the end.

    python tests/gpu/sanitizer_target.py --seed N
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, so that gpu.kernel_checks imports

from gpu.kernel_checks import CHECKS, DEFAULT_SEED, DTYPES, path_problem  # noqa: E402


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    device = torch.device("cuda", torch.cuda.current_device())
    capability = torch.cuda.get_device_capability(device)
    ran = []
    for check in CHECKS.values():
        spec = check.spec
        maps64, matrix, second = check.inputs(args.seed, [(2, 5, 7, 9), (2, 6, 4, 5)], 70, "concat", 1024)
        for path, launcher in spec.launchers.items():
            if path_problem(spec, path, device) is not None:
                continue
            for dtype in DTYPES:
                ops = spec.cuda_operands(
                    [m.to(dtype).to(device) for m in maps64],
                    matrix.to(device),
                    second.to(device),
                    "concat",
                    1024,
                    capability=capability,
                )
                launcher(ops)
            ran.append(f"{spec.name}/{path}")
    torch.cuda.synchronize()
    if not ran:
        print("sanitizer target: no kernel path can run here")
        return 1
    print(f"sanitizer target: ok ({', '.join(ran)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
