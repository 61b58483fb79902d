"""Compute precision (crd_fast.core.precision): the "auto" choice, and every precision against float64.

Tolerances are ``crd_fast.core.precision.TOLERANCE``: bf16 keeps 8 significant bits, so its features are
~1% off the float64 reference and its scores a little more; these tests hold every precision to its bound
on fresh random inputs, and check that leaving the context restores float32 exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crd_fast.core import precision as prec
from crd_fast.features.backbone import FeatureExtractor
from crd_fast.ops import cpu, reference
from crd_fast.ops.plan import folded_operands


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---- the choice ------------------------------------------------------------------------------------
def test_auto_falls_back_to_fp32_without_native_bf16(monkeypatch):
    monkeypatch.setattr(prec, "native_bf16", lambda device: (False, "forced off by the test"))
    choice = prec.resolve_precision("auto", "cpu")
    assert choice.precision == "fp32" and choice.autocast_dtype is None and choice.head_gemm_dtype is None
    assert "forced off by the test" in choice.reason and "fp32 (auto)" in choice.describe()
    assert choice.channels_last  # auto's fp32 takes the faster layout; only an explicit fp32 stays contiguous
    assert not prec.resolve_precision("fp32", "cpu").channels_last  # scores identical to earlier versions


def test_auto_takes_bf16_with_native_bf16_that_pays(monkeypatch):
    monkeypatch.setattr(prec, "native_bf16", lambda device: (True, "forced on by the test"))
    monkeypatch.setattr(prec, "cpu_bf16_speedup", lambda: 2.0)
    choice = prec.resolve_precision("auto", torch.device("cpu"))
    assert (choice.precision, choice.autocast_dtype, choice.head_gemm_dtype) == ("bf16", torch.bfloat16, torch.bfloat16)
    assert choice.reason.startswith("forced on by the test") and "2.00x" in choice.reason


@pytest.mark.parametrize("speedup", [0.79, 1.1])
def test_auto_keeps_fp32_where_native_bf16_is_not_faster(monkeypatch, speedup):
    # e.g. Intel cores with AVX512_BF16 but no AMX: one bf16 dot product per cycle against two float32 FMAs
    monkeypatch.setattr(prec, "native_bf16", lambda device: (True, "forced on by the test"))
    monkeypatch.setattr(prec, "cpu_bf16_speedup", lambda: speedup)
    choice = prec.resolve_precision("auto", "cpu")
    assert choice.precision == "fp32" and choice.autocast_dtype is None and choice.channels_last
    assert f"{speedup:.2f}x" in choice.reason and "needs 1.15x" in choice.reason
    # an explicit request is still honoured
    assert prec.resolve_precision("bf16", "cpu").precision == "bf16"


def test_auto_does_not_time_without_native_bf16(monkeypatch):
    def no_probe():
        raise AssertionError("the bf16 probe ran although the processor has no native bf16")

    monkeypatch.setattr(prec, "native_bf16", lambda device: (False, "forced off by the test"))
    monkeypatch.setattr(prec, "cpu_bf16_speedup", no_probe)
    assert prec.resolve_precision("auto", "cpu").precision == "fp32"


def test_the_bf16_probe_measures_and_leaves_the_random_stream_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    speedup = prec.cpu_bf16_speedup.__wrapped__(batch=1, rounds=1)  # uncached: a fresh measurement
    assert np.isfinite(speedup) and speedup > 0
    assert torch.equal(torch.rand(3), expected)


def test_cpu_detection_reads_the_flags(monkeypatch):
    monkeypatch.setattr(prec, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    native, why = prec.cpu_native_bf16()
    assert not native and "no avx512_bf16/amx_bf16" in why
    monkeypatch.setattr(prec, "cpu_flags", lambda: frozenset({"avx512f", "amx_bf16"}))
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert prec.cpu_native_bf16()[0]


def test_explicit_bf16_is_honoured_and_says_when_emulated(monkeypatch):
    monkeypatch.setattr(prec, "native_bf16", lambda device: (False, "no flag"))
    choice = prec.resolve_precision("bf16", "cpu")
    assert choice.precision == "bf16" and "emulated" in choice.reason
    assert prec.resolve_precision("fp32", "cpu").reason == "requested"


@pytest.mark.parametrize("bad", ["float32", "BF16", "", None, 16])
def test_bad_precision_names(bad):
    with pytest.raises(ValueError, match="precision must be one of"):
        prec.resolve_precision(bad, "cpu")


def test_other_devices_take_fp32_on_auto_and_refuse_reduced():
    assert prec.resolve_precision("auto", "meta").precision == "fp32"
    with pytest.raises(ValueError, match="not meta"):
        prec.resolve_precision("bf16", "meta")


def test_head_gemm_context_nests_and_restores():
    assert prec.current_head_gemm_dtype() is None
    with prec.head_gemm_dtype(torch.bfloat16):
        assert prec.current_head_gemm_dtype() is torch.bfloat16
        with prec.head_gemm_dtype(None):
            assert prec.current_head_gemm_dtype() is None
        assert prec.current_head_gemm_dtype() is torch.bfloat16
    assert prec.current_head_gemm_dtype() is None
    with pytest.raises(ValueError, match="head GEMM dtype"):
        with prec.head_gemm_dtype(torch.float64):
            pass


# ---- against float64 --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def extractors():
    ref = FeatureExtractor("resnet18", ("layer2", "layer3"), "random", 3).double()
    return ref, torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(11))


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])
def test_backbone_precision_against_float64(extractors, name):
    ref, x = extractors
    with torch.inference_mode():
        want = ref(x.double())
    fe = FeatureExtractor("resnet18", ("layer2", "layer3"), "random", 3)
    fe.set_precision(prec.resolve_precision(name, "cpu"))
    with torch.inference_mode():
        got = fe(x)
    bound = prec.TOLERANCE[name]["features"]
    for g, w in zip(got, want):
        layout = torch.contiguous_format if name == "fp32" else torch.channels_last
        assert g.dtype == torch.float32 and g.is_contiguous(memory_format=layout)
        assert _rel(g, w) < bound
    if name != "fp32":  # reduced precision really ran: the error is far above float32 rounding
        assert max(_rel(g, w) for g, w in zip(got, want)) > 1e-4


def test_backbone_without_precision_is_unchanged(extractors):
    _, x = extractors
    plain = FeatureExtractor("resnet18", ("layer2",), "random", 3)
    fp32 = FeatureExtractor("resnet18", ("layer2",), "random", 3).set_precision(prec.resolve_precision("fp32"))
    with torch.inference_mode():
        torch.testing.assert_close(fp32(x)[0], plain(x)[0], rtol=1e-4, atol=1e-5)


def _head_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    maps = [torch.randn(2, 48, 12, 12, generator=g), torch.randn(2, 80, 6, 6, generator=g)]
    d = 128
    a = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    matrix = a @ a.T / 2 + torch.eye(d, dtype=torch.float64) * 0.1
    offset = torch.randn(d, generator=g, dtype=torch.float64) * 0.1
    return maps, matrix, offset


@pytest.mark.skipif(not cpu.available(), reason="the fused CPU pass is not built")
@pytest.mark.parametrize("gemm", [None, torch.bfloat16, torch.float16])
def test_fused_head_gemm_precision_against_float64(gemm):
    maps, matrix, offset = _head_case(5)
    want = reference.crd_head([m.double() for m in maps], matrix, offset)
    matrix_t, q = folded_operands(matrix, offset, (48, 80), "concat", 1024, torch.float32, transposed=True)
    with prec.head_gemm_dtype(gemm):
        got = cpu.fused_head_cpu([m.contiguous(memory_format=torch.channels_last) for m in maps], matrix_t, q)
    name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[gemm]
    err = float((got.double() - want).abs().max() / want.abs().max())
    assert got.dtype == torch.float32 and err < prec.TOLERANCE[name]["scores"]
    if gemm is not None:
        assert err > 1e-5  # the reduced GEMM really ran
    else:
        assert err < 1e-5


@pytest.mark.skipif(not cpu.bf16_pass_available(), reason="the bf16 pass is not built")
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_bf16_head_keeps_bf16_projections_and_agrees_with_float64(layout):
    """The bf16 head's fast path: the GEMM's bf16 result goes to the bf16 pass as it is (no float32 copy); the
    norm and the residual (local head) ops stay within bf16's tolerance of the float64 reference."""
    from crd_fast.ops import crd_residual
    from crd_fast.ops.plan import geometry_of

    maps, matrix, offset = _head_case(7)
    maps = [m.contiguous(memory_format=layout) for m in maps]
    matrix_t, q = folded_operands(matrix, offset, (48, 80), "concat", 1024, torch.float32, transposed=True)
    with prec.head_gemm_dtype(torch.bfloat16):
        projected = cpu._project_layers(maps, matrix_t, geometry_of(maps))
        got = cpu.fused_head_cpu(maps, matrix_t, q)
        q_grid = torch.randn(12 * 12, 128, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
        got_residual = crd_residual(maps, matrix.float(), q_grid.float())
    assert [z.dtype for z in projected] == [torch.bfloat16, torch.bfloat16]
    want = reference.crd_head([m.double() for m in maps], matrix, offset)
    want_residual = reference.crd_residual([m.double() for m in maps], matrix, q_grid)
    bound = prec.TOLERANCE["bf16"]["scores"]
    for g, w in ((got, want), (got_residual, want_residual)):
        err = float((g.double() - w).abs().max() / w.abs().max())
        assert g.dtype == torch.float32 and 1e-5 < err < bound  # bf16 really ran, within its bound


@pytest.mark.skipif(not cpu.available(), reason="the fused CPU pass is not built")
def test_float64_head_ignores_the_gemm_context():
    maps, matrix, offset = _head_case(6)
    want = reference.crd_head([m.double() for m in maps], matrix, offset)
    matrix_t, q = folded_operands(matrix, offset, (48, 80), "concat", 1024, torch.float64, transposed=True)
    with prec.head_gemm_dtype(torch.bfloat16):
        got = cpu.fused_head_cpu([m.double() for m in maps], matrix_t, q)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# ---- the detector -----------------------------------------------------------------------------------
def _detector(precision: str, **kw):
    from crd_fast.detector.detector import CRDDetector

    return CRDDetector(
        backbone="resnet18", weights="random", resize=64, crop=64, batch_size=4, seed=2, precision=precision, **kw
    )


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(21)
    return torch.rand(6, 3, 64, 64, generator=g), torch.rand(3, 3, 64, 64, generator=g)


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])
def test_detector_precision_against_float64(images, name):
    """Fit and predict in ``name``; the float64 reference scores the same images with a float64 backbone and
    the float64 statistics of a float64 fit: every difference is the precision's."""
    train, test = images
    det = _detector(name).fit(train, progress=False)
    ref = _detector("fp32")
    ref64 = FeatureExtractor("resnet18", ("layer2", "layer3"), "random", 2).double()
    from crd_fast.core.embedding import embed_patches, patch_matrix
    from crd_fast.scorers.crd import CRDScorer

    with torch.inference_mode():
        x_train = ref.preprocess.batch(train).double()
        scorer = CRDScorer(det.model.scorer.lam_rel, det.model.scorer.center).fit(
            patch_matrix(embed_patches(ref64(x_train)))
        )
        want = reference.crd_head(
            ref64(ref.preprocess.batch(test).double()), scorer.projection.matrix, scorer.projection.offset
        )
    got = det.predict(test, progress=False).patch_maps
    err = float(np.abs(got - want.numpy()).max() / want.abs().max())
    assert err < prec.TOLERANCE[name]["scores"]
    assert det.model.scorer.statistics.mean.dtype == torch.float64  # statistics stay float64 in every precision
    assert det.precision_choice.precision == name and det.config["precision"] == name


def test_detector_auto_falls_back_and_is_saved(monkeypatch, tmp_path, images):
    from crd_fast.detector.detector import CRDDetector

    monkeypatch.setattr(prec, "native_bf16", lambda device: (False, "forced off by the test"))
    det = _detector("auto").fit(images[0], progress=False)
    assert det.precision_choice.precision == "fp32" and det.extractor.precision.autocast_dtype is None
    det.save(tmp_path / "m.crd")
    again = CRDDetector.load(tmp_path / "m.crd")
    assert again.config["precision"] == "auto" and again.precision_choice.precision == "fp32"
    monkeypatch.setattr(prec, "native_bf16", lambda device: (True, "forced on by the test"))
    monkeypatch.setattr(prec, "cpu_bf16_speedup", lambda: 2.0)
    assert CRDDetector.load(tmp_path / "m.crd").precision_choice.precision == "bf16"  # chosen where it runs
    assert CRDDetector.load(tmp_path / "m.crd", precision="fp32").precision_choice.precision == "fp32"


def _conv_weights_layout(det) -> set:
    convs = [m.weight for m in det.extractor.modules() if isinstance(m, torch.nn.Conv2d)]
    return {
        "channels_last" if w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() else "nchw"
        for w in convs
        if w.shape[-1] > 1  # 1x1 kernels are contiguous in both layouts
    }


def test_auto_fp32_runs_channels_last_and_scores_like_explicit_fp32(monkeypatch, tmp_path, images):
    """auto's fp32 takes the faster channels_last layout; explicit fp32 stays contiguous (bit-identical to old
    files); the two differ only by float32 rounding of the convolutions' summation order."""
    from crd_fast.detector.detector import CRDDetector

    train, test = images
    monkeypatch.setattr(prec, "native_bf16", lambda device: (False, "forced off by the test"))
    auto = _detector("auto").fit(train, progress=False)
    exact = _detector("fp32").fit(train, progress=False)
    assert auto.precision_choice.channels_last and _conv_weights_layout(auto) == {"channels_last"}
    assert not exact.precision_choice.channels_last and _conv_weights_layout(exact) == {"nchw"}
    got = auto.predict(test, progress=False).patch_maps
    want = exact.predict(test, progress=False).patch_maps
    assert float(np.abs(got - want).max() / np.abs(want).max()) < prec.TOLERANCE["fp32"]["scores"]
    # the layout follows the precision a file is loaded with
    auto.save(tmp_path / "auto.crd")
    assert _conv_weights_layout(CRDDetector.load(tmp_path / "auto.crd")) == {"channels_last"}
    assert _conv_weights_layout(CRDDetector.load(tmp_path / "auto.crd", precision="fp32")) == {"nchw"}


def test_model_file_without_precision_loads_as_fp32(tmp_path, images):
    from crd_fast.detector.detector import MODEL_KIND, CRDDetector
    from crd_fast.io.model_file import read_model_file, write_model_file

    det = _detector("fp32").fit(images[0], progress=False)
    det.save(tmp_path / "new.crd")
    tensors, meta = read_model_file(tmp_path / "new.crd", MODEL_KIND)
    del meta["config"]["precision"]  # as written before compute precisions existed
    write_model_file(tmp_path / "old.crd", MODEL_KIND, tensors, meta, check=None)  # as an earlier crd_fast wrote it
    old = CRDDetector.load(tmp_path / "old.crd")
    assert old.precision_choice.precision == "fp32"
    np.testing.assert_array_equal(
        old.predict(images[1], progress=False).image_scores, det.predict(images[1], progress=False).image_scores
    )


def test_detector_refuses_bad_precision():
    with pytest.raises(ValueError, match="precision must be one of"):
        _detector("int8")


def test_set_precision_sets_and_restores_the_layout():
    fe = FeatureExtractor("resnet18", ("layer2",), "random", 3)
    conv = fe.body["conv1"].weight
    fe.set_precision(prec.resolve_precision("bf16", "cpu"))
    weight = fe.body["conv1"].weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    fe.set_precision(None)
    assert fe.body["conv1"].weight.is_contiguous() and fe.precision is None
    torch.testing.assert_close(fe.body["conv1"].weight, conv, rtol=0, atol=0)
