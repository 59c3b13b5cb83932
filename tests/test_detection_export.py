"""Detector ONNX parity: the tie band of the detection comparison, and an untrained RetinaNet (every
anchor scores its 0.01 prior, so which 100 are kept is arbitrary) checked on its raw head outputs."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from finetune.detection import export
from finetune.detection.model import DetectorSpec, create_detector
from pretrain.checkpoint import save_checkpoint
from tests.test_finetune import ARCH, PRETRAINED_CFG

SPEC = DetectorSpec("retinanet", num_classes=3, image_size=32, fpn_channels=16, score_thresh=0.0,
                    detections_per_image=4)


def detections(rows: list[tuple]) -> dict[str, np.ndarray]:
    """(label, score, x0) rows -> a detections dict with 10 px boxes starting at x0."""
    return {"labels": np.array([r[0] for r in rows]), "scores": np.array([r[1] for r in rows], dtype=np.float32),
            "boxes": np.array([[r[2], 0, r[2] + 10, 10] for r in rows], dtype=np.float32)}


def test_detections_compared_outside_the_tie_band_only():
    want = detections([(1, 0.9, 0), (2, 0.5, 20), (1, 0.01, 40), (1, 0.01, 60)])  # full: the cut is binding
    # Another of the tied 0.01 candidates kept, the decided ones in another order and within tolerance.
    got = detections([(2, 0.5, 20.001), (1, 0.9, 0), (3, 0.01, 80), (1, 0.01, 40)])
    result = export.compare_detections(want, got, SPEC)
    assert (result["compared"], result["tied"], result["unmatched"]) == (2, 2, 0)
    assert result["max_abs_box_diff"] == pytest.approx(0.001, abs=1e-5)
    moved = detections([(1, 0.9, 0), (2, 0.5, 21), (1, 0.01, 40), (1, 0.01, 60)])  # a decided box 1 px off
    assert export.compare_detections(want, moved, SPEC)["unmatched"] == 2  # one missing, one extra
    relabelled = detections([(1, 0.9, 0), (3, 0.5, 20), (1, 0.01, 40), (1, 0.01, 60)])
    assert export.compare_detections(want, relabelled, SPEC)["unmatched"] == 2
    # Not full: no cut, so low scores are decided too (only the score threshold's own band is tied).
    short = detections([(1, 0.9, 0), (1, 0.01, 40)])
    assert export.compare_detections(short, detections([(1, 0.9, 0)]), SPEC)["unmatched"] == 1


@pytest.fixture(scope="module")
def retinanet_url(tmp_path_factory) -> str:
    """An untrained RetinaNet detector checkpoint (score threshold 0: 100 detections per image, all ~0.01)."""
    spec = DetectorSpec("retinanet", num_classes=3, image_size=32, fpn_channels=16, score_thresh=0.0)
    model, spec = create_detector(spec, ARCH)
    root = tmp_path_factory.mktemp("retina")
    return save_checkpoint(str(root / "ckpt"), state_dict=model.state_dict(), arch=ARCH, num_classes=3,
                           class_names=["a", "b", "c"], pretrained_cfg=PRETRAINED_CFG,
                           megaclass={"task": "detection", "detector": spec.as_dict(), "step": 0})


@pytest.mark.slow
def test_untrained_retinanet_exports_with_raw_parity(retinanet_url, tmp_path):
    report = export.export_detector_onnx(retinanet_url, str(tmp_path / "det.onnx"), parity_images=2)
    assert report["ok"] and (tmp_path / "det.onnx").stat().st_size > 0
    assert report["detections_per_image"] == [100, 100]
    assert report["tied_detections"] == 200 and report["compared_detections"] == 0  # all at the 0.01 prior
    assert report["max_raw_diff"] < 1e-5


def test_raw_parity_catches_a_graph_that_is_not_the_detector(retinanet_url, tmp_path):
    from finetune.detection.model import load_detector

    model, _, _ = load_detector(retinanet_url)
    raw = export.RawOutputs(model).eval()
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    changed = copy.deepcopy(raw)
    with torch.no_grad():
        changed.detector.head.classification_head.cls_logits.bias.add_(0.5)  # the scores' logits
    path = Path(tmp_path / "raw.onnx")
    export._export(changed, (image,), path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert export.raw_difference(raw, session, image) == pytest.approx(0.5 / 4.6, rel=0.05)  # relative to ~4.6
    assert export.raw_difference(changed, session, image) < 1e-5
