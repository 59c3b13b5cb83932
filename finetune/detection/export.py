"""Export a detector to ONNX and check boxes and scores against PyTorch with onnxruntime.

    megaclass export RUN/final --onnx det.onnx

torchvision's detectors carry data-dependent control flow (a variable number of boxes, NMS), which
the torch.export-based exporter cannot trace; torchvision ships ONNX support for the TorchScript
exporter instead, so that one is used here (opset 17). The graph takes ONE image, float [3, S, S]
in 0..1 at the detector's input size S (normalization is inside), and returns boxes [N, 4] (xyxy,
input pixels), labels [N] (class id + 1; 0 is background) and scores [N]. The parity check runs
`parity_images` seeded random images through both and requires the same number of detections,
equal labels, and boxes/scores within tolerance. Any failure is an ExportError saying which step
failed and why (the exporter's own message included).
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from finetune.detection.model import load_detector
from finetune.export import ExportError

log = logging.getLogger(__name__)
BOX_TOLERANCE_PX = 1e-2
SCORE_TOLERANCE = 1e-4
OPSET = 17


def _sorted(boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, ...]:
    rounded = np.round(boxes.astype(np.float64), 2)
    order = np.lexsort((rounded[:, 3], rounded[:, 2], rounded[:, 1], rounded[:, 0], labels))
    return boxes[order], labels[order], scores[order]


def export_detector_onnx(model_url: str, onnx_path: str, *, parity_images: int = 3, seed: int = 0) -> dict:
    import onnxruntime as ort

    model, ckpt, spec = load_detector(model_url)
    size = spec.image_size
    g = torch.Generator().manual_seed(seed)
    example = torch.rand(3, size, size, generator=g)
    with torch.no_grad():  # the outputs in the detector's own order (Faster R-CNN and RetinaNet/FCOS differ)
        output_names = list(model([example])[0].keys())
    out = Path(onnx_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".onnx-") as tmp:
        staged = Path(tmp) / out.name
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TracerWarnings about data-dependent shapes are expected here
                torch.onnx.export(model, ([example],), str(staged), opset_version=OPSET, input_names=["image"],
                                  output_names=output_names, dynamo=False)
        except Exception as exc:  # the exporter raises many types; the reason is reported, not swallowed
            raise ExportError(f"{model_url}: the {spec.name} detector on {ckpt.arch} cannot be exported to ONNX "
                              f"by torch.onnx (TorchScript exporter, opset {OPSET}): "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None
        os.replace(staged, out)  # atomic: readers never see a half-written model

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    worst_box = worst_score = 0.0
    counts = []
    for i in range(parity_images):
        x = torch.rand(3, size, size, generator=g)
        with torch.no_grad():
            ref = model([x])[0]
        boxes, labels, scores = session.run(["boxes", "labels", "scores"], {session.get_inputs()[0].name: x.numpy()})
        counts.append(len(scores))
        if len(scores) != len(ref["scores"]):
            raise ExportError(f"{out}: image {i}: ONNX gives {len(scores)} detections, PyTorch {len(ref['scores'])}: "
                              "the exported graph does not match the detector")
        # Detections with (nearly) equal scores may come out in another order: compare them sorted by
        # label and box, so only a different set of detections fails.
        got = _sorted(boxes, labels, scores)
        want = _sorted(ref["boxes"].numpy(), ref["labels"].numpy(), ref["scores"].numpy())
        if not np.array_equal(got[1], want[1]):
            raise ExportError(f"{out}: image {i}: ONNX and PyTorch detect other classes: the exported graph does not "
                              "match the detector")
        if len(scores):
            worst_box = max(worst_box, float(np.abs(got[0] - want[0]).max()))
            worst_score = max(worst_score, float(np.abs(got[2] - want[2]).max()))
    report = {"onnx": str(out), "arch": ckpt.arch, "detector": spec.name, "num_classes": len(ckpt.class_names),
              "input_size": [3, size, size], "input": "one image, float 0..1 (normalized inside)",
              "parity_images": parity_images, "detections_per_image": counts, "max_abs_box_diff": worst_box,
              "max_abs_score_diff": worst_score, "box_tolerance": BOX_TOLERANCE_PX, "score_tolerance": SCORE_TOLERANCE}
    report["ok"] = worst_box <= BOX_TOLERANCE_PX and worst_score <= SCORE_TOLERANCE
    if not report["ok"]:
        raise ExportError(f"{out}: ONNX differs from PyTorch: boxes by {worst_box:.3g} px (tolerance "
                          f"{BOX_TOLERANCE_PX:g}), scores by {worst_score:.3g} (tolerance {SCORE_TOLERANCE:g})")
    return report
