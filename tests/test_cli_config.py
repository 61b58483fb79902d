"""``--config FILE`` (TOML / YAML) for command-line options, and the library's logging."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from crd_fast.cli.config import expand_config, load_config
from crd_fast.cli.main import build_parser, main
from crd_fast.cli.options import CLIError

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cfg") / "good"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(90, 160, (48, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def expand(argv, text, tmp_path, name="c.toml"):
    path = tmp_path / name
    path.write_text(text)
    return expand_config([*argv, "--config", str(path)], build_parser())[0]


def test_config_becomes_options_that_typed_ones_override(tmp_path):
    text = (
        'backbone = "resnet18"\nthreads = 2\n[fit]\nlayers = ["layer2"]\ncenter = false\nupdate = true\nresize = 40\n'
    )
    argv = expand(["fit", "good/", "-o", "m.crd", "--resize", "48"], text, tmp_path)
    args = build_parser().parse_args(argv)
    assert args.backbone == "resnet18" and args.threads == 2 and args.layers == ("layer2",)
    assert args.center is False and args.update is True
    assert args.resize == 48  # typed on the command line: wins over the file's 40
    assert argv[:2] == ["fit", "--backbone"]  # the file's options come right after the command


@pytest.mark.parametrize(
    "text, match",
    [
        ("bogus = 1\n", "'fit' has no option 'bogus'"),
        ("[fitt]\nresize = 3\n", r"table \[fitt\] is not a command"),
        ("update = 3\n", "'update' is a flag"),
        ("data = 'x'\n", "positional argument"),
        ("resize = \n", "not valid TOML"),
    ],
)
def test_bad_config_files(tmp_path, text, match):
    with pytest.raises(CLIError, match=match):
        expand(["fit", "good/", "-o", "m.crd"], text, tmp_path)


def test_config_values_are_checked_like_typed_ones(tmp_path, capsys):
    (tmp_path / "c.toml").write_text("resize = -3\n")
    assert main(["fit", "x", "-o", "m.crd", "--config", str(tmp_path / "c.toml")]) == 2
    assert "--resize" in capsys.readouterr().err


def test_config_file_errors_through_main(tmp_path, capsys):
    assert main(["fit", "x", "-o", "m.crd", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "crd-fast: error: config file" in capsys.readouterr().err
    (tmp_path / "c.ini").write_text("")
    assert main(["fit", "x", "-o", "m.crd", "--config", str(tmp_path / "c.ini")]) == 2
    assert "unknown format" in capsys.readouterr().err


def test_yaml_config(tmp_path):
    pytest.importorskip("yaml", reason="YAML config files need PyYAML, an optional dependency")
    argv = expand(["fit", "good/", "-o", "m.crd"], "backbone: resnet18\nfit:\n  batch-size: 3\n", tmp_path, "c.yaml")
    args = build_parser().parse_args(argv)
    assert args.backbone == "resnet18" and args.batch_size == 3
    assert load_config(str(tmp_path / "c.yaml")) == {"backbone": "resnet18", "fit": {"batch-size": 3}}


def test_fit_with_config_file_and_library_logging(good, tmp_path, capsys):
    cfg = tmp_path / "crd.toml"
    cfg.write_text(
        'backbone = "resnet18"\nweights = "random"\nresize = 48\ncrop = 48\nno-progress = true\n'
        '[fit]\nlayers = ["layer2"]\n'
    )
    model = tmp_path / "m.crd"
    assert main(["fit", str(good), "-o", str(model), "--config", str(cfg), "--log-level", "info"]) == 0
    err = capsys.readouterr().err
    assert "crd-fast: INFO: crd_fast.detector.detector: added 4 images to the fit" in err
    assert "saved model to" in err
    from crd_fast.io.model_file import read_model_file

    _, meta = read_model_file(model, "crd_detector")
    assert meta["config"]["layers"] == ["layer2"] and meta["crop"] == 48
    # without --log-level only warnings and errors are shown
    assert main(["fit", str(good), "-o", str(model), "--config", str(cfg)]) == 0
    assert "INFO" not in capsys.readouterr().err


def test_library_logs_and_never_prints(good, caplog, capsys):
    from crd_fast import CRDDetector

    with caplog.at_level(logging.INFO, logger="crd_fast"):
        det = CRDDetector(backbone="resnet18", weights="random", resize=48, crop=48).fit(str(good), progress=False)
        det.calibrate_pixels(str(good), progress=False)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("crd_fast")]
    assert any("added 4 images" in m for m in messages)
    assert any(m.startswith("pixel threshold") for m in messages)
    out = capsys.readouterr()
    assert out.out == "" and json.dumps(out.err) == '""'
