"""crd_fast.integrations.anomalib: the CRD as an anomalib 2.x model, fitted and tested by anomalib's Engine on a
generated MVTec-layout folder; the float64 statistics live in the checkpoint, so a reloaded model scores exactly
as before and can be trained on more images. The detector's options reach it through the scoring-model interface:
the local model and the label-free choice go through fit, test, predict, export and checkpoints, and the choice
equals the detector's on the same images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("anomalib", reason="the anomalib model needs the optional extra crd-fast[anomalib]")

from anomalib.data import MVTecAD  # noqa: E402
from anomalib.engine import Engine  # noqa: E402

from crd_fast import CRDDetector  # noqa: E402
from crd_fast.core.embedding import patch_grids, patch_matrix  # noqa: E402
from crd_fast.integrations.anomalib import Crd, CrdModel  # noqa: E402
from crd_fast.scorers.crd import CRDScorer  # noqa: E402
from crd_fast.scoring import model_class  # noqa: E402
from crd_fast.selection.plan import held_out_count  # noqa: E402
from crd_fast.synthetic import generate_dataset  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory):
    root = tmp_path_factory.mktemp("anomalib") / "data"
    generate_dataset(root, categories=("fabric",), n_train=12, n_test_good=4, n_test_defect=8, size=128, seed=0)
    return root


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Enough training images (24 >= 20) for the label-free choice, small: an aligned part."""
    root = tmp_path_factory.mktemp("anomalib-parts") / "data"
    generate_dataset(root, categories=("cap",), n_train=24, n_test_good=4, n_test_defect=6, size=64, seed=1)
    return root


def datamodule(root, category="fabric", batch_size=4):
    return MVTecAD(root=root, category=category, train_batch_size=batch_size, eval_batch_size=4, num_workers=0)


def small(**options):
    """A Crd on a seeded random resnet18 that sees 64 px images (8 x 8 patch grid)."""
    return Crd(
        backbone="resnet18",
        pre_trained=False,
        visualizer=False,
        pre_processor=Crd.configure_pre_processor(image_size=(64, 64)),
        **options,
    )


def reload_and_compare(model, eng, tmp_path):
    """Save a checkpoint, load it into a new Crd, and check the CRD model scores exactly as before."""
    ckpt = tmp_path / "crd.ckpt"
    eng.trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    scoring = model.model.scoring
    saved = {k[len("model.scoring.") :] for k in state if k.startswith("model.scoring.")}
    assert saved == set(scoring.state()[0]) and all(state[f"model.scoring.{k}"].dtype == torch.float64 for k in saved)
    reloaded = Crd.load_from_checkpoint(ckpt, map_location="cpu", pre_processor=model.pre_processor)
    assert reloaded.model.scoring.name == scoring.name and reloaded.model.scoring.options() == scoring.options()
    assert (reloaded.model.selection is None) == (model.model.selection is None)
    if model.model.selection is not None:
        assert reloaded.model.selection.to_dict() == model.model.selection.to_dict()
    x = images(7, 3)
    model.model.eval(), reloaded.model.eval()
    with torch.no_grad():
        a, b = model.model(x), reloaded.model(x)
    assert torch.equal(a.pred_score, b.pred_score) and torch.equal(a.anomaly_map, b.anomaly_map)

    # The CRD model's own state dict needs no unpickling of anything but tensors and plain values.
    torch.save(model.model.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["scoring.crd.scatter"].dtype == torch.float64 and state["_extra_state"]["spatial"] == scoring.name
    return reloaded


def engine(tmp_path):
    return Engine(accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path, enable_progress_bar=False)


def images(seed: int, n: int) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_engine_fit_and_test_on_mvtec_layout(mvtec, tmp_path):
    model = Crd(backbone="resnet18", pre_trained=False, visualizer=False)
    eng = engine(tmp_path)
    eng.fit(model=model, datamodule=datamodule(mvtec))
    # fewer than 20 images: the detector's defaults settle on the global CRD at lam_rel 0.01, without a choice
    assert model.model.scoring.name == "global" and model.model.scoring.lam_rel == 0.01
    assert model.model.scoring.n_patches == 12 * 32 * 32  # 12 images of 256 px (anomalib resizes): 32 x 32 patches
    metrics = eng.test(model=model, datamodule=datamodule(mvtec))[0]
    assert metrics["image_AUROC"] >= 0.9, metrics
    assert metrics["pixel_AUROC"] >= 0.9, metrics

    # The checkpoint holds the float64 statistics and the head: a reload scores exactly as before.
    ckpt = tmp_path / "crd.ckpt"
    eng.trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert state["model.scoring.crd.scatter"].dtype == torch.float64 and "model.head.matrix" in state
    reloaded = Crd.load_from_checkpoint(ckpt, map_location="cpu")
    x = images(0, 2)
    model.model.eval(), reloaded.model.eval()
    with torch.no_grad():
        a, b = model.model(x), reloaded.model(x)
    assert torch.equal(a.pred_score, b.pred_score) and torch.equal(a.anomaly_map, b.anomaly_map)


def test_statistics_equal_the_scorer_and_updates_after_reload_are_exact(tmp_path):
    torch.manual_seed(0)
    first, second = images(1, 3), images(2, 2)
    model = CrdModel("resnet18", pre_trained=False, blur_sigma=1.0).train()
    model(first)
    model.fit()
    path = tmp_path / "state.pt"
    torch.save(model.state_dict(), path)

    # reload into a fresh model, then add more images: the same as one model trained on all of them
    reloaded = CrdModel("resnet18", pre_trained=False, blur_sigma=1.0)
    reloaded.load_state_dict(torch.load(path, weights_only=True))
    reloaded.train()(second)
    reloaded.fit()
    together = CrdModel("resnet18", pre_trained=False, blur_sigma=1.0).train()
    together(torch.cat([first, second]))
    together.fit()
    scatter = reloaded.scoring.current_statistics().scatter
    torch.testing.assert_close(scatter, together.scoring.current_statistics().scatter, rtol=1e-12, atol=1e-9)
    assert reloaded.scoring.n_patches == together.scoring.n_patches == 5 * 8 * 8

    # the statistics are CRDScorer's, and the head scores as the scorer does (float64 reference)
    with torch.no_grad():
        feats = together.extractor(torch.cat([first, second]))
    from crd_fast.core.embedding import embed_patches

    emb = embed_patches(feats, "concat")
    scorer = CRDScorer().fit(patch_matrix(emb).double())
    torch.testing.assert_close(
        together.scoring.current_statistics().scatter, scorer.statistics.scatter, rtol=1e-10, atol=1e-8
    )
    together.eval()
    y = images(3, 1)
    with torch.no_grad():
        out = together(y)
        want = scorer.score(patch_matrix(embed_patches(together.extractor(y), "concat")).double())
    np.testing.assert_allclose(out.pred_score.numpy(), [want.max().item()], rtol=1e-4)


def test_backbone_stays_frozen_in_training():
    model = CrdModel("resnet18", pre_trained=False).train()
    before = {k: v.clone() for k, v in model.extractor.state_dict().items()}
    model(images(4, 2))
    assert not model.extractor.training
    for k, v in model.extractor.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_engine_predict_and_export(mvtec, tmp_path):
    pytest.importorskip("onnxscript", reason="anomalib's ONNX export needs onnxscript (crd-fast[onnx])")
    ov = pytest.importorskip("openvino", reason="anomalib's OpenVINO export needs openvino (crd-fast[openvino])")
    from anomalib.deploy import ExportType

    model = Crd(backbone="resnet18", pre_trained=False, visualizer=False)
    eng = engine(tmp_path)
    eng.fit(model=model, datamodule=datamodule(mvtec))
    predictions = eng.predict(model=model, datamodule=datamodule(mvtec))
    assert sum(len(p.pred_score) for p in predictions) == 12  # the test images: 4 good, 8 defective
    # anomalib's default opset (14) cannot express the reflect padding of the blur; 18 can.
    onnx_path = eng.export(
        model=model, export_type=ExportType.ONNX, export_root=tmp_path / "onnx", onnx_kwargs={"opset_version": 18}
    )
    xml = eng.export(
        model=model, export_type=ExportType.OPENVINO, export_root=tmp_path / "ov", onnx_kwargs={"opset_version": 18}
    )
    assert onnx_path.is_file() and xml.is_file()
    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(5))
    out = compiled(image.numpy())
    model.eval()
    with torch.no_grad():
        want = model(image)  # pre-processing, CRD model and post-processing, as exported
    got = {port.get_any_name(): value for port, value in out.items()}
    np.testing.assert_allclose(got["pred_score"], want.pred_score.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["anomaly_map"], want.anomaly_map.numpy(), rtol=1e-4, atol=1e-4)


def test_local_model_through_the_engine(mvtec, tmp_path):
    model = small(spatial="local", lam_rel=0.02, local_rank=4, local_shrinkage=0.25)
    eng = engine(tmp_path)
    data = datamodule(mvtec)
    eng.fit(model=model, datamodule=data)
    scoring = model.model.scoring
    assert scoring.name == "local" and model.model.selection is None  # fixed options: nothing to choose
    assert scoring.options() == {"lam_rel": 0.02, "local_rank": 4, "local_shrinkage": 0.25}
    assert scoring.positions == 8 * 8 and scoring.n_patches == 12 * 8 * 8

    # The head scores as the local model fitted on the same images does (float64 reference, any image order).
    train = torch.stack([item.image for item in data.train_data])
    x = model.pre_processor.transform(train)
    reference = model_class("local").create({"lam_rel": 0.02, "local_rank": 4, "local_shrinkage": 0.25})
    reference.partial_fit(patch_grids(model.model._embed(x)).double())
    test = model.pre_processor.transform(torch.stack([item.image for item in data.test_data][:5]))
    model.model.eval()
    with torch.no_grad():
        got = model.model(test).pred_score
    want = reference.scorer.score(patch_grids(model.model._embed(test)).double()).amax(dim=1)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4)

    metrics = eng.test(model=model, datamodule=data)[0]
    assert 0.0 <= metrics["image_AUROC"] <= 1.0
    predictions = eng.predict(model=model, datamodule=data)
    assert sum(len(p.pred_score) for p in predictions) == 12
    reload_and_compare(model, eng, tmp_path)
    _export_matches_torch(model, eng, tmp_path, size=64)


def test_label_free_choice_through_the_engine(parts, tmp_path):
    model = small()  # the detector's defaults: lam_rel "auto", spatial "auto"
    eng = engine(tmp_path)
    data = datamodule(parts, "cap", batch_size=8)
    eng.fit(model=model, datamodule=data)
    record, scoring = model.model.selection, model.model.scoring
    assert record is not None and record.made, record
    assert record.n_images == 24 and record.held_out == held_out_count(24)  # spaced over the loader's 24 images
    assert set(record.families) == {"global", "local"}
    assert scoring.name == record.spatial and scoring.lam_rel == record.lam_rel
    assert scoring.n_patches == 24 * 8 * 8  # the chosen model is fitted on all images, held-out ones included
    metrics = eng.test(model=model, datamodule=data)[0]
    assert 0.0 <= metrics["image_AUROC"] <= 1.0
    predictions = eng.predict(model=model, datamodule=data)
    assert sum(len(p.pred_score) for p in predictions) == 10
    reloaded = reload_and_compare(model, eng, tmp_path)

    # Training the reloaded model on more images adds them to its model and keeps the choice.
    more = engine(tmp_path / "more")
    more.fit(model=reloaded, datamodule=data)
    assert reloaded.model.scoring.n_patches == 2 * 24 * 8 * 8 and reloaded.model.scoring.name == scoring.name
    assert reloaded.model.selection.to_dict() == record.to_dict()
    _export_matches_torch(reloaded, more, tmp_path / "more", size=64)


def test_label_free_choice_equals_the_detectors(parts):
    """The same images in the same order: the anomalib model chooses and scores exactly as CRDDetector does."""
    from PIL import Image

    paths = sorted((parts / "cap" / "train" / "good").glob("*.png"))
    pictures = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))) for p in paths])
    pictures = pictures.permute(0, 3, 1, 2).float() / 255
    det = CRDDetector(backbone="resnet18", weights="random", resize=64, crop=64, batch_size=8)
    det.fit(pictures, progress=False)
    x = det.preprocess.batch(pictures).contiguous()  # the normalised inputs the detector saw (in its layout)

    crd = CrdModel("resnet18", pre_trained=False).train()
    crd.begin_fit(count=len(x))
    for start in range(0, len(x), 8):
        crd(x[start : start + 8])
    crd.fit()
    mine, theirs = crd.selection.to_dict(), det.selection.to_dict()
    for record in (mine, theirs):
        for key in [k for k in record if "seconds" in k]:
            del record[key]
        for family in record["families"].values():
            family.pop("seconds", None)
    assert mine == theirs and mine["choice"] == {"spatial": det.spatial_choice, "lam_rel": det.lam_rel}
    assert crd.scoring.name == det.spatial_choice and crd.scoring.options() == det.model.options()
    crd.eval()
    test = pictures[:4].flip(-1)  # other pictures of the same part
    with torch.no_grad():
        got = crd(det.preprocess.batch(test).contiguous()).pred_score
    np.testing.assert_allclose(got.double().numpy(), det.predict(test, progress=False).image_scores, rtol=1e-6)


def test_checkpoints_are_checked(tmp_path):
    model = CrdModel("resnet18", pre_trained=False, lam_rel=0.01, spatial="global").train()
    model(images(1, 3))
    model.fit()
    state = model.state_dict()
    with pytest.raises(ValueError, match="holds no crd-fast-anomalib state of version 1"):
        CrdModel("resnet18", pre_trained=False).load_state_dict({k: v for k, v in state.items() if k != "_extra_state"})
    edited = dict(state, **{"scoring.crd.scatter": 2 * state["scoring.crd.scatter"]})  # lam no longer matches
    with pytest.raises(ValueError, match="CrdModel checkpoint: .*lam=.* but the statistics give"):
        CrdModel("resnet18", pre_trained=False).load_state_dict(edited)
    unfitted = CrdModel("resnet18", pre_trained=False)
    unfitted.load_state_dict(CrdModel("resnet18", pre_trained=False).state_dict())  # an unfitted model round-trips
    assert unfitted.scoring is None and unfitted.head is None


def test_options_are_checked_as_the_detectors():
    with pytest.raises(ValueError, match="spatial must be one of"):
        CrdModel("resnet18", pre_trained=False, spatial="position")
    with pytest.raises(ValueError, match="lam_rel must be a positive finite number or 'auto'"):
        CrdModel("resnet18", pre_trained=False, lam_rel=-1.0)
    with pytest.raises(ValueError, match="local_shrinkage must be a number in"):
        Crd(backbone="resnet18", pre_trained=False, local_shrinkage=1.5)
    with pytest.raises(RuntimeError, match="not fitted"):
        CrdModel("resnet18", pre_trained=False).eval()(images(0, 1))
    with pytest.raises(RuntimeError, match="no training images"):
        CrdModel("resnet18", pre_trained=False).fit()


def _export_matches_torch(model, eng, root, size):
    """ONNX and OpenVINO exports of ``model`` score as the torch model (pre-processing, CRD, post-processing)."""
    pytest.importorskip("onnxscript", reason="anomalib's ONNX export needs onnxscript (crd-fast[onnx])")
    ov = pytest.importorskip("openvino", reason="anomalib's OpenVINO export needs openvino (crd-fast[openvino])")
    from anomalib.deploy import ExportType

    xml = eng.export(
        model=model, export_type=ExportType.OPENVINO, export_root=root / "ov", onnx_kwargs={"opset_version": 18}
    )
    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(5))
    out = {port.get_any_name(): value for port, value in compiled(image.numpy()).items()}
    model.eval()
    with torch.no_grad():
        want = model(image)
    np.testing.assert_allclose(out["pred_score"], want.pred_score.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["anomaly_map"], want.anomaly_map.numpy(), rtol=1e-4, atol=1e-4)
