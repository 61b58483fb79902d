"""Nothing destroyed, ever: one test per case of the second "careless or hostile user" audit (each docstring quotes
its case), the commit protocols under a kill at every step, and the output-safety layer on every writer.

Everything runs on tiny synthetic images with a seeded random resnet18 (``crd-fast ... $O`` in the cases).
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import shutil
import socket
import stat
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import cli_detector_args, fit_with_cli, random_bank, run_unprivileged, small_fabric

import crd_fast
from crd_fast import CRDDetector, CRDScorer, ModelFileError
from crd_fast.cli.main import main
from crd_fast.synthetic import generate_dataset

PX = 64
O = cli_detector_args(PX, batch_size=2)  # noqa: E741 - the cases' "$O"
ROOT = Path(crd_fast.__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return small_fabric(tmp_path_factory.mktemp("mvtec"), PX)


@pytest.fixture(scope="module")
def model(data, tmp_path_factory) -> Path:
    return fit_with_cli(data, tmp_path_factory.mktemp("model") / "m.crd", O)


def _copy_images(data: Path, folder: Path, n: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(f, folder / f.name)) for f in sorted((data / "train" / "good").iterdir())[:n]]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _err(capsys) -> str:
    return capsys.readouterr().err


def _refuse_work(monkeypatch) -> None:
    """Any model load or fit fails the test: the command had to refuse before its work."""

    def refuse(*args, **kwargs):
        raise AssertionError("the work started before the outputs were checked")

    monkeypatch.setattr(CRDDetector, "partial_fit", refuse)
    monkeypatch.setattr(CRDDetector, "load", classmethod(refuse))


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


# ---- data loss ---------------------------------------------------------------------------------------------------
def test_predict_refuses_a_model_inside_its_output_folder(model, data, tmp_path, capsys):
    """`crd-fast predict ow/heatmaps/x.crd test -o ow --overwrite` (model inside OUT/heatmaps): exit 0, the model it
    was using is deleted."""
    ow = tmp_path / "ow"
    (ow / "heatmaps").mkdir(parents=True)
    inner = Path(shutil.copy(model, ow / "heatmaps" / "x.crd"))
    _copy_images(data, tmp_path / "test")
    before = _tree(ow)
    assert main(["predict", str(inner), str(tmp_path / "test"), "-o", str(ow), "--overwrite", "--no-progress"]) == 2
    err = _err(capsys)
    assert "contains the input file" in err and "x.crd" in err
    assert _tree(ow) == before


def test_fit_refuses_to_overwrite_a_training_image(data, tmp_path, monkeypatch, capsys):
    """`crd-fast fit good -o good/g0.png $O` overwrites a training image."""
    good = tmp_path / "good"
    images = _copy_images(data, good, n=4)
    before = _tree(good)
    _refuse_work(monkeypatch)
    assert main(["fit", str(good), "-o", str(images[0]), *O]) == 2
    err = _err(capsys)
    assert str(images[0]) in err and "input" in err
    assert _tree(good) == before


def test_fit_refuses_to_overwrite_a_calibration_image(data, tmp_path, monkeypatch, capsys):
    """... (a `--calibrate` image too)."""
    _copy_images(data, tmp_path / "good", n=4)
    held_out = _copy_images(data, tmp_path / "held", n=2)
    before = _tree(tmp_path / "held")
    _refuse_work(monkeypatch)
    args = ["fit", str(tmp_path / "good"), "-o", str(held_out[1]), "--calibrate", str(tmp_path / "held"), *O]
    assert main(args) == 2
    assert "input" in _err(capsys)
    assert _tree(tmp_path / "held") == before


def test_fit_refuses_to_overwrite_its_weights_file(data, tmp_path, monkeypatch, capsys):
    """`fit good -o w.pth --weights w.pth` destroys the weights file."""
    import torch
    import torchvision

    weights = tmp_path / "w.pth"
    torch.save(torchvision.models.resnet18().state_dict(), str(weights))
    before = weights.read_bytes()
    _refuse_work(monkeypatch)
    args = ["fit", str(data), "-o", str(weights), *O, "--weights", str(weights)]
    assert main(args) == 2
    assert "is the input" in _err(capsys)
    assert weights.read_bytes() == before
    # the library refuses it too: a detector never saves over the weights file it was built from
    monkeypatch.undo()
    det = CRDDetector(backbone="resnet18", weights=str(weights), resize=PX, crop=PX, lam_rel=0.01, spatial="global")
    det.fit([str(p) for p in sorted((data / "train" / "good").iterdir())], progress=False)
    with pytest.raises(ValueError, match="is the input"):
        det.save(weights)
    assert weights.read_bytes() == before


def test_export_refuses_to_overwrite_its_model(model, tmp_path, capsys):
    """`crd-fast export m.crd -o m.crd`: exit 0, ONNX now stands where the model was."""
    path = Path(shutil.copy(model, tmp_path / "m.crd"))
    before = path.read_bytes()
    assert main(["export", str(path), "-o", str(path), "--no-verify"]) == 2
    assert "is the input" in _err(capsys)
    assert path.read_bytes() == before
    from crd_fast.deploy import export_onnx

    with pytest.raises(ValueError, match="is the input"):
        export_onnx(path, path, verify=False)
    assert path.read_bytes() == before


def _special_files(tmp_path: Path) -> list[Path]:
    fifo = tmp_path / "fifo.crd"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock.crd"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    sock.close()
    return [Path("/dev/null"), fifo, sock_path]


def test_outputs_that_are_devices_fifos_or_sockets_are_refused(data, model, tmp_path, monkeypatch, capsys):
    """As root, `crd-fast fit good -o /dev/full $O` replaced the device node with a regular file (`/dev/null`
    too)."""
    specials = _special_files(tmp_path)
    kinds = {p: stat.S_IFMT(os.lstat(p).st_mode) for p in specials}
    _refuse_work(monkeypatch)
    for target in specials:
        assert main(["fit", str(data), "-o", str(target), *O]) == 2
        err = _err(capsys)
        assert str(target) in err and ("device" in err or "FIFO" in err or "socket" in err), err
    monkeypatch.undo()
    for target in specials:
        assert main(["export", str(model), "-o", str(target), "--no-verify"]) == 2
        assert str(target) in _err(capsys)
    scorer = CRDScorer().fit(random_bank(np.random.default_rng(0), 30, 4))
    for target in specials:
        with pytest.raises(ValueError, match="not a regular file|device|FIFO|socket"):
            scorer.save(target)
    assert {p: stat.S_IFMT(os.lstat(p).st_mode) for p in specials} == kinds  # still what they were


@pytest.mark.parametrize(
    "option, value, shown",
    [
        ("--batch-size", "65537", "65536"),
        ("--rank", "100000", "65536"),
        ("--seed", str(2**63), "2**63 - 1"),
        ("--seed", str(2**66), "2**63 - 1"),  # was "Overflow when unpacking long long" (exit 1)
        ("--resize", "5000", "4096"),
    ],
)
def test_out_of_range_options_are_refused_before_fitting(data, model, tmp_path, monkeypatch, capsys, option, value,
                                                         shown):  # fmt: skip
    """`fit ... --batch-size 65537` (also `--rank 100000`, `--seed 2**63`) exits 0 and writes a model that `predict`
    then refuses: a working model at that path is replaced by an unloadable one."""
    path = Path(shutil.copy(model, tmp_path / "m.crd"))
    before = path.read_bytes()
    _refuse_work(monkeypatch)
    assert main(["fit", str(data), "-o", str(path), *O, option, value]) == 2
    err = _err(capsys)
    assert option in err and shown in err and "Overflow" not in err, err
    assert path.read_bytes() == before
    name = option[2:].replace("-", "_")
    with pytest.raises(ValueError, match=name):
        CRDDetector(backbone="resnet18", weights="random", **{name: int(value)})


def test_two_predicts_into_one_new_folder_never_replace_each_other(model, data, tmp_path, monkeypatch, capsys):
    """Two `predict` runs into the same new OUT, neither with `--overwrite`: both exit 0 and the later one silently
    replaces the other's results (the new-or-empty check is not repeated at commit)."""
    from crd_fast.cli import predict as predict_cli

    _copy_images(data, tmp_path / "a", n=2)
    _copy_images(data, tmp_path / "b", n=3)
    out = tmp_path / "out"
    real = predict_cli._predict_local
    started, finished = [], []

    def first_run_is_overtaken(*args, **kwargs):
        records = real(*args, **kwargs)
        if not started:  # while run A works, run B starts and finishes into the same OUT
            started.append(True)
            finished.append(main(["predict", str(model), str(tmp_path / "b"), "-o", str(out), "--no-progress"]))
        return records

    monkeypatch.setattr(predict_cli, "_predict_local", first_run_is_overtaken)
    assert main(["predict", str(model), str(tmp_path / "a"), "-o", str(out), "--no-progress"]) == 2
    assert finished == [0]
    assert "filled by another run" in _err(capsys)
    with open(out / "scores.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 3  # B's results, whole
    assert len(list((out / "heatmaps").iterdir())) == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".crd-")] == []


def test_export_checks_its_metadata_path_before_writing_anything(model, tmp_path, capsys):
    """`mkdir e/m.onnx.json; crd-fast export m2.crd -o e/m.onnx`: exit 2, but only after `m.onnx` was replaced."""
    e = tmp_path / "e"
    e.mkdir()
    (e / "m.onnx").write_bytes(b"the previous export")
    (e / "m.onnx.json").mkdir()
    assert main(["export", str(model), "-o", str(e / "m.onnx"), "--no-verify"]) == 2
    err = _err(capsys)
    assert "m.onnx.json" in err and "directory" in err
    assert (e / "m.onnx").read_bytes() == b"the previous export"
    assert sorted(p.name for p in e.iterdir()) == ["m.onnx", "m.onnx.json"]


# ---- silent wrong results ------------------------------------------------------------------------------------------
def _edit_header(path: Path, edit) -> None:
    """Edit the JSON header of a model file in place, as a text editor would (the stored digest left as it was)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["crd_fast"])
    edit(meta)
    header["__metadata__"]["crd_fast"] = json.dumps(meta, sort_keys=True)
    new = json.dumps(header).encode()
    new += b" " * ((8 - len(new) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["config"].update(backbone="resnet34"),
        lambda m: m["config"].update(seed=7),
        lambda m: m["config"].update(resize=80),
        lambda m: m.update(threshold=1e9),
    ],
    ids=["config.backbone", "seed", "resize", "threshold"],
)
def test_edited_model_header_is_refused(model, data, tmp_path, edit, capsys):
    """The model file's checksum covers the tensors only: an edited header (`config.backbone` resnet34, `seed`,
    `resize`, `threshold`) loads and scores differently."""
    path = Path(shutil.copy(model, tmp_path / "m.crd"))
    _edit_header(path, edit)
    with pytest.raises(ModelFileError, match="header digest mismatch"):
        CRDDetector.load(path)
    assert main(["predict", str(path), str(data / "test" / "good"), "-o", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "header digest" in _err(capsys)


@pytest.fixture(scope="module")
def onnx_pair(model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "m.onnx"
    assert main(["export", str(model), "-o", str(out)]) == 0
    return out


@pytest.mark.parametrize("field", ["mean", "std"])
def test_edited_onnx_metadata_is_refused(onnx_pair, tmp_path, field):
    """The ONNX sidecar JSON is not hashed: edited mean/std change scores."""
    from crd_fast.deploy import DeployError, OnnxDetector
    from crd_fast.deploy.metadata import metadata_digest

    onnx = Path(shutil.copy(onnx_pair, tmp_path / "m.onnx"))
    meta = json.loads(Path(str(onnx_pair) + ".json").read_text())
    meta["preprocess"][field] = [0.5, 0.5, 0.5]
    sidecar = tmp_path / "m.onnx.json"
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(DeployError, match="metadata digest mismatch"):
        OnnxDetector(onnx)
    meta["metadata_sha256"] = metadata_digest(meta)  # recomputed by hand: the model holds the exported digest
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(DeployError, match="inside the model"):
        OnnxDetector(onnx)
    del meta["metadata_sha256"]  # removed: the model still says the metadata had one
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(DeployError, match="was removed"):
        OnnxDetector(onnx)


def _old_stage_name(output: Path) -> str:
    """The staging folder name a distributed predict derived before (fixed for a given OUT and torchrun job)."""
    job = "|".join(os.environ.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT"))
    return ".crd-stage-" + hashlib.sha256(f"{os.path.realpath(output)}|{job}".encode()).hexdigest()[:12]


def _age(path: Path, seconds: float = 3600) -> None:
    """Make ``path`` (and everything in it) look left by a run that ended ``seconds`` ago."""
    old = time.time() - seconds
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(p, (old, old), follow_symlinks=False)


def test_distributed_predict_never_reuses_a_killed_runs_staging_folder(model, data, tmp_path):
    """`predict --distributed` reuses a fixed staging folder: after a killed distributed run, the next run exits 0
    with 50 heatmaps for 3 scores."""
    images = _copy_images(data, tmp_path / "in", n=3)
    out = tmp_path / "out"
    stale = tmp_path / _old_stage_name(out)
    (stale / "heatmaps").mkdir(parents=True)
    for i in range(50):
        shutil.copy(images[0], stale / "heatmaps" / f"stale_{i:02d}.png")
    _age(stale)
    args = ["predict", str(model), str(tmp_path / "in"), "-o", str(out), "--distributed", "--no-progress"]
    assert main(args) == 0
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == sorted(f"{p.stem}.png" for p in images)
    assert not stale.exists()  # the killed run's leftovers are cleaned up


@pytest.mark.slow
def test_two_rank_predict_shares_one_fresh_staging_folder(model, data, tmp_path):
    """(The same under torchrun: rank 0 makes the run's own staging folder and rank 1 joins it; every heatmap of
    both shards, and nothing of a killed run's, ends in OUT.)"""
    import signal
    import subprocess

    from helpers import torchrun_command

    images = _copy_images(data, tmp_path / "in", n=4)
    out = tmp_path / "out"
    stale = tmp_path / ".crd-stage-killed"
    (stale / "heatmaps").mkdir(parents=True)
    shutil.copy(images[0], stale / "heatmaps" / "stale.png")
    _age(stale)
    cmd = [*torchrun_command(2), "-m", "crd_fast", "predict", str(model), str(tmp_path / "in"), "-o", str(out)]
    env = {**_env(), "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [*cmd, "--distributed", "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
        start_new_session=True, text=True,
    )  # fmt: skip
    try:
        log, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"torchrun job overran and was killed:\n{log[-4000:]}")
    assert proc.returncode == 0, log[-4000:]
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == sorted(f"{p.stem}.png" for p in images)
    with open(out / "scores.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_update_through_a_symlink_updates_the_target(model, data, tmp_path):
    """`fit --update -o link.crd` where the link points at the real model: the link is replaced by a regular file and
    the real model is never updated."""
    real = Path(shutil.copy(model, tmp_path / "real.crd"))
    link = tmp_path / "link.crd"
    link.symlink_to(real)
    base = CRDDetector.load(real).n_images
    assert main(["fit", str(data / "test" / "good"), "-o", str(link), "--update", "--no-progress"]) == 0
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert CRDDetector.load(real).n_images == base + 2


def test_center_accepts_only_bools():
    """`CRDScorer(center="no")` and `CRDDetector(center="no")` silently centre."""
    for bad in ("no", "false", 0, 1, None):
        with pytest.raises(ValueError, match="center must be True or False"):
            CRDScorer(center=bad)
        with pytest.raises(ValueError, match="center must be True or False"):
            CRDDetector(backbone="resnet18", weights="random", center=bad)
    scorer = CRDScorer(center=np.bool_(False))
    assert scorer.center is False
    with pytest.raises(ValueError, match="center must be True or False"):
        scorer.center = "yes"


@pytest.mark.parametrize("option", [["--lam-rel", "0.05"], ["--backbone", "resnet34"], ["--no-center"]])
def test_update_refuses_options_that_change_the_model(model, data, tmp_path, monkeypatch, capsys, option):
    """`fit --update` silently ignores `--lam-rel` and `--backbone`."""
    path = Path(shutil.copy(model, tmp_path / "m.crd"))
    before = path.read_bytes()
    monkeypatch.setattr(CRDDetector, "partial_fit", lambda *a, **k: pytest.fail("updated with a changed option"))
    assert main(["fit", str(data), "-o", str(path), "--update", "--no-progress", *option]) == 2
    err = _err(capsys)
    assert "--update" in err and option[0].lstrip("-").replace("no-", "").replace("-", "_") in err, err
    assert path.read_bytes() == before


def test_update_accepts_options_that_match_the_model(model, data, tmp_path):
    """... (options that repeat the model's own, e.g. from a shared config file, and run-time options, still apply)."""
    path = Path(shutil.copy(model, tmp_path / "m.crd"))
    base = CRDDetector.load(path).n_images
    config = tmp_path / "c.toml"
    config.write_text('backbone = "resnet18"\nresize = 64\nweights = "random"\n')
    args = ["fit", str(data / "test" / "good"), "-o", str(path), "--update", "--no-progress", "--batch-size", "1"]
    assert main([*args, "--config", str(config)]) == 0
    assert CRDDetector.load(path).n_images == base + 2


# ---- crashes and poor messages ------------------------------------------------------------------------------------
def test_threads_beyond_the_machine_are_refused(data, tmp_path, capsys):
    """`--threads 1000000`: MemoryError traceback, then a segfault (exit 139)."""
    assert main(["fit", str(data), "-o", str(tmp_path / "m.crd"), *O, "--threads", "1000000"]) == 2
    err = _err(capsys)
    assert "--threads" in err and "CPU threads of this machine" in err and "Traceback" not in err
    assert not (tmp_path / "m.crd").exists()


def test_config_file_that_is_not_utf8_is_named(data, tmp_path, capsys):
    """A config file that is not UTF-8: exit 1 with a UnicodeDecodeError traceback."""
    config = tmp_path / "bad.toml"
    config.write_bytes(b'backbone = "r\xffesnet18"\n')
    assert main(["fit", str(data), "-o", str(tmp_path / "m.crd"), "--config", str(config)]) == 2
    err = _err(capsys)
    assert "bad.toml" in err and "UTF-8" in err and len(err.strip().splitlines()) == 1


def test_image_name_that_is_not_utf8_is_refused_before_scoring(model, data, tmp_path, monkeypatch, capsys):
    """A file name that is not valid UTF-8 in an input folder: predict scores everything, then exits 2 naming no
    file ("surrogates not allowed")."""
    folder = tmp_path / "in"
    _copy_images(data, folder, n=2)
    odd = os.path.join(os.fsencode(folder), b"odd\xff.png")
    shutil.copy(sorted(folder.iterdir())[0], odd)
    _refuse_work(monkeypatch)
    assert main(["predict", str(model), str(folder), "-o", str(tmp_path / "out"), "--no-progress"]) == 2
    err = _err(capsys)
    assert "odd\\xff.png" in err and "UTF-8" in err
    assert not (tmp_path / "out").exists()


def test_read_only_output_folder_is_refused_before_predicting(model, data, tmp_path):
    """An existing empty read-only OUT (non-root): predict runs in full, then fails on `.crd-old-...`."""
    images = tmp_path / "in"
    _copy_images(data, images, n=2)
    out = tmp_path / "out"
    out.mkdir(mode=0o555)
    out.chmod(0o555)
    script = f"""
import sys
from crd_fast import CRDDetector
from crd_fast.cli.main import main
def refuse(*a, **k):
    print("PREDICT STARTED"); sys.exit(99)
CRDDetector.load = classmethod(refuse)
sys.exit(main(["predict", {str(model)!r}, {str(images)!r}, "-o", {str(out)!r}, "--no-progress"]))
"""
    try:
        run = run_unprivileged(script, tmp_path, _env())
    finally:
        out.chmod(0o755)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "PREDICT STARTED" not in run.stdout
    assert str(out) in run.stderr and "permission denied" in run.stderr and ".crd-" not in run.stderr
    assert list(out.iterdir()) == []


def test_leftovers_of_killed_runs_are_cleaned_and_never_read_as_inputs(model, data, tmp_path):
    """`.crd-stage-*` folders and `.crd-*.tmp` files left by killed runs are never cleaned up, and a later recursive
    predict over the parent scored 192 stale heatmaps."""
    from crd_fast.io.commit import hold, release

    parent = tmp_path / "parent"
    images = _copy_images(data, parent / "good", n=3)
    stale = parent / ".crd-stage-killed"
    (stale / "heatmaps").mkdir(parents=True)
    for i in range(20):
        shutil.copy(images[0], stale / "heatmaps" / f"{i}.png")
    (parent / ".crd-0123abcd.tmp").write_bytes(b"half a model")
    (parent / ".crd-old-killed").mkdir()
    shutil.copy(images[1], parent / ".crd-old-killed" / "old.png")
    live = parent / ".crd-stage-live"  # another run's, still at work: held, so left alone
    live.mkdir()
    for p in (stale, parent / ".crd-0123abcd.tmp", parent / ".crd-old-killed", live):
        _age(p)
    out = tmp_path / "out"
    held = hold(live)
    try:
        assert main(["predict", str(model), str(parent), "-r", "-o", str(out), "--no-progress"]) == 0
        with open(out / "scores.csv") as fh:
            assert sorted(Path(r["path"]).name for r in csv.DictReader(fh)) == sorted(p.name for p in images)
        assert main(["predict", str(model), str(parent / "good"), "-o", str(parent / "results"), "--no-progress"]) == 0
    finally:
        release(held)
    assert sorted(p.name for p in parent.iterdir()) == [".crd-stage-live", "good", "results"]


def test_overlap_messages_say_which_contains_which(model, data, tmp_path, capsys):
    """The overlap messages are swapped (`-o test/out` says "contains the input", `-o .` says "is inside")."""
    test = tmp_path / "test"
    _copy_images(data, test, n=2)
    assert main(["predict", str(model), str(test), "-o", str(test / "out"), "--no-progress"]) == 2
    err = _err(capsys)
    assert "lies inside the input folder" in err and "contains" not in err, err
    assert main(["predict", str(model), str(test), "-o", str(tmp_path), "--overwrite", "--no-progress"]) == 2
    err = _err(capsys)
    assert "contains the input folder" in err and "inside" not in err, err


def test_output_name_too_long_exits_2_naming_it(model, data, tmp_path, monkeypatch, capsys):
    """A 260-byte `-o` name exits 1 with "[Errno 36]" instead of 2."""
    long_name = str(tmp_path / ("o" * 260))
    _refuse_work(monkeypatch)
    for argv in (
        ["predict", str(model), str(data / "test" / "good"), "-o", long_name, "--no-progress"],
        ["fit", str(data), "-o", long_name, *O],
        ["export", str(model), "-o", long_name, "--no-verify"],
        ["eval", str(data.parent), "--report", long_name, *O],
    ):
        assert main(argv) == 2, argv
        err = _err(capsys)
        assert long_name in err and "longer than 255 bytes" in err and "Errno" not in err, err


def test_disk_full_names_the_path(data, tmp_path, monkeypatch, capsys):
    """... disk-full errors do not name the path."""
    from crd_fast.io.atomic import atomic_write

    with pytest.raises(OSError, match=r"cannot write '.*x\.bin': no space left on device") as info:
        with atomic_write(tmp_path / "x.bin") as tmp:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    assert info.value.errno == errno.ENOSPC
    assert [p.name for p in tmp_path.iterdir()] == []

    def full_disk(self, data):  # the model file's bytes hit a full disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    assert main(["fit", str(data), "-o", str(tmp_path / "m.crd"), *O, "--lam-rel", "0.01", "--spatial", "global"]) == 1
    err = _err(capsys)
    assert "m.crd" in err and "no space left on device" in err and ".tmp" not in err
    assert [p.name for p in tmp_path.iterdir()] == []


def test_device_meta_is_refused_as_bad_input(data, tmp_path, capsys):
    """`--device meta` exits 1."""
    assert main(["fit", str(data), "-o", str(tmp_path / "m.crd"), *O, "--device", "meta"]) == 2
    assert "--device" in _err(capsys)
    with pytest.raises(ValueError, match="device must be"):
        CRDDetector(backbone="resnet18", weights="random", device="meta")


def test_eval_report_is_checked_before_evaluating(data, tmp_path, monkeypatch, capsys):
    """`eval --report` checks its output only after the whole evaluation."""
    import crd_fast.evaluation.mvtec as mvtec

    monkeypatch.setattr(mvtec, "evaluate_mvtec", lambda *a, **k: pytest.fail("evaluated before checking --report"))
    (tmp_path / "file").write_text("a file, not a folder")
    for report in (tmp_path / "file" / "report", data / "report"):  # under a file; inside the data set
        assert main(["eval", str(data), "--report", str(report), *O]) == 2
        assert str(report) in _err(capsys)
    (tmp_path / "rep" / "report.html").mkdir(parents=True)
    assert main(["eval", str(data), "--report", str(tmp_path / "rep"), *O]) == 2
    assert "report.html" in _err(capsys)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_limit_above_pillows_own_is_honoured(tmp_path, monkeypatch):
    """Above 179 MP, `CRD_FAST_MAX_IMAGE_PIXELS` has no effect because Pillow's own limit applies first."""
    from PIL import Image, ImageFile

    from crd_fast.io.images import ImageReadError, load_image
    from crd_fast.io.limits import set_image_limits

    def header_only_png(path: Path, width: int, height: int) -> Path:
        def chunk(kind: bytes, body: bytes) -> bytes:
            return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

        ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
        return path

    class Decoding(Exception):
        pass

    def no_decoding(self):
        raise Decoding  # reached only when no limit refused the image

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    big = header_only_png(tmp_path / "big.png", 14000, 14000)  # 196 MP: beyond Pillow's 179 MP bomb limit
    before = set_image_limits(max_pixels=250_000_000)
    try:
        with pytest.raises(ImageReadError, match="Decoding"):
            load_image(big)  # our limit allows it, so Pillow's does not refuse it first
        set_image_limits(max_pixels=150_000_000)
        with pytest.raises(ImageReadError, match=r"196.0 megapixels exceeds the limit of 150"):
            load_image(big)
    finally:
        set_image_limits(max_pixels=before.max_pixels)


# ---- commit protocols: a kill at every step -------------------------------------------------------------------------
_STEPS = ("rename", "replace", "unlink", "rmdir", "mkdir")


def _killed_at(step: int, action) -> bool:
    """Run ``action()`` in a forked child whose ``step``-th file-system change (rename, replace, unlink, rmdir,
    mkdir) kills it on the spot: ``os._exit``, no finally blocks, no clean-up, as kill -9. True if it was killed;
    False if ``action`` finished with fewer changes."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 3
        try:
            count = [0]

            def deadly(real):
                def change(*args, **kwargs):
                    count[0] += 1
                    if count[0] == step:
                        os._exit(137)
                    return real(*args, **kwargs)

                return change

            for name in _STEPS:
                setattr(os, name, deadly(getattr(os, name)))
            action()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, 137), f"the child failed (exit {code}) instead of finishing or being killed"
    return code == 137


def _every_kill(action, check) -> int:
    """Kill ``action`` at its first, second, ... change until it finishes; ``check()`` after each kill (after the
    next run's recovery). Returns the number of steps."""
    from crd_fast.io import commit

    step = 1
    while _killed_at(step, action):
        commit.RUN_START = time.time() + 1  # the next run starts after the killed one
        check()
        step += 1
    check()
    return step


def _folder_state(folder: Path) -> dict[str, bytes]:
    return {k: v for k, v in _tree(folder).items() if not k.startswith(".crd-")} if folder.exists() else {}


def _results(tag: str, heatmaps: int) -> dict[str, bytes]:
    files = {"scores.csv": f"{tag} csv".encode(), "scores.json": f"{tag} json".encode()}
    files.update({f"heatmaps/{i}.png": f"{tag} {i}".encode() for i in range(heatmaps)})
    return files


def _stage_and_commit(out: Path, new: dict[str, bytes], overwrite: bool) -> None:
    from crd_fast.io.outputs import ResultFolder

    results = ResultFolder(out, ("scores.csv", "scores.json", "heatmaps"), overwrite=overwrite)
    for name, content in new.items():
        (results.stage / name).parent.mkdir(parents=True, exist_ok=True)
        (results.stage / name).write_bytes(content)
    results.commit()


@pytest.mark.parametrize(
    "old_heatmaps, new_heatmaps, existing",
    [(None, 2, False), (0, 2, True), (3, 2, True), (3, 0, True)],
    ids=["new-folder", "empty-folder", "overwrite", "overwrite-without-heatmaps"],
)
def test_result_folder_commit_survives_a_kill_at_every_step(tmp_path, monkeypatch, old_heatmaps, new_heatmaps,
                                                             existing):  # fmt: skip
    """kill -9 inside the `--overwrite` commit (between its renames): OUT keeps the old `scores.json` while
    `scores.csv` is hidden in `OUT/.crd-old-*`."""
    from crd_fast.io import commit

    monkeypatch.setattr(commit, "RUN_START", commit.RUN_START)
    out = tmp_path / "out"
    old = {} if old_heatmaps in (None, 0) else {**_results("old", old_heatmaps), "notes.txt": b"the user's"}
    new = _results("new", new_heatmaps)
    if new_heatmaps == 0:
        new = {k: v for k, v in new.items() if not k.startswith("heatmaps")}

    def reset() -> None:
        shutil.rmtree(tmp_path, ignore_errors=True)
        tmp_path.mkdir()
        if existing:
            out.mkdir()
            for name, content in old.items():
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                (out / name).write_bytes(content)

    def check() -> None:
        commit.tidy_folder(out)  # what the next run writing there (or reading an export) does first
        commit.tidy_folder(tmp_path)
        state = _folder_state(out)
        expected_new = {**new, **({"notes.txt": b"the user's"} if "notes.txt" in old else {})}
        assert state in (old, expected_new), sorted(state)
        leftovers = [str(p.relative_to(tmp_path)) for p in tmp_path.rglob(".crd-*")]
        assert leftovers == [], leftovers
        reset()

    reset()
    steps = _every_kill(lambda: _stage_and_commit(out, new, overwrite=bool(old)), check)
    assert steps > 3


def test_file_set_commit_survives_a_kill_at_every_step(tmp_path, monkeypatch):
    """(The same for a model and its sidecar, e.g. `model.onnx` + `model.onnx.json`, and for one file.)"""
    from crd_fast.io import commit
    from crd_fast.io.atomic import atomic_write, atomic_write_many

    monkeypatch.setattr(commit, "RUN_START", commit.RUN_START)
    targets = [tmp_path / "m.onnx", tmp_path / "m.onnx.json"]

    def reset() -> None:
        for p in tmp_path.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        for t in targets:
            t.write_bytes(b"old " + t.name.encode())

    def write_pair() -> None:
        with atomic_write_many(targets) as tmps:
            for tmp, t in zip(tmps, targets):
                tmp.write_bytes(b"new " + t.name.encode())

    def write_one() -> None:
        with atomic_write(targets[0]) as tmp:
            tmp.write_bytes(b"new " + targets[0].name.encode())

    for action, names in ((write_pair, targets), (write_one, targets[:1])):

        def check() -> None:
            commit.tidy_folder(tmp_path)
            got = [t.read_bytes().split()[0] for t in names]
            assert got in ([b"old"] * len(names), [b"new"] * len(names)), got
            assert sorted(p.name for p in tmp_path.iterdir()) == sorted(t.name for t in targets)
            reset()

        reset()
        assert _every_kill(action, check) >= 2


# ---- the layer on every writer -------------------------------------------------------------------------------------
def test_every_command_refuses_an_output_that_is_an_input(model, data, tmp_path, monkeypatch, capsys):
    """(Each check was written for one command: every command goes through the same layer.)"""
    import crd_fast.evaluation.mvtec as mvtec

    monkeypatch.setattr(mvtec, "evaluate_mvtec", lambda *a, **k: pytest.fail("evaluated before checking"))
    config = tmp_path / "c.toml"
    config.write_text("")
    weights = tmp_path / "demo" / "data" / "fabric" / "w.pth"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"weights")
    image = next((data / "test" / "good").iterdir())
    xml = Path(shutil.copy(model, tmp_path / "m.xml"))  # a model file under an OpenVINO name
    cases = {
        "fit": ["fit", str(data), "-o", str(image), *O],
        "predict": ["predict", str(model), str(data / "test" / "good"), "-o", str(data.parent), "--overwrite"],
        "export": ["export", str(model), "-o", str(model)],
        "export --int8": ["export", str(model), "-o", str(image), "--int8", str(data / "test")],
        "export --format openvino": ["export", str(xml), "-o", str(xml), "--format", "openvino"],
        "eval": ["eval", str(data), "--report", str(data), *O],
        "demo": ["demo", "--out", str(tmp_path / "demo"), "--weights", str(weights), "--quick"],
        "bench": ["bench", "--json", str(config), "--config", str(config)],
    }
    from crd_fast.cli.main import COMMANDS

    assert {c.split()[0] for c in cases} == {m.__name__.rsplit(".", 1)[1].replace("evaluate", "eval") for m in COMMANDS}
    for name, argv in cases.items():
        assert main([*argv, "--no-progress"]) == 2, name
        err = _err(capsys)
        assert "input" in err, (name, err)
    assert weights.read_bytes() == b"weights"


def test_every_public_writer_goes_through_the_output_check(model, data, tmp_path):
    """(A command cannot write without going through it: nor can the library's writers.) Each is given a FIFO where
    its output goes: it must be refused by the output check (which records every declaration) before any work."""
    import torch

    from crd_fast import NNScorer
    from crd_fast.deploy import export_onnx, make_head_file
    from crd_fast.deploy.export import write_export
    from crd_fast.deploy.openvino import export_openvino
    from crd_fast.deploy.quantize import export_onnx_int8
    from crd_fast.distributed import fit_distributed, predict_sharded, write_records
    from crd_fast.io.safety import CHECKED
    from crd_fast.report import CategoryResult, write_report
    from crd_fast.scorers.local import LocalCRDScorer

    rng = np.random.default_rng(0)
    det = CRDDetector.load(model)
    scorer = CRDScorer().fit(random_bank(rng, 30, 4))
    grids = torch.randn(6, 4, 5, dtype=torch.float64)
    result = CategoryResult("c", np.array([0, 1]), np.array([0.1, 0.9]))
    fifo = tmp_path / "fifo"
    writers = {
        "CRDScorer.save": (lambda: scorer.save(fifo / "s.crd"), "s.crd"),
        "NNScorer.save": (lambda: NNScorer().fit(random_bank(rng, 30, 4)).save(fifo / "n.crd"), "n.crd"),
        "LocalCRDScorer.save": (lambda: LocalCRDScorer(rank=2, sketch=8).fit(grids).save(fifo / "l.crd"), "l.crd"),
        "CRDDetector.save": (lambda: det.save(fifo / "d.crd"), "d.crd"),
        "make_head_file": (lambda: make_head_file(det, fifo / "h.crdh"), "h.crdh"),
        "export_onnx": (lambda: export_onnx(det, fifo / "e.onnx", verify=False), "e.onnx"),
        "write_export": (lambda: write_export(b"graph", {}, fifo / "w.onnx"), "w.onnx"),
        "export_onnx_int8": (lambda: export_onnx_int8(det, fifo / "q.onnx", data / "train" / "good"), "q.onnx"),
        "export_openvino": (lambda: export_openvino(det, fifo / "v.xml"), "v.bin"),
        "write_report": (lambda: write_report(fifo, [result]), "report.html"),
        "write_records": (lambda: write_records([{"index": 0, "image_score": 1.0}], fifo / "r.csv"), "r.csv"),
        "predict_sharded": (
            lambda: predict_sharded(scorer, [random_bank(rng, 3, 4)], output=fifo / "p.json"),
            "p.json",
        ),
        "fit_distributed": (
            lambda: fit_distributed(CRDScorer(), [random_bank(rng, 10, 4)], save_path=fifo / "f.crd"),
            "f.crd",
        ),
        "generate_dataset": (
            lambda: generate_dataset(fifo, categories=("fabric",), n_train=1, n_test_good=1, n_test_defect=1, size=64),
            "fabric",
        ),
    }
    for name, (write, taken) in writers.items():
        fifo.mkdir()
        os.mkfifo(fifo / taken)
        CHECKED.clear()
        with pytest.raises(ValueError, match="FIFO|not a folder") as info:
            write()
        assert taken in str(info.value), (name, info.value)
        declared = [p for plan in CHECKED for p in plan]
        assert any(p.endswith(taken) for p in declared), (name, declared)  # refused by the declaration's check
        assert sorted(p.name for p in fifo.iterdir()) == [taken], name  # and nothing else was written
        assert stat.S_ISFIFO(os.lstat(fifo / taken).st_mode)
        shutil.rmtree(fifo)


def test_model_is_validated_before_it_is_written(model, tmp_path):
    """(Validate before writing: a model is written only after the same validation `load` applies has passed on
    the in-memory model.)"""
    path = Path(shutil.copy(model, tmp_path / "m.crd"))
    before = path.read_bytes()
    det = CRDDetector.load(path)
    det.threshold = float("nan")  # past set_threshold's check, as a bug would
    with pytest.raises(ModelFileError, match="not written.*threshold=nan"):
        det.save(path)
    assert path.read_bytes() == before
    scorer = CRDScorer().fit(random_bank(np.random.default_rng(1), 40, 5))
    scorer.projection.matrix.zero_()  # a corrupt in-memory model: load would refuse it, so save does
    with pytest.raises(ModelFileError, match="not written.*projection"):
        scorer.save(tmp_path / "s.crd")
    assert not (tmp_path / "s.crd").exists()


# ---- found beyond the listed cases: the same kinds of misuse on the other commands and options ---------------------
def test_model_or_config_that_is_a_fifo_is_refused_instead_of_waiting(tmp_path):
    """(A FIFO given as the model or the config file made `predict` wait forever for a writer.)"""
    import subprocess
    import sys

    fifo = tmp_path / "m.crd"
    os.mkfifo(fifo)
    config = tmp_path / "c.toml"
    os.mkfifo(config)
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    for argv in (
        ["predict", str(fifo), str(image), "-o", str(tmp_path / "out")],
        ["fit", str(tmp_path), "-o", str(tmp_path / "n.crd"), "--config", str(config)],
    ):
        try:
            run = subprocess.run(
                [sys.executable, "-m", "crd_fast", *argv], env=_env(), capture_output=True, text=True, timeout=120
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"crd-fast {argv[0]} waits on a FIFO instead of refusing it")
        assert run.returncode == 2 and "not a regular file" in run.stderr, run.stderr
    with pytest.raises(ModelFileError, match="not a regular file"):
        CRDDetector.load(fifo)


def test_read_only_output_file_is_not_replaced(model, data, tmp_path, monkeypatch, capsys):
    """(`fit -o m.crd` replaced a read-only `m.crd`: rename ignores the file's own mode, and root ignores all.)"""
    path = Path(shutil.copy(model, tmp_path / "m.crd"))
    path.chmod(0o444)
    before = path.read_bytes()
    _refuse_work(monkeypatch)
    assert main(["fit", str(data), "-o", str(path), *O]) == 2
    err = _err(capsys)
    assert str(path) in err and "read-only" in err
    assert path.read_bytes() == before


def test_symlink_loop_and_empty_outputs_are_bad_input(data, tmp_path, monkeypatch, capsys):
    """(`fit -o loop` with a link to itself exited 1 with an OSError; `-o ''` said nothing useful.)"""
    loop = tmp_path / "loop.crd"
    loop.symlink_to(loop)
    _refuse_work(monkeypatch)
    assert main(["fit", str(data), "-o", str(loop), *O]) == 2
    assert "loop.crd" in _err(capsys)
    assert main(["fit", str(data), "-o", "", *O]) == 2
    assert "empty" in _err(capsys)


def test_eval_refuses_a_file_name_that_is_not_utf8_before_evaluating(data, tmp_path, monkeypatch, capsys):
    """(`eval` with such a name in the data set ran the whole evaluation, then failed writing the HTML report.)"""
    import crd_fast.evaluation.mvtec as mvtec

    root = tmp_path / "set"
    shutil.copytree(data, root / "fabric")
    good = os.fsencode(root / "fabric" / "test" / "good")
    shutil.copy(os.path.join(good, os.listdir(good)[0]), os.path.join(good, b"odd\xfe.png"))
    monkeypatch.setattr(mvtec, "evaluate_mvtec", lambda *a, **k: pytest.fail("evaluated before checking names"))
    assert main(["eval", str(root), "--report", str(tmp_path / "rep"), *O]) == 2
    err = _err(capsys)
    assert "odd\\xfe.png" in err and "UTF-8" in err


def test_a_planted_journal_is_never_acted_on(tmp_path):
    """(Recovery rolls journals forward: one planted in a shared folder must not make a run move or delete anything
    but staged entries, nor act at all when another user wrote it.)"""
    from crd_fast.io.commit import JOURNAL_FORMAT, tidy_folder

    shared = tmp_path / "shared"
    shared.mkdir()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("mine")
    (shared / "results.csv").write_text("mine too")
    (shared / ".crd-stage-x").mkdir()
    (shared / ".crd-stage-x" / "results.csv").write_text("planted")
    aside = str(shared / ".crd-old-x")
    planted = {
        "outside": {"moves": [[None, str(victim / "precious.txt")]], "cleanup": []},
        "cleanup outside": {"moves": [], "cleanup": [str(victim)]},
        "aside outside": {"moves": [[None, str(shared / "results.csv")]], "cleanup": [], "aside": str(victim)},
        "another user's": {"moves": [[str(shared / ".crd-stage-x" / "results.csv"), str(shared / "results.csv")]]},
    }
    for i, (name, doc) in enumerate(planted.items()):
        journal = shared / f".crd-journal-{i}.json"
        journal.write_text(json.dumps({"format": JOURNAL_FORMAT, "version": 1, "aside": aside, **doc}))
        if name == "another user's":
            if os.geteuid() != 0:
                journal.unlink()  # only root can give a file to another user here
                continue
            os.chown(journal, 12345, 12345)
    tidy_folder(shared)
    assert (victim / "precious.txt").read_text() == "mine"
    assert (shared / "results.csv").read_text() == "mine too"
