"""bench/gpu_check.py on the CPU: its self-test (argument parsing, tolerance model, report files) runs in CI."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


gpu_check = _load()


def test_self_test_passes_in_process():
    assert gpu_check.self_test() == 0


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--seed", "-1"])
    assert "--seed must be non-negative" in capsys.readouterr().err


def test_half_precision_model_catches_a_wrong_rounding():
    """A kernel that skipped the one rounding of the embedding to bf16 would be off by far more than the tolerance."""
    gen = torch.Generator().manual_seed(gpu_check.DEFAULT_SEED)
    maps = [torch.randn(2, 40, 9, 9, generator=gen), torch.randn(2, 24, 5, 5, generator=gen)]
    maps = [m.to(torch.bfloat16) for m in maps]
    matrix, offset = torch.randn(65, 64, generator=gen) / 8, torch.randn(64, generator=gen)
    model = gpu_check.expected_scores(maps, matrix, offset, "concat", 1024, torch.bfloat16)
    unrounded = gpu_check.expected_scores(maps, matrix, offset, "concat", 1024, torch.float32)
    assert gpu_check.norm_rel(unrounded, model) > 10 * gpu_check.TOLERANCES["bfloat16"]


def test_without_a_gpu_the_check_exits_2_and_the_self_test_runs_from_the_command_line(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--self-test"], capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0 and "self-test: ok" in result.stdout, result.stderr
    if not torch.cuda.is_available():
        result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--no-timing"],
                                capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 2 and "no CUDA device" in result.stdout
