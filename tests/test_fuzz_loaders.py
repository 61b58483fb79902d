"""Fuzzing the loaders: thousands of mutated model files, metadata documents, ONNX metadata and image files.

Each mutated input must either load and score exactly as the original does, or be refused with the project's
own error type (ModelFileError, DeployError, ImageReadError / ImageInputError): never a crash, a hang or
another exception type. Hypothesis runs derandomised (the same examples in every run, so CI is
reproducible) with fixed example counts that keep the whole module well under a minute.

Model files and ONNX metadata written now carry a digest of their header (docs/DESIGN.md "Model file format",
"ONNX export"): on them every edit is refused or scores identically (``test_fuzz_signed_*``, the ONNX metadata). The
field checks behind the digest are fuzzed on files of the older digest kind (no header digest, as files written
before it), where edits that a file cannot tell from a deliberate change (a threshold, the blur of the maps, a
run-time option) are listed in ``FREE_EDITS``: such a file may load and score differently.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import random_bank
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from crd_fast import CRDDetector, CRDScorer, ModelFileError
from crd_fast.io.images import ImageReadError, load_image

# No shrinking: a failure is reported with the example as generated, and the run stays within its time budget.
FUZZ = dict(
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
    phases=(Phase.explicit, Phase.generate),
    print_blob=False,
)
CROP = 16

#: Metadata paths whose edits a model file cannot detect (they are choices, not data): scores may change.
FREE_EDITS = {"config.blur_sigma", "config.batch_size", "config.device", "config.resize"}


class TinyNet(nn.Module):
    """A two-layer backbone: loading a detector then costs milliseconds, so thousands of loads fit in CI."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.a = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.b = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f1 = torch.relu(self.a(x))
        return [f1, torch.relu(self.b(f1))]


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from([0, 1, 2, -1, 1e30, 1e6, 1000000, 0.5, "cuda", "cpu", "imagenet"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)


def _paths(doc, prefix=()):
    """Every key path (a tuple of keys) in a JSON document, for choosing what to mutate."""
    out = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.append(prefix + (k,))
            out += _paths(v, prefix + (k,))
    return out


def _set(doc, path, value):
    for k in path[:-1]:
        doc = doc[k]
    if value is _DELETE:
        del doc[path[-1]]
    else:
        doc[path[-1]] = value


def _mutate(meta: dict, data, times: int) -> list[str]:
    """Replace or delete ``times`` fields (chosen afresh after each edit) of ``meta``; the dotted paths edited."""
    edited = []
    for _ in range(times):
        path = data.draw(st.sampled_from(_paths(meta)))
        _set(meta, path, data.draw(st.just(_DELETE) | json_values))
        edited.append(".".join(map(str, path)))
    return edited


_DELETE = object()


def _write_with_meta(src: Path, dst: Path, meta: dict, signed: bool = False) -> None:
    """``src``'s tensors with metadata ``meta`` (its tensor checksum kept as is). ``signed=False``: a file of the older
    digest kind (no header digest, as written before it), so the field checks behind the digest are what is fuzzed;
    ``signed=True``: the header digest stored in ``src`` is kept, as an editor that changes only the JSON leaves it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from crd_fast.io.model_file import DIGEST_KEY, METADATA_KEY

    with safe_open(str(src), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        raw = fh.metadata()
    if signed:
        text = json.dumps(meta, sort_keys=True, allow_nan=True)  # as written: an edit that changes nothing is no edit
        save_file(tensors, str(dst), metadata={METADATA_KEY: text, DIGEST_KEY: raw[DIGEST_KEY]})
        return
    meta = {k: v for k, v in meta.items() if k != "digest"}
    save_file(tensors, str(dst), metadata={METADATA_KEY: json.dumps(meta, allow_nan=True)})


def _meta(path: Path) -> dict:
    from safetensors import safe_open

    from crd_fast.io.model_file import METADATA_KEY

    with safe_open(str(path), framework="pt") as fh:
        return json.loads(fh.metadata()[METADATA_KEY])


# ---- scorer files ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scorer_file(tmp_path_factory):
    rng = np.random.default_rng(7)
    scorer = CRDScorer(lam_rel=0.05).fit(random_bank(rng, 40, 6))
    path = tmp_path_factory.mktemp("fuzz") / "scorer.crd"
    scorer.save(path)
    probe = random_bank(rng, 9, 6)
    return path, probe, scorer.score(probe)


def _check_scorer(path: Path, probe, want) -> None:
    try:
        loaded = CRDScorer.load(path)
    except ModelFileError:
        return
    np.testing.assert_array_equal(loaded.score(probe), want)


mutations = st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), min_size=1, max_size=6)


@settings(max_examples=1500, **FUZZ)
@given(edits=mutations, cut=st.none() | st.integers(0, 10**9), data=st.data())
def test_fuzz_scorer_file_bytes(scorer_file, tmp_path_factory, edits, cut, data):
    path, probe, want = scorer_file
    raw = bytearray(path.read_bytes())
    header = struct.unpack("<Q", raw[:8])[0] + 8
    near_header = data.draw(st.booleans())  # half the edits hit the JSON header, where parsing is tested
    for pos, value in edits:
        raw[pos % (header if near_header else len(raw))] = value
    if cut is not None:
        raw = raw[: cut % (len(raw) + 1)]
    out = tmp_path_factory.getbasetemp() / "fuzz_scorer_bytes.crd"
    out.write_bytes(bytes(raw))
    _check_scorer(out, probe, want)


@settings(max_examples=1000, **FUZZ)
@given(data=st.data())
def test_fuzz_scorer_metadata(scorer_file, tmp_path_factory, data):
    path, probe, want = scorer_file
    meta = _meta(path)
    _mutate(meta, data, data.draw(st.integers(1, 3)))
    out = tmp_path_factory.getbasetemp() / "fuzz_scorer_meta.crd"
    _write_with_meta(path, out, meta)
    _check_scorer(out, probe, want)


@settings(max_examples=500, **FUZZ)
@given(data=st.data())
def test_fuzz_signed_scorer_header(scorer_file, tmp_path_factory, data):
    """Header-JSON edits of a signed file: every one is refused, or changes nothing (then it scores identically)."""
    path, probe, want = scorer_file
    meta = _meta(path)
    _mutate(meta, data, data.draw(st.integers(1, 3)))
    out = tmp_path_factory.getbasetemp() / "fuzz_scorer_signed.crd"
    _write_with_meta(path, out, meta, signed=True)
    _check_scorer(out, probe, want)


# ---- detector files ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def detector_file(tmp_path_factory):
    rng = np.random.default_rng(8)
    train = torch.from_numpy(rng.random((6, 3, CROP, CROP))).float()
    det = CRDDetector(backbone=TinyNet(), resize=CROP, crop=CROP, batch_size=3, blur_sigma=1.0)
    det.fit(train, progress=False)
    det.set_threshold(1.0)
    path = tmp_path_factory.mktemp("fuzz") / "detector.crd"
    det.save(path)
    probe = torch.from_numpy(rng.random((2, 3, CROP, CROP))).float()
    return path, probe, det.predict(probe, progress=False).image_scores


@settings(max_examples=400, **FUZZ)
@given(data=st.data())
def test_fuzz_detector_metadata(detector_file, tmp_path_factory, data):
    path, probe, want = detector_file
    meta = _meta(path)
    edited = _mutate(meta, data, data.draw(st.integers(1, 2)))
    out = tmp_path_factory.getbasetemp() / "fuzz_detector_meta.crd"
    _write_with_meta(path, out, meta)
    try:
        det = CRDDetector.load(out, backbone=TinyNet())
    except ModelFileError:
        return
    got = det.predict(probe, progress=False).image_scores
    if not any(k in FREE_EDITS for k in edited):
        np.testing.assert_array_equal(got, want)
    assert np.isfinite(got).all()


@settings(max_examples=300, **FUZZ)
@given(data=st.data())
def test_fuzz_signed_detector_header(detector_file, tmp_path_factory, data):
    """Header-JSON edits of a signed detector file (config.backbone, seed, resize, threshold, blur, ...): every one is
    refused, or changes nothing; no edit is free any more."""
    path, probe, want = detector_file
    meta = _meta(path)
    _mutate(meta, data, data.draw(st.integers(1, 3)))
    out = tmp_path_factory.getbasetemp() / "fuzz_detector_signed.crd"
    _write_with_meta(path, out, meta, signed=True)
    try:
        det = CRDDetector.load(out, backbone=TinyNet())
    except ModelFileError:
        return
    np.testing.assert_array_equal(det.predict(probe, progress=False).image_scores, want)
    assert det.threshold == 1.0


# ---- ONNX metadata ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_export(detector_file, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from crd_fast.deploy import OnnxDetector, export_onnx

    path, probe, _ = detector_file
    det = CRDDetector.load(path, backbone=TinyNet())
    folder = tmp_path_factory.mktemp("fuzz_onnx")
    result = export_onnx(det, folder / "m.onnx")
    images = [np.asarray(p.permute(1, 2, 0).numpy(), dtype=np.float32) for p in probe]
    return result.onnx_path, images, OnnxDetector(result.onnx_path).predict(images).image_scores


@settings(max_examples=400, **FUZZ)
@given(data=st.data())
def test_fuzz_onnx_metadata(onnx_export, tmp_path_factory, data, monkeypatch_session):
    from crd_fast.deploy import DeployError, OnnxDetector
    from crd_fast.deploy.imaging import ImageInputError

    onnx_path, images, want = onnx_export
    original = json.loads(Path(str(onnx_path) + ".json").read_text())
    meta = json.loads(json.dumps(original))
    _mutate(meta, data, data.draw(st.integers(1, 2)))
    out = tmp_path_factory.getbasetemp() / "fuzz_meta.onnx.json"
    out.write_text(json.dumps(meta, allow_nan=True))
    try:
        det = OnnxDetector(onnx_path, metadata_path=out)
        got = det.predict(images).image_scores
    except (DeployError, ImageInputError):
        return
    # the metadata is covered by its digest (stamped into the graph too): only an edit that changes nothing loads
    assert det.metadata == original
    np.testing.assert_array_equal(got, want)


@pytest.fixture(scope="module")
def monkeypatch_session():
    """onnxruntime sessions are cached by model bytes: the fuzzed part is the metadata, and building a session
    for each of hundreds of examples would take most of the minute."""
    import onnxruntime as ort

    real = ort.InferenceSession
    cache: dict = {}

    def cached(data, *args, **kwargs):
        key = bytes(data) if isinstance(data, (bytes, bytearray)) else data
        if key not in cache:
            cache[key] = real(data, *args, **kwargs)
        return cache[key]

    mp = pytest.MonkeyPatch()
    mp.setattr(ort, "InferenceSession", cached)
    yield
    mp.undo()


# ---- image files --------------------------------------------------------------------------------------------------
def _encoded_images() -> list[bytes]:
    rng = np.random.default_rng(9)
    pic = (rng.random((12, 10, 3)) * 255).astype(np.uint8)
    out = []
    for fmt, mode in (
        ("PNG", "RGB"),
        ("PNG", "P"),
        ("PNG", "I;16"),
        ("JPEG", "RGB"),
        ("BMP", "RGB"),
        ("TIFF", "RGB"),
        ("WEBP", "RGB"),
        ("PPM", "RGB"),
        ("GIF", "P"),
    ):
        img = Image.fromarray(pic)
        img = img.convert("L").convert("I;16") if mode == "I;16" else img.convert(mode)
        buf = io.BytesIO()
        exif = Image.Exif()
        exif[0x0112] = 6
        img.save(buf, format=fmt, **({"exif": exif.tobytes()} if fmt in ("PNG", "JPEG", "WEBP") else {}))
        out.append(buf.getvalue())
    return out


ENCODED = _encoded_images()


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about damaged tags it skips, and about bombs
@settings(max_examples=2000, **FUZZ)
@given(
    which=st.integers(0, len(ENCODED) - 1), edits=mutations, cut=st.none() | st.integers(0, 10**6), head=st.booleans()
)
def test_fuzz_image_loaders(tmp_path_factory, which, edits, cut, head):
    from crd_fast.deploy.imaging import ImageInputError
    from crd_fast.deploy.imaging import load_image as onnx_load_image

    raw = bytearray(ENCODED[which])
    for pos, value in edits:
        raw[pos % (min(64, len(raw)) if head else len(raw))] = value  # headers hold sizes: fuzz them often
    if cut is not None:
        raw = raw[: cut % (len(raw) + 1)]
    path = tmp_path_factory.getbasetemp() / "fuzz_image.img"
    path.write_bytes(bytes(raw))
    try:
        img = load_image(path)
    except ImageReadError as exc:
        assert "fuzz_image.img" in str(exc)
        with pytest.raises(ImageInputError, match="fuzz_image.img"):
            onnx_load_image(path)
        return
    assert img.mode == "RGB" and img.size[0] * img.size[1] > 0
    np.testing.assert_array_equal(np.asarray(onnx_load_image(path)), np.asarray(img))


# ---- local head files --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_head_file(tmp_path_factory):
    from crd_fast.models.local_head_file import LocalDeployHead
    from crd_fast.scorers.local import LocalCRDScorer

    gen = torch.Generator().manual_seed(9)
    grids = torch.randn(1, 4, 5, generator=gen, dtype=torch.float64) + torch.randn(12, 4, 5, generator=gen).double()
    scorer = LocalCRDScorer(lam_rel=0.05, rank=2, sketch=16).fit(grids)
    head = LocalDeployHead.from_scorer(scorer, "fp16", detector={"d": 5, "patch_grid": [2, 2], "threshold": 1.0})
    path = tmp_path_factory.mktemp("fuzz") / "local.crdh"
    head.save(path)
    probe = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    return path, probe, head.score(probe)


@settings(max_examples=800, **FUZZ)
@given(data=st.data())
def test_fuzz_local_head_metadata(local_head_file, tmp_path_factory, data):
    from crd_fast.models.local_head_file import LocalDeployHead

    path, probe, want = local_head_file
    meta = _meta(path)
    _mutate(meta, data, data.draw(st.integers(1, 3)))
    out = tmp_path_factory.getbasetemp() / "fuzz_local_head_meta.crdh"
    _write_with_meta(path, out, meta)
    try:
        loaded = LocalDeployHead.load(out)
    except ModelFileError:
        return
    # the stored tensors decide the scores; fields (lam_rel, grid, detector, ...) only describe them
    assert torch.equal(loaded.score(probe), want)
