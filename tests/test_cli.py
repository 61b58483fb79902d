"""The ``crd-fast`` command line: fit / predict / eval / export in process through ``main([...])``, their
outputs, one real subprocess, a real two-process torchrun fit, and the one-line errors and exit codes
for bad input.

Everything runs on tiny synthetic images (64 px) with a seeded random resnet18.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cli_detector_args, torchrun_command
from PIL import Image

from crd_fast import CRDDetector
from crd_fast.cli.main import main
from crd_fast.synthetic import generate_dataset

PX = 64
DET = cli_detector_args(PX, batch_size=4)
N_TRAIN, N_GOOD, N_DEFECT = 5, 2, 3
#: One image per forward pass: float32 features then do not depend on how images are grouped into batches,
#: so fits over different groupings (online updates, shards) must agree to float64 rounding.
ONE = ["--batch-size", "1"]


def assert_same_statistics(a: CRDDetector, b: CRDDetector) -> None:
    sa, sb = a.model.scorer.statistics, b.model.scorer.statistics
    assert sa.count == sb.count
    torch.testing.assert_close(sa.mean, sb.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sa.scatter, sb.scatter, rtol=1e-10, atol=1e-10)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mvtec")
    generate_dataset(
        root, categories=("fabric", "cap"), n_train=N_TRAIN, n_test_good=N_GOOD, n_test_defect=N_DEFECT, size=PX, seed=1
    )
    return root


@pytest.fixture(scope="module")
def model(data, tmp_path_factory) -> Path:
    """A model fitted through the CLI on an MVTec category folder, calibrated on its good test images."""
    path = tmp_path_factory.mktemp("model") / "fabric.crd"
    rc = main(
        ["fit", str(data / "fabric"), "-o", str(path), "--calibrate", str(data / "fabric" / "test" / "good"), *DET]
    )
    assert rc == 0
    return path


def test_help_in_a_real_subprocess():
    proc = subprocess.run([sys.executable, "-m", "crd_fast", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for command in ("fit", "predict", "eval", "demo", "export", "exit codes"):
        assert command in proc.stdout


def test_every_command_has_help_with_examples(capsys):
    for command in ("fit", "predict", "eval", "demo", "export"):
        assert main([command, "--help"]) == 0
        out = capsys.readouterr().out
        assert "examples:" in out and f"crd-fast {command}" in out


def test_help_does_not_import_torch():
    code = (
        "import sys, contextlib, io\n"
        "from crd_fast.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    codes = [main([c, '--help']) for c in ('fit', 'predict', 'eval', 'demo', 'export', 'bench')]\n"
        "assert codes == [0] * 6, codes\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_detector_options_come_from_the_detector_config():
    """Every option the command line sets is a DetectorConfig field with the config's default (the demo's
    own defaults aside), so ``crd-fast fit DATA`` builds what ``CRDDetector()`` builds."""
    from crd_fast.cli.main import build_parser
    from crd_fast.cli.options import detector_kwargs
    from crd_fast.detector.config import DEFAULTS

    args = build_parser().parse_args(["fit", "data", "-o", "m.crd"])
    kwargs = detector_kwargs(args)
    assert set(kwargs) == set(DEFAULTS) - {"blur_sigma", "target_dim"}
    assert {k: v for k, v in kwargs.items()} == {k: DEFAULTS[k] for k in kwargs}
    demo = detector_kwargs(build_parser().parse_args(["demo"]))
    assert demo["weights"] == DEFAULTS["weights"] and demo["backbone"] == DEFAULTS["backbone"]
    assert demo["resize"] is None and demo["lam_rel"] == DEFAULTS["lam_rel"]


# ---- fit ------------------------------------------------------------------------------------------------
def test_fit_on_category_folder_uses_train_good(model, data, capsys):
    det = CRDDetector.load(model)
    assert det.n_images == N_TRAIN  # train/good only, not the test images
    assert det.config["backbone"] == "resnet18" and det.uses_random_weights
    assert det.threshold is not None
    scores = det.predict(str(data / "fabric" / "test" / "good"), progress=False).image_scores
    assert det.threshold == pytest.approx(np.quantile(scores, 0.99), rel=1e-6)


def test_fit_options_reach_the_model(data, tmp_path, capsys):
    path = tmp_path / "m.crd"
    rc = main(
        [
            "fit",
            str(data / "cap" / "train" / "good"),
            "-o",
            str(path),
            *DET,
            "--layers",
            "layer2",
            "--embedding",
            "patchcore",
            "--lam-rel",
            "0.5",
            "--no-center",
            "--threshold",
            "3.5",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert f"wrote {path}" in out and "RANDOM" in out
    cfg = CRDDetector.load(path).config
    assert cfg["layers"] == ["layer2"] and cfg["embedding"] == "patchcore" and cfg["lam_rel"] == 0.5
    assert cfg["center"] is False and CRDDetector.load(path).threshold == 3.5


def test_fit_update_equals_fit_on_all_images(data, tmp_path):
    files = sorted((data / "cap" / "train" / "good").iterdir())
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    for i, f in enumerate(files):
        (first if i < 3 else second).joinpath(f.name).write_bytes(f.read_bytes())
    online, full = tmp_path / "online.crd", tmp_path / "full.crd"
    assert main(["fit", str(first), "-o", str(online), *DET, *ONE]) == 0
    assert main(["fit", str(second), "-o", str(online), "--update", "--no-progress", *ONE]) == 0
    assert main(["fit", str(data / "cap" / "train" / "good"), "-o", str(full), *DET, *ONE]) == 0
    a, b = CRDDetector.load(online), CRDDetector.load(full)
    assert a.n_images == b.n_images == len(files)
    assert_same_statistics(a, b)


def test_fit_distributed_flag_without_torchrun_is_a_single_process_fit(data, model, tmp_path, capsys, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    path = tmp_path / "dist.crd"
    rc = main(
        [
            "fit",
            str(data / "fabric"),
            "-o",
            str(path),
            "--distributed",
            "--calibrate",
            str(data / "fabric" / "test" / "good"),
            *DET,
        ]
    )
    assert rc == 0
    assert "without torchrun" in capsys.readouterr().err
    a, b = CRDDetector.load(path), CRDDetector.load(model)
    assert_same_statistics(a, b)
    assert a.threshold == pytest.approx(b.threshold, rel=1e-6)


@pytest.mark.slow
def test_fit_distributed_under_torchrun_two_processes(data, tmp_path):
    """The torchrun recipe of 'crd-fast fit --help', for real: two gloo ranks, rank 0 writes the same model."""
    path, single = tmp_path / "two.crd", tmp_path / "one.crd"
    cmd = [
        *torchrun_command(2),
        "-m",
        "crd_fast",
        "fit",
        str(data / "fabric"),
        "-o",
        str(path),
        "--distributed",
        *DET,
        *ONE,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True, text=True
    )
    try:
        log, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"torchrun job overran and was killed:\n{log[-4000:]}")
    assert proc.returncode == 0, log[-4000:]
    assert log.count(f"wrote {path}") == 1  # rank 0 alone reports (and writes)
    assert main(["fit", str(data / "fabric"), "-o", str(single), *DET, *ONE]) == 0
    a, b = CRDDetector.load(path), CRDDetector.load(single)
    assert a.n_images == b.n_images == N_TRAIN
    assert_same_statistics(a, b)
    assert a.train_score_stats == pytest.approx(b.train_score_stats, rel=1e-6)


# ---- predict ----------------------------------------------------------------------------------------------
def _test_files(data: Path, category: str = "fabric") -> list[str]:
    return sorted(str(p) for p in (data / category / "test").rglob("*.png"))


def test_predict_writes_scores_and_heatmaps(model, data, tmp_path, capsys):
    out = tmp_path / "pred"
    assert main(["predict", str(model), str(data / "fabric" / "test"), "-r", "-o", str(out), "--no-progress"]) == 0
    files = _test_files(data)
    with open(out / "scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["path"] for r in rows] == files
    assert {"index", "path", "image_score", "normalized_score", "label", "heatmap"} <= set(rows[0])
    doc = json.loads((out / "scores.json").read_text())
    assert doc["n_images"] == len(files) == len(doc["images"]) and doc["random_weights"] is True

    det = CRDDetector.load(model)
    expected = det.predict(files, progress=False)
    np.testing.assert_allclose([float(r["image_score"]) for r in rows], expected.image_scores, rtol=1e-6)
    assert [r["label"] == "True" for r in rows] == list(expected.labels)
    assert [img["label"] for img in doc["images"]] == list(expected.labels)
    heatmaps = sorted((out / "heatmaps").iterdir())
    assert len(heatmaps) == len(files) and {r["heatmap"] for r in rows} == {str(p) for p in heatmaps}
    for p in heatmaps:
        with Image.open(p) as img:
            assert img.size == (PX, PX) and img.mode == "RGB"
    # stems repeat across defect folders (000.png in good/ and hole/): names stay unique and readable
    assert (out / "heatmaps" / "good_000.png").is_file()
    assert "flagged as defective" in capsys.readouterr().out


def test_predict_threshold_override_and_no_images(model, data, tmp_path):
    out = tmp_path / "pred"
    files = _test_files(data)[:3]
    assert (
        main(["predict", str(model), *files, "-o", str(out), "--no-images", "--threshold", "1e9", "--no-progress"]) == 0
    )
    doc = json.loads((out / "scores.json").read_text())
    assert doc["threshold"] == 1e9 and [img["label"] for img in doc["images"]] == [False] * 3
    assert not (out / "heatmaps").exists()


def test_predict_without_threshold_gives_scores_only(data, tmp_path):
    path, out = tmp_path / "m.crd", tmp_path / "pred"
    assert main(["fit", str(data / "cap"), "-o", str(path), *DET]) == 0
    assert main(["predict", str(path), str(data / "cap" / "test" / "good"), "-o", str(out), "--no-progress"]) == 0
    with open(out / "scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == N_GOOD and "label" not in rows[0] and "normalized_score" not in rows[0]


def test_predict_distributed_flag_matches_single_process(model, data, tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    a, b = tmp_path / "a", tmp_path / "b"
    test_dir = str(data / "fabric" / "test")
    assert main(["predict", str(model), test_dir, "-r", "-o", str(a), "--no-progress"]) == 0
    assert main(["predict", str(model), test_dir, "-r", "-o", str(b), "--distributed", "--no-progress"]) == 0
    ra, rb = (list(csv.DictReader(open(d / "scores.csv", newline=""))) for d in (a, b))
    assert len(ra) == len(rb) == len(_test_files(data))
    for x, y in zip(ra, rb):
        assert Path(x.pop("heatmap")).name == Path(y.pop("heatmap")).name
        assert x == y
    assert sorted(p.name for p in (a / "heatmaps").iterdir()) == sorted(p.name for p in (b / "heatmaps").iterdir())


# ---- eval -------------------------------------------------------------------------------------------------
def test_eval_every_category_with_nn_and_report(data, tmp_path, capsys):
    report = tmp_path / "report"
    assert main(["eval", str(data), "--compare-nn", "--report", str(report), *DET]) == 0
    out = capsys.readouterr().out
    table = out[out.index("category") :]
    for word in ("fabric", "cap", "mean", "image AUROC", "pixel AUROC", "AUPRO", "F1-max", "NN img AUROC"):
        assert word in table
    doc = json.loads((report / "report.json").read_text())
    assert [c["name"] for c in doc["categories"]] == ["cap", "fabric"]
    for c in doc["categories"]:
        assert c["n_good"] == N_GOOD and c["n_defect"] == N_DEFECT
        assert 0.0 <= c["metrics"]["image_auroc"] <= 1.0 and 0.0 <= c["metrics"]["pixel_auroc"] <= 1.0
        assert 0.0 <= c["extra"]["nn"]["image_auroc"] <= 1.0 and c["extra"]["crd_head_ms_per_image"] > 0
    assert doc["run"]["random_weights"] is True and doc["run"]["command"].startswith("crd-fast eval")
    assert "RANDOM" in (report / "report.html").read_text()


def test_eval_one_category_and_category_folder_agree(data, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["eval", str(data), "--category", "cap", "--report", str(a), *DET]) == 0
    assert main(["eval", str(data / "cap"), "--report", str(b), *DET]) == 0
    ja, jb = (json.loads((d / "report.json").read_text()) for d in (a, b))
    assert [c["name"] for c in ja["categories"]] == [c["name"] for c in jb["categories"]] == ["cap"]
    assert ja["categories"][0]["metrics"]["image_auroc"] == jb["categories"][0]["metrics"]["image_auroc"]


# ---- export -----------------------------------------------------------------------------------------------
def test_export_whole_detector_runs_in_onnxruntime(model, data, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from crd_fast.deploy import OnnxDetector

    onnx_path = tmp_path / "model.onnx"
    assert main(["export", str(model), "-o", str(onnx_path), "--no-progress"]) == 0
    assert "images" in capsys.readouterr().out
    assert onnx_path.is_file() and Path(str(onnx_path) + ".json").is_file()
    files = _test_files(data)[:4]
    got = OnnxDetector(str(onnx_path)).predict(files).image_scores
    want = CRDDetector.load(model).predict(files, progress=False).image_scores
    np.testing.assert_allclose(got, want, rtol=1e-3)


def test_export_head_only_half_rank(model, tmp_path):
    pytest.importorskip("onnxruntime")
    onnx_path = tmp_path / "head.onnx"
    assert main(["export", str(model), "-o", str(onnx_path), "--head-only", "--half", "--rank", "16"]) == 0
    meta = json.loads(Path(str(onnx_path) + ".json").read_text())
    assert meta["head_only"] is True and meta["precision"] == "fp16" and meta["rank"] == 16
    assert [i["name"] for i in meta["inputs"]] == ["layer2", "layer3"]


# ---- bad input: exit code 2, one line, no traceback ---------------------------------------------------------
def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("crd-fast: error: ") and "Traceback" not in err[0]
    return err[0]


def test_missing_training_folder(tmp_path, capsys):
    assert main(["fit", str(tmp_path / "nope"), "-o", str(tmp_path / "m.crd"), *DET]) == 2
    assert "does not exist" in _one_line_error(capsys)


def test_mvtec_root_given_to_fit_names_the_categories(data, tmp_path, capsys):
    assert main(["fit", str(data), "-o", str(tmp_path / "m.crd"), *DET]) == 2
    assert "cap, fabric" in _one_line_error(capsys)


@pytest.mark.parametrize("value", ["-1", "0", "abc", "nan"])
def test_bad_lam_rel(value, data, tmp_path, capsys):
    assert main(["fit", str(data / "cap"), "-o", str(tmp_path / "m.crd"), *DET, "--lam-rel", value]) == 2
    assert "--lam-rel" in _one_line_error(capsys)
    assert not (tmp_path / "m.crd").exists()


@pytest.mark.parametrize(
    "args, words",
    [
        (["--layers", "layer9"], "layer9"),
        (["--weights", "/no/such/weights.pth"], "weights.pth"),
        (["--backbone", "vgg16", "--layers", "layer2,layer3"], "unknown layer(s) ['layer2', 'layer3'] for vgg16"),
        (["--batch-size", "0"], "--batch-size"),
        (["--crop", "128"], "crop (128) must not exceed resize (64)"),
        (["--device", "tpu"], "tpu"),
    ],
)
def test_bad_option_values(args, words, data, tmp_path, capsys):
    assert main(["fit", str(data / "cap"), "-o", str(tmp_path / "m.crd"), *DET, *args]) == 2
    assert words in _one_line_error(capsys)


def test_corrupt_model_file(data, tmp_path, capsys):
    bad = tmp_path / "bad.crd"
    bad.write_bytes(b"this is not a model" * 10)
    assert main(["predict", str(bad), str(data / "cap" / "test" / "good"), "-o", str(tmp_path / "out")]) == 2
    assert "bad.crd" in _one_line_error(capsys)
    assert main(["export", str(bad), "-o", str(tmp_path / "m.onnx")]) == 2
    assert "bad.crd" in _one_line_error(capsys)


def test_missing_model_file(data, tmp_path, capsys):
    assert (
        main(["predict", str(tmp_path / "none.crd"), str(data / "cap" / "test" / "good"), "-o", str(tmp_path / "o")])
        == 2
    )
    assert "none.crd" in _one_line_error(capsys)


def test_unreadable_image(model, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    assert main(["predict", str(model), str(folder), "-o", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "broken.png" in _one_line_error(capsys)


def test_eval_without_categories(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["eval", str(tmp_path / "empty"), *DET]) == 2
    assert "no categories" in _one_line_error(capsys)
    assert main(["eval", str(tmp_path / "missing"), *DET]) == 2
    assert "does not exist" in _one_line_error(capsys)


def test_imagenet_weights_offline(data, tmp_path, capsys, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    assert main(["fit", str(data / "cap"), "-o", str(tmp_path / "m.crd"), *DET, "--weights", "imagenet"]) == 2
    message = _one_line_error(capsys)
    assert "ImageNet weights" in message and "weights=" in message


def test_unknown_command_and_option(capsys):
    assert main(["frobnicate"]) == 2
    assert "frobnicate" in _one_line_error(capsys)
    assert main(["fit", "x", "-o", "y", "--no-such-option"]) == 2
    assert "--no-such-option" in _one_line_error(capsys)


def test_runtime_failure_is_exit_1_and_debug_shows_traceback(data, tmp_path, capsys, monkeypatch):
    def boom(self, *args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(CRDDetector, "fit", boom)
    argv = ["fit", str(data / "cap"), "-o", str(tmp_path / "m.crd"), *DET]
    assert main(argv) == 1
    line = _one_line_error(capsys)
    assert "simulated failure" in line and "--debug" in line
    assert main([*argv, "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == "crd-fast: error: simulated failure"


def test_heatmap_names_are_unique_and_readable():
    from crd_fast.cli.predict import heatmap_names

    assert heatmap_names(["a/x.png", "a/y.jpg"]) == ["x.png", "y.png"]
    assert heatmap_names(["t/good/000.png", "t/hole/000.png", "t/hole/001.png"]) == [
        "good_000.png",
        "hole_000.png",
        "hole_001.png",
    ]
    assert heatmap_names(["p/a/x.png", "q/a/x.png"]) == ["00000_a_x.png", "00001_a_x.png"]
