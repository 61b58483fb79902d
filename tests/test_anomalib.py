"""crd_fast.integrations.anomalib: the CRD as an anomalib 2.x model, fitted and tested by anomalib's Engine on a
generated MVTec-layout folder; the float64 statistics live in the checkpoint, so a reloaded model scores exactly
as before and can be trained on more images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("anomalib", reason="the anomalib model needs the optional extra crd-fast[anomalib]")

from anomalib.data import MVTecAD  # noqa: E402
from anomalib.engine import Engine  # noqa: E402

from crd_fast.core.embedding import patch_matrix  # noqa: E402
from crd_fast.integrations.anomalib import Crd, CrdModel  # noqa: E402
from crd_fast.scorers.crd import CRDScorer  # noqa: E402
from crd_fast.synthetic import generate_dataset  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory):
    root = tmp_path_factory.mktemp("anomalib") / "data"
    generate_dataset(root, categories=("fabric",), n_train=12, n_test_good=4, n_test_defect=8, size=128, seed=0)
    return root


def datamodule(root):
    return MVTecAD(root=root, category="fabric", train_batch_size=4, eval_batch_size=4, num_workers=0)


def engine(tmp_path):
    return Engine(accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path, enable_progress_bar=False)


def images(seed: int, n: int) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_engine_fit_and_test_on_mvtec_layout(mvtec, tmp_path):
    model = Crd(backbone="resnet18", pre_trained=False, visualizer=False)
    eng = engine(tmp_path)
    eng.fit(model=model, datamodule=datamodule(mvtec))
    assert int(model.model.crd_count) == 12 * 32 * 32  # 12 images of 256 px (anomalib resizes): 32 x 32 patches
    metrics = eng.test(model=model, datamodule=datamodule(mvtec))[0]
    assert metrics["image_AUROC"] >= 0.9, metrics
    assert metrics["pixel_AUROC"] >= 0.9, metrics

    # The checkpoint holds the float64 statistics and the head: a reload scores exactly as before.
    ckpt = tmp_path / "crd.ckpt"
    eng.trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert state["model.crd_scatter"].dtype == torch.float64 and "model.head.matrix" in state
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
    torch.testing.assert_close(reloaded.crd_scatter, together.crd_scatter, rtol=1e-12, atol=1e-9)
    assert int(reloaded.crd_count) == int(together.crd_count) == 5 * 8 * 8

    # the statistics are CRDScorer's, and the head scores as the scorer does (float64 reference)
    with torch.no_grad():
        feats = together.extractor(torch.cat([first, second]))
    from crd_fast.core.embedding import embed_patches

    emb = embed_patches(feats, "concat")
    scorer = CRDScorer().fit(patch_matrix(emb).double())
    torch.testing.assert_close(together.crd_scatter, scorer.statistics.scatter, rtol=1e-10, atol=1e-8)
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
