"""Export a detector to ONNX and check it against PyTorch with onnxruntime.

    megaclass export RUN/final --onnx det.onnx

torchvision's detectors carry data-dependent control flow (a variable number of boxes, NMS), which
the torch.export-based exporter cannot trace; torchvision ships ONNX support for the TorchScript
exporter instead, so that one is used here (opset 17). The graph takes ONE image, float [3, S, S]
in 0..1 at the detector's input size S (normalization is inside), and returns boxes [N, 4] (xyxy,
input pixels), labels [N] (class id + 1; 0 is background) and scores [N].

The parity check runs `parity_images` seeded random images through both, in two parts:
- raw outputs: the same modules up to the heads (normalization, backbone, FPN and the one-stage
  head, or Faster R-CNN's RPN head), exported the same way into a scratch file, must agree within
  RAW_TOLERANCE relative to their magnitude. This is what the numbers of the exported graph rest
  on, and it is checkable on any weights.
- detections: the same labels, boxes within BOX_TOLERANCE_PX and scores within SCORE_TOLERANCE, for
  every detection whose place is decided. Which of several candidates with the same score (within
  SCORE_TOLERANCE) survive the score threshold and the detections_per_image cut is arbitrary, and
  the two runtimes may choose differently: an untrained RetinaNet scores every anchor 0.01 (its
  classification prior) and keeps an arbitrary 100 of them. Detections inside that tie band are
  counted (`tied_detections`) and not compared; all others must match one to one.
Any failure is an ExportError saying which step failed and why (the exporter's own message included).
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from finetune.detection.model import DetectorSpec, load_detector
from finetune.export import ExportError

log = logging.getLogger(__name__)
BOX_TOLERANCE_PX = 1e-2
SCORE_TOLERANCE = 1e-4
RAW_TOLERANCE = 1e-4  # max abs difference / max(1, max abs value) of the pre-post-processing outputs
OPSET = 17


class RawOutputs(nn.Module):
    """A detector up to its post-processing: the tensors box decoding, thresholds and NMS start from."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        d = self.detector
        images, _ = d.transform([image])
        features = list(d.backbone(images.tensors).values())
        if hasattr(d, "rpn"):  # Faster R-CNN: the RoI heads' input depends on the proposals, so stop at the RPN
            objectness, deltas = d.rpn.head(features)
            return features + objectness + deltas
        return features + list(d.head(features).values())


def _export(module: nn.Module, example: tuple, path: Path, output_names: list[str] | None = None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about data-dependent shapes are expected here
        torch.onnx.export(module, example, str(path), opset_version=OPSET, input_names=["image"],
                          output_names=output_names, dynamo=False)


def raw_difference(raw: RawOutputs, session, image: torch.Tensor) -> float:
    """Max abs difference of `raw`'s outputs between PyTorch and an onnxruntime session of its export,
    relative to the magnitude of each output (at least 1)."""
    with torch.no_grad():
        want = [t.numpy() for t in raw(image)]
    got = session.run(None, {session.get_inputs()[0].name: image.numpy()})
    if len(got) != len(want):
        return float("inf")
    return max(float(np.abs(g - w).max()) / max(1.0, float(np.abs(w).max())) for g, w in zip(got, want))


def tie_band(scores: np.ndarray, spec: DetectorSpec) -> tuple[float, float]:
    """Scores in [low, high] lie where the score threshold or the detections_per_image cut decides
    between candidates of (nearly) equal score: which of them are kept is arbitrary."""
    low = spec.score_thresh - SCORE_TOLERANCE
    high = spec.score_thresh + SCORE_TOLERANCE
    if len(scores) >= spec.detections_per_image:  # the cut is binding: ties with the last kept one
        high = max(high, float(scores.min()) + SCORE_TOLERANCE)
    return low, high


def compare_detections(want: dict[str, np.ndarray], got: dict[str, np.ndarray], spec: DetectorSpec) -> dict:
    """Match PyTorch's (`want`) and ONNX's (`got`) detections of one image outside the tie band, one
    to one by label, box and score. Returns counts and the worst differences; `unmatched` > 0 fails."""
    band = [tie_band(d["scores"], spec) for d in (want, got)]
    low, high = min(b[0] for b in band), max(b[1] for b in band)

    def decided(d: dict) -> np.ndarray:
        return np.flatnonzero(~((d["scores"] >= low) & (d["scores"] <= high)))

    want_idx, got_idx = decided(want), list(decided(got))
    worst_box = worst_score = 0.0
    unmatched = 0
    for i in want_idx:
        box_diff = np.abs(got["boxes"][got_idx] - want["boxes"][i]).max(axis=1) if got_idx else np.array([])
        score_diff = np.abs(got["scores"][got_idx] - want["scores"][i]) if got_idx else np.array([])
        ok = [(b, s, j) for b, s, j in zip(box_diff, score_diff, got_idx)
              if got["labels"][j] == want["labels"][i] and b <= BOX_TOLERANCE_PX and s <= SCORE_TOLERANCE]
        if not ok:
            unmatched += 1
            continue
        b, s, j = min(ok)
        got_idx.remove(j)
        worst_box, worst_score = max(worst_box, float(b)), max(worst_score, float(s))
    unmatched += len(got_idx)  # decided ONNX detections PyTorch does not have
    return {"compared": len(want_idx), "tied": len(want["scores"]) - len(want_idx), "unmatched": unmatched,
            "max_abs_box_diff": worst_box, "max_abs_score_diff": worst_score}


def export_detector_onnx(model_url: str, onnx_path: str, *, parity_images: int = 3, seed: int = 0) -> dict:
    import onnxruntime as ort

    model, ckpt, spec = load_detector(model_url)
    size = spec.image_size
    g = torch.Generator().manual_seed(seed)
    example = torch.rand(3, size, size, generator=g)
    with torch.no_grad():  # the outputs in the detector's own order (Faster R-CNN and RetinaNet/FCOS differ)
        output_names = list(model([example])[0].keys())
    raw = RawOutputs(model).eval()  # eval: the exporter restores the training flag it finds, recursively
    out = Path(onnx_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".onnx-") as tmp:
        staged, raw_path = Path(tmp) / out.name, Path(tmp) / "raw.onnx"
        try:
            _export(model, ([example],), staged, output_names)
            _export(raw, (example,), raw_path)
        except Exception as exc:  # the exporter raises many types; the reason is reported, not swallowed
            raise ExportError(f"{model_url}: the {spec.name} detector on {ckpt.arch} cannot be exported to ONNX "
                              f"by torch.onnx (TorchScript exporter, opset {OPSET}): "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None
        raw_session = ort.InferenceSession(str(raw_path), providers=["CPUExecutionProvider"])
        session = ort.InferenceSession(str(staged), providers=["CPUExecutionProvider"])
        worst_raw, counts, results = 0.0, [], []
        for i in range(parity_images):
            x = torch.rand(3, size, size, generator=g)
            worst_raw = max(worst_raw, raw_difference(raw, raw_session, x))
            with torch.no_grad():
                ref = model([x])[0]
            boxes, labels, scores = session.run(["boxes", "labels", "scores"], {session.get_inputs()[0].name: x.numpy()})
            counts.append(len(scores))
            want = {"boxes": ref["boxes"].numpy(), "labels": ref["labels"].numpy(), "scores": ref["scores"].numpy()}
            result = compare_detections(want, {"boxes": boxes, "labels": labels, "scores": scores}, spec)
            if result["unmatched"]:
                raise ExportError(f"{out}: image {i}: {result['unmatched']} detection(s) of ONNX and PyTorch "
                                  f"do not match (label, box within {BOX_TOLERANCE_PX:g} px, score within "
                                  f"{SCORE_TOLERANCE:g}) outside the tie band at the score threshold and the "
                                  "detections_per_image cut: the exported graph does not match the detector; nothing written")
            results.append(result)
        if worst_raw > RAW_TOLERANCE:
            raise ExportError(f"{out}: the outputs before post-processing (backbone, FPN, heads) differ from PyTorch "
                              f"by {worst_raw:.3g} (relative; tolerance {RAW_TOLERANCE:g}); nothing written")
        os.replace(staged, out)  # atomic, and only once checked: readers never see a half-written or wrong model
    report = {"onnx": str(out), "arch": ckpt.arch, "detector": spec.name, "num_classes": len(ckpt.class_names),
              "input_size": [3, size, size], "input": "one image, float 0..1 (normalized inside)",
              "parity_images": parity_images, "detections_per_image": counts,
              "compared_detections": sum(r["compared"] for r in results),
              "tied_detections": sum(r["tied"] for r in results),
              "max_abs_box_diff": max(r["max_abs_box_diff"] for r in results),
              "max_abs_score_diff": max(r["max_abs_score_diff"] for r in results),
              "max_raw_diff": worst_raw, "box_tolerance": BOX_TOLERANCE_PX, "score_tolerance": SCORE_TOLERANCE,
              "raw_tolerance": RAW_TOLERANCE, "ok": True}
    return report
