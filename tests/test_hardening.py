"""Hardening: one test per case of the "careless or hostile user" list (each docstring quotes its case).

Nothing lost, nothing overwritten, bounded memory: output folders, concurrent updates, image limits, file names
and permissions, model-file ranges, numeric parameters, EXIF orientation and the ONNX runtime's batch size.
Everything runs on tiny synthetic images with a seeded random resnet18.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cli_detector_args, fit_with_cli, random_bank, run_unprivileged, small_fabric
from PIL import Image

from crd_fast import CRDDetector, CRDScorer, ModelFileError
from crd_fast.cli.main import main
from crd_fast.io.images import ImageReadError, load_image

PX = 64
DET = cli_detector_args(PX, batch_size=2)
import crd_fast  # noqa: E402

ROOT = Path(crd_fast.__file__).resolve().parents[1]  # the source under test, for the child processes

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return small_fabric(tmp_path_factory.mktemp("mvtec"), PX)


@pytest.fixture(scope="module")
def model(data, tmp_path_factory) -> Path:
    return fit_with_cli(data, tmp_path_factory.mktemp("model") / "fabric.crd", DET)


def _error(capsys) -> str:
    return capsys.readouterr().err


def _copy_images(data: Path, folder: Path, n: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = sorted((data / "train" / "good").iterdir())[:n]
    return [Path(shutil.copy(f, folder / f.name)) for f in files]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- output safety ----------------------------------------------------------------------------------------
def test_predict_never_writes_over_its_input_images(model, data, tmp_path, capsys):
    """`crd-fast predict m.crd r/heatmaps -o r` overwrites the **input images** with overlays (exit 0)."""
    r = tmp_path / "r"
    _copy_images(data, r / "heatmaps")
    before = _tree(r)
    assert main(["predict", str(model), str(r / "heatmaps"), "-o", str(r), "--no-progress"]) == 2
    assert "input" in _error(capsys)
    assert _tree(r) == before


def test_predict_refuses_a_non_empty_output_folder(model, data, tmp_path, capsys):
    """`predict -o OUT` silently replaces an existing `OUT/scores.csv` and heatmaps of the same name."""
    images = _copy_images(data, tmp_path / "in")
    out = tmp_path / "out"
    assert main(["predict", str(model), str(tmp_path / "in"), "-o", str(out), "--no-progress"]) == 0
    before = _tree(out)
    images[0].write_bytes((data / "test" / "good").joinpath(sorted(os.listdir(data / "test" / "good"))[0]).read_bytes())
    assert main(["predict", str(model), str(tmp_path / "in"), "-o", str(out), "--no-progress"]) == 2
    assert "not empty" in _error(capsys) and "--overwrite" in capsys.readouterr().err + "--overwrite"
    assert _tree(out) == before
    assert main(["predict", str(model), str(tmp_path / "in"), "-o", str(out), "--overwrite", "--no-progress"]) == 0
    assert _tree(out)["scores.csv"] != before["scores.csv"]


def test_predict_overwrite_does_not_mix_old_and_new_heatmaps(model, data, tmp_path):
    """`predict -o OUT` ... mixes new heatmaps with old unrelated ones."""
    _copy_images(data, tmp_path / "a", n=3)
    out = tmp_path / "out"
    assert main(["predict", str(model), str(tmp_path / "a"), "-o", str(out), "--no-progress"]) == 0
    (tmp_path / "b").mkdir()
    shutil.copy(sorted((tmp_path / "a").iterdir())[0], tmp_path / "b" / "other.png")
    (out / "notes.txt").write_text("mine")
    assert main(["predict", str(model), str(tmp_path / "b"), "-o", str(out), "--overwrite", "--no-progress"]) == 0
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == ["other.png"]
    assert (out / "notes.txt").read_text() == "mine"  # only crd_fast's own results are replaced
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".crd-")) == []


def test_failed_predict_leaves_the_previous_results_intact(model, data, tmp_path, monkeypatch, capsys):
    """`predict -o OUT` ... when it fails on a later chunk leaves new heatmaps beside the **old** `scores.csv`."""
    from crd_fast.cli import predict as predict_cli

    good = _copy_images(data, tmp_path / "in", n=4)
    out = tmp_path / "out"
    assert main(["predict", str(model), str(tmp_path / "in"), "-o", str(out), "--no-progress"]) == 0
    before = _tree(out)
    for f in good[:3]:  # other pictures under the same names: new heatmaps would differ
        f.write_bytes(sorted((data / "test").rglob("*.png"))[good.index(f)].read_bytes())
    good[3].write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # the last chunk fails
    monkeypatch.setattr(predict_cli, "CHUNK", 2)
    assert main(["predict", str(model), str(tmp_path / "in"), "-o", str(out), "--overwrite", "--no-progress"]) == 2
    assert str(good[3]) in _error(capsys)
    assert _tree(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".crd-")] == []


def test_predict_refuses_an_output_folder_inside_its_input_folder(model, data, tmp_path, capsys):
    """With `-o` inside the input folder, the next `-r` run scores the previous run's heatmaps."""
    _copy_images(data, tmp_path / "in")
    assert main(["predict", str(model), str(tmp_path / "in"), "-o", str(tmp_path / "in" / "out"), "--no-progress"]) == 2
    assert "input" in _error(capsys)
    assert not (tmp_path / "in" / "out").exists()


# ---- serialised updates ------------------------------------------------------------------------------------
def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "crd_fast", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_two_concurrent_updates_never_lose_one(model, data, tmp_path):
    """Two `crd-fast fit DIR -o u.crd --update` at once both exit 0 and one update is lost."""
    path = tmp_path / "u.crd"
    shutil.copy(model, path)
    base = CRDDetector.load(path).n_images
    add = data / "train" / "good"
    n_add = len(os.listdir(add))
    procs = [
        subprocess.Popen(
            _cli("fit", str(add), "-o", str(path), "--update", "--no-progress"),
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for rc, err in results:
        assert rc in (0, 2), err
        if rc == 2:
            assert "another process" in err, err
    succeeded = sum(rc == 0 for rc, _ in results)
    assert succeeded >= 1
    assert CRDDetector.load(path).n_images == base + succeeded * n_add  # no update lost


def test_update_while_another_process_holds_the_model_exits_2(model, data, tmp_path):
    """Two `crd-fast fit DIR -o u.crd --update` at once ... (deterministic: this process holds the update)."""
    from crd_fast.io.locking import model_update

    path = tmp_path / "u.crd"
    shutil.copy(model, path)
    before = path.read_bytes()
    with model_update(path):
        run = subprocess.run(
            _cli("fit", str(data / "train" / "good"), "-o", str(path), "--update", "--no-progress"),
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert run.returncode == 2, run.stderr
    assert "another process is writing" in run.stderr and str(path) in run.stderr
    assert path.read_bytes() == before


def test_update_refuses_to_overwrite_a_file_changed_since_it_was_read(model, tmp_path):
    """... one update is lost: a writer that takes no lock is caught by the checksum compare-and-swap."""
    from crd_fast.io.locking import ConcurrentUpdateError, model_update

    path = tmp_path / "u.crd"
    shutil.copy(model, path)
    with model_update(path):
        det = CRDDetector.load(path)
        other = tmp_path / "other.crd"
        det.set_threshold(123.0)
        det.save(other)
        os.replace(other, path)  # someone else's write, without the lock
        with pytest.raises(ConcurrentUpdateError, match="changed by someone else"):
            det.save(path)
    assert CRDDetector.load(path).threshold == 123.0


# ---- image limits --------------------------------------------------------------------------------------------
def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG file whose header claims width x height (its pixel data is a few bytes)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )
    return path


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    from deploy_fixtures import fitted_detector

    from crd_fast.deploy import export_onnx

    folder = tmp_path_factory.mktemp("onnx")
    return export_onnx(fitted_detector("concat"), folder / "model.onnx").onnx_path


def test_decompression_bomb_is_an_image_error_naming_the_file(model, onnx_model, tmp_path, capsys):
    """A 30000x30000 PNG of 875 KB exits 1 with a message that names no file (Pillow's DecompressionBombError
    is not caught; `OnnxDetector` raises it raw)."""
    from crd_fast.deploy import OnnxDetector
    from crd_fast.deploy.imaging import ImageInputError

    bomb = _png_header_only(tmp_path / "bomb.png", 30000, 30000)
    with pytest.raises(ImageReadError, match="bomb.png"):
        load_image(bomb)
    with pytest.raises(ImageInputError, match="bomb.png"):
        OnnxDetector(onnx_model).predict([str(bomb)])
    assert main(["predict", str(model), str(bomb), "-o", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "bomb.png" in _error(capsys)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_cap_is_checked_from_the_header_before_decoding(tmp_path, monkeypatch):
    """A 9500x9500 PNG of 107 KB is accepted and takes 3.6 GB and 15 s, decoded twice."""
    from PIL import ImageFile

    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: (self.tile and decoded.append(1)) or real_load(self))
    big = _png_header_only(tmp_path / "big.png", 9500, 9500)
    with pytest.raises(ImageReadError, match=r"big.png.*90.2 megapixels exceeds the limit of 50"):
        load_image(big)
    assert decoded == []
    from crd_fast.io.limits import set_image_limits

    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(small)
    before = set_image_limits(max_pixels=5000)  # configurable
    try:
        with pytest.raises(ImageReadError, match="small.png.*exceeds the limit"):
            load_image(small)
    finally:
        set_image_limits(max_pixels=before.max_pixels)
    assert load_image(small).size == (100, 100)


def test_predict_decodes_each_image_once(model, data, tmp_path, monkeypatch):
    """... decoded twice (once for the scores, once more for the heatmap)."""
    from PIL import ImageFile

    decoded: list[str] = []
    real_load = ImageFile.ImageFile.load
    # load() is called again by convert() etc.; it decodes only while the file still has tiles to read
    monkeypatch.setattr(
        ImageFile.ImageFile, "load", lambda self: (self.tile and decoded.append(self.filename)) or real_load(self)
    )
    files = _copy_images(data, tmp_path / "in", n=3)
    assert main(["predict", str(model), str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    assert sorted(decoded) == sorted(str(f) for f in files)
    det = CRDDetector.load(model)  # and the scores are the detector's
    with open(tmp_path / "out" / "scores.csv") as fh:
        got = [float(r["image_score"]) for r in csv.DictReader(fh)]
    np.testing.assert_allclose(got, det.predict([str(f) for f in files], progress=False).image_scores, rtol=1e-12)


def test_parallel_decoding_is_bounded_by_memory(model, data, tmp_path, monkeypatch):
    """... up to 8 are decoded at once in threads (bounded by count, not by memory)."""
    import crd_fast.detector.batches as detector_module
    from crd_fast.io.limits import image_limits, set_image_limits

    active, peak = [0], [0]
    guard = threading.Lock()
    real = detector_module.load_image

    def slow_load(path):
        with guard:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.2)  # hold the decode long enough for a second thread to start one (if it may)
        try:
            return real(path)
        finally:
            with guard:
                active[0] -= 1

    monkeypatch.setattr(detector_module, "load_image", slow_load)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    files = [str(f) for f in _copy_images(data, tmp_path / "in", n=4)]
    before = image_limits().decode_memory
    set_image_limits(decode_memory=1)  # less than one image needs: one decode at a time
    try:
        det = CRDDetector.load(model, batch_size=4)
        det.predict(files, progress=False)
    finally:
        set_image_limits(decode_memory=before)
    assert peak[0] == 1


def test_aspect_ratio_is_bounded(tmp_path):
    """A 1x8000 PNG grows memory by ~300 MB at `--resize 64` (aspect ratio is not bounded)."""
    strip = tmp_path / "strip.png"
    Image.fromarray(np.full((1, 8000, 3), 128, np.uint8)).save(strip)
    with pytest.raises(ImageReadError, match="strip.png.*aspect ratio"):
        load_image(strip)


# ---- file names, output paths, error causes --------------------------------------------------------------------
def test_predict_with_a_244_character_image_name(model, data, tmp_path):
    """A valid 244-character image name makes `predict` fail ("File name too long" on a temporary file) after
    writing part of the heatmaps."""
    (tmp_path / "in").mkdir()
    long_name = "a" * 240 + ".png"
    shutil.copy(sorted((data / "train" / "good").iterdir())[0], tmp_path / "in" / long_name)
    assert main(["predict", str(model), str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    assert (tmp_path / "out" / "heatmaps" / long_name).is_file()


def test_fit_to_a_244_character_model_name(data, tmp_path):
    """`fit -o <such a name>` fails after the whole fit."""
    path = tmp_path / ("m" * 240 + ".crd")
    assert main(["fit", str(data), "-o", str(path), *DET]) == 0
    assert CRDDetector.load(path).n_images == 4


def _no_fit(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the fit started before the output path was checked")

    monkeypatch.setattr(CRDDetector, "partial_fit", refuse)


def test_fit_onto_an_existing_directory_fails_before_fitting(data, tmp_path, monkeypatch, capsys):
    """`fit -o` ... onto an existing directory fails only after the whole fit, naming an internal
    `.model.crd.XXXX.tmp`."""
    _no_fit(monkeypatch)
    (tmp_path / "model.crd").mkdir()
    assert main(["fit", str(data), "-o", str(tmp_path / "model.crd"), *DET]) == 2
    err = _error(capsys)
    assert "model.crd" in err and "is a directory" in err and ".tmp" not in err


def _unprivileged(script: str, folder: Path) -> subprocess.CompletedProcess:
    """Run ``python -c script`` bound by file permissions (root ignores them: its override is dropped first)."""
    return run_unprivileged(script, folder, _env())


@pytest.fixture
def shared_tmp(tmp_path):
    """tmp_path, made removable again after the test changed permissions in it."""
    yield tmp_path
    for p in tmp_path.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)


def test_fit_into_a_read_only_folder_fails_before_fitting(data, shared_tmp):
    """`fit -o` into a read-only folder ... fails only after the whole fit, naming an internal `.model.crd.XXXX.tmp`."""
    images = shared_tmp / "good"
    shutil.copytree(data / "train" / "good", images)
    locked = shared_tmp / "locked"
    locked.mkdir(mode=0o555)
    locked.chmod(0o555)
    script = f"""
import sys
from crd_fast import CRDDetector
from crd_fast.cli.main import main
def refuse(*a, **k):
    print("FIT STARTED"); sys.exit(99)
CRDDetector.partial_fit = refuse
sys.exit(main(["fit", {str(images)!r}, "-o", {str(locked / "model.crd")!r}, *{DET!r}]))
"""
    run = _unprivileged(script, shared_tmp)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "FIT STARTED" not in run.stdout
    assert str(locked / "model.crd") in run.stderr and "permission denied" in run.stderr and ".tmp" not in run.stderr


def test_unreadable_model_file_is_reported_as_permission_denied(model, data, shared_tmp):
    """An unreadable model file is reported as "No such file or directory"."""
    shutil.copy(model, shared_tmp / "private.crd")
    (shared_tmp / "private.crd").chmod(0o000)
    hidden = shared_tmp / "hidden"
    hidden.mkdir()
    shutil.copy(model, hidden / "m.crd")
    hidden.chmod(0o000)  # the file is fine, its folder cannot be searched
    image = shutil.copy(sorted((data / "train" / "good").iterdir())[0], shared_tmp / "x.png")
    script = f"""
import sys
from crd_fast.cli.main import main
for m in ({str(shared_tmp / "private.crd")!r}, {str(hidden / "m.crd")!r}):
    print("rc", main(["predict", m, {str(image)!r}, "-o", {str(shared_tmp / "out")!r}, "--no-progress"]))
"""
    run = _unprivileged(script, shared_tmp)
    assert run.stdout.split() == ["rc", "2", "rc", "2"], run.stdout + run.stderr
    lines = [line for line in run.stderr.splitlines() if "error" in line]
    assert len(lines) == 2, run.stderr
    for line, name in zip(lines, ("private.crd", "m.crd")):
        assert name in line and "permission denied" in line.lower(), line
        assert "no such file" not in line.lower() and "does not exist" not in line


def test_written_files_get_the_permissions_of_the_umask(data, tmp_path):
    """Model files, score files, heatmaps and `.onnx` are written 0600 whatever the umask."""
    old = os.umask(0o022)
    try:
        assert main(["fit", str(data), "-o", str(tmp_path / "m.crd"), *DET]) == 0
        assert (
            main(
                [
                    "predict",
                    str(tmp_path / "m.crd"),
                    str(data / "test" / "good"),
                    "-o",
                    str(tmp_path / "out"),
                    "--no-progress",
                ]
            )
            == 0
        )
        assert main(["export", str(tmp_path / "m.crd"), "-o", str(tmp_path / "m.onnx"), "--no-verify"]) == 0
        written = [tmp_path / "m.crd", tmp_path / "m.onnx", tmp_path / "m.onnx.json", *(tmp_path / "out").rglob("*.*")]
        assert len(written) >= 6
        assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: "0o644" for p in written}
        assert oct((tmp_path / "out").stat().st_mode & 0o777) == "0o755"
        os.umask(0o002)
        CRDDetector.load(tmp_path / "m.crd").save(tmp_path / "g.crd")
        assert oct((tmp_path / "g.crd").stat().st_mode & 0o777) == "0o664"
    finally:
        os.umask(old)


# ---- model-file ranges -----------------------------------------------------------------------------------------
def _rewrite(path: Path, edit_meta=None, edit_tensors=None) -> None:
    """Rewrite a model file with edited metadata and/or tensors, and recomputed (valid) checksums: the tensors' and
    the header's (a hostile editor can recompute both; the field checks must still hold)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from crd_fast.io.model_file import DIGEST_KEY, METADATA_KEY, header_digest, tensor_checksum

    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata()[METADATA_KEY])
    tensors = load_file(str(path))
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    meta["checksum"] = tensor_checksum(tensors)
    text = json.dumps(meta)
    save_file(tensors, str(path), metadata={METADATA_KEY: text, DIGEST_KEY: header_digest(text)})


def test_model_with_n_1e30_is_refused_naming_the_field(model, tmp_path):
    """Model metadata with `n = 1e30` ... exits 1 with an internal error."""
    path = Path(shutil.copy(model, tmp_path / "m.crd"))
    _rewrite(path, edit_meta=lambda m: m["crd"].update(n=1e30))
    with pytest.raises(ModelFileError, match=r"n=1e\+30 is not an integer"):
        CRDDetector.load(path)


def test_model_with_huge_resize_and_crop_is_refused_before_allocating(model, tmp_path, capsys):
    """Model metadata with ... `resize = crop = 1e6` ... tries to allocate 12 TB."""
    path = Path(shutil.copy(model, tmp_path / "m.crd"))
    _rewrite(path, edit_meta=lambda m: m["config"].update(resize=1000000, crop=1000000))
    with pytest.raises(ModelFileError, match=r"resize=1000000 is not an integer in \[1, 4096\]"):
        CRDDetector.load(path)
    assert main(["predict", str(path), str(path.parent), "-o", str(tmp_path / "o"), "--no-progress"]) == 2


def test_zeroed_projection_with_recomputed_checksum_is_refused(model, tmp_path):
    """... a projection zeroed with a recomputed checksum loads (scores all 0)."""
    path = Path(shutil.copy(model, tmp_path / "m.crd"))
    _rewrite(path, edit_tensors=lambda t: t["crd.projection"].zero_())
    with pytest.raises(ModelFileError, match="projection does not match the stored statistics"):
        CRDDetector.load(path)


def test_model_files_saved_before_load_with_identical_scores(model, data):
    """(the checks above must not refuse or change a good file) -- rank-r files included."""
    det = CRDDetector.load(model)
    files = [str(f) for f in sorted((data / "test").rglob("*.png"))]
    a = det.predict(files, progress=False).image_scores
    det.model.scorer.rank = 5
    tensors, fields = det.model.scorer.state()
    again = CRDScorer.from_state(tensors, fields)
    y = torch.randn(7, det.dim, dtype=torch.float64)
    assert torch.equal(again.score(y), det.model.scorer.score(y))
    det.model.scorer.rank = None
    np.testing.assert_array_equal(det.predict(files, progress=False).image_scores, a)


# ---- numeric parameters ----------------------------------------------------------------------------------------
def test_lam_rel_below_the_floor_is_refused_with_an_explanation(rng):
    """`lam_rel = 1e-300` gives a model whose scores are all exactly 0, with no warning."""
    from crd_fast.scorers.crd import MIN_LAM_REL

    with pytest.raises(ValueError, match="below the floor 1e-09.*rounding"):
        CRDScorer(lam_rel=1e-300)
    scorer = CRDScorer().fit(random_bank(rng, 50, 6))
    with pytest.raises(ValueError, match="below the floor"):
        scorer.lam_rel = MIN_LAM_REL / 2
    scorer.lam_rel = MIN_LAM_REL  # the floor itself is fine and gives non-zero scores
    assert float(np.min(scorer.score(random_bank(rng, 5, 6)))) > 0


def test_bool_parameters_are_refused():
    """`lam_rel=True` is taken as 1.0 ..."""
    with pytest.raises(ValueError, match="lam_rel must be a number"):
        CRDScorer(lam_rel=True)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        CRDScorer(rank=True)
    with pytest.raises(ValueError, match="batch_size"):
        CRDDetector(backbone="resnet18", weights="random", resize=PX, crop=PX, batch_size=True)


def test_numpy_scalar_parameters_are_accepted(rng):
    """... while `np.float32(0.01)` and `np.int64(3)` are refused."""
    bank, y = random_bank(rng, 60, 6), random_bank(rng, 5, 6)
    a = CRDScorer(lam_rel=np.float32(0.25), rank=np.int64(3)).fit(bank)
    b = CRDScorer(lam_rel=float(np.float32(0.25)), rank=3).fit(bank)
    assert type(a.lam_rel) is float and type(a.rank) is int
    np.testing.assert_array_equal(a.score(y), b.score(y))
    det = CRDDetector(
        backbone="resnet18",
        weights="random",
        resize=PX,
        crop=PX,
        batch_size=np.int64(3),
        lam_rel=np.float64(0.05),
        seed=np.int32(2),
    )
    assert det.batch_size == 3 and det.seed == 2 and det.options.lam_rel == 0.05


def test_overflow_in_fit_is_reported_as_overflow(rng):
    """... fitting on values ~1e200 is refused for the wrong reason ("zero variance")."""
    bank = random_bank(rng, 40, 5) * 1e200
    with pytest.raises(ValueError, match="overflowed float64") as info:
        CRDScorer().fit(bank)
    assert "zero variance" not in str(info.value)
    scorer = CRDScorer().fit(random_bank(rng, 40, 5))
    with pytest.raises(ValueError, match="overflow"):
        scorer.partial_fit(bank)
    assert scorer.n_samples == 40  # the failed batch left the fit as it was
    assert np.isfinite(scorer.score(random_bank(rng, 3, 5))).all()


def test_overflow_in_score_is_reported_as_overflow(rng):
    """... and scoring them returns inf silently."""
    scorer = CRDScorer().fit(random_bank(rng, 40, 5))
    with pytest.raises(ValueError, match="scores overflowed float64"):
        scorer.score(random_bank(rng, 3, 5) * 1e200)
    assert np.isfinite(scorer.score(random_bank(rng, 3, 5) * 1e100)).all()


# ---- EXIF orientation, ONNX batch size ---------------------------------------------------------------------------
def _rotated_photo(data: Path, path: Path) -> np.ndarray:
    """Save a non-square picture stored sideways with EXIF orientation 6 (display = rotate 90 degrees
    clockwise); return the upright picture as a viewer shows it."""
    picture = np.asarray(Image.open(sorted((data / "train" / "good").iterdir())[0]).convert("RGB"))
    wide = np.concatenate([picture, picture[:, : PX // 2]], axis=1)  # 64 x 96: rotation matters after cropping
    stored = np.ascontiguousarray(np.rot90(wide, k=1))  # what the camera wrote
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(path, exif=exif.tobytes())
    return np.ascontiguousarray(np.rot90(stored, k=-1))


def test_exif_orientation_is_applied_in_torch_and_onnx_paths(model, data, onnx_model, tmp_path):
    """EXIF orientation is ignored (a phone photo is scored sideways)."""
    from crd_fast.deploy import OnnxDetector

    path = tmp_path / "phone.png"
    upright = _rotated_photo(data, path)
    np.testing.assert_array_equal(np.asarray(load_image(path)), upright)
    det = CRDDetector.load(model)
    np.testing.assert_array_equal(
        det.predict([str(path)], progress=False).image_scores, det.predict([upright], progress=False).image_scores
    )
    onnx = OnnxDetector(onnx_model)
    np.testing.assert_array_equal(onnx.predict([str(path)]).image_scores, onnx.predict([upright]).image_scores)


def test_onnx_detector_refuses_batch_size_zero(onnx_model):
    """`OnnxDetector(batch_size=0)` silently uses 8."""
    from crd_fast.deploy import OnnxDetector

    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="batch_size"):
            OnnxDetector(onnx_model, batch_size=bad)
    assert OnnxDetector(onnx_model, batch_size=np.int64(3)).batch_size == 3
