"""DetectionConfig: the typed config of `megaclass finetune --task detection` (defaults < YAML < --set).

The sections are fine-tuning's own (data, optim, train, checkpoint, scaling, log) with the same
field names and meaning; `model` says which detector, and `finetune` which checkpoint and how
(full, or linear = frozen backbone body, or scratch = the same detector from random weights).
Fields of the shared sections that only classification uses (optim.layer_decay, the data.*
augmentation fields) are ignored here.

    cfg = load_config(DetectionConfig, "det.yaml", ["model.detector=fcos", "train.max_steps=500"])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from data_pipeline.config import doc, require
from finetune.config import FinetuneOptimSection, FinetuneSections, SourceSection
from finetune.detection.model import DETECTORS

DETECTION_MODES = ("full", "linear")


@dataclass(frozen=True)
class DetectionOptimSection(FinetuneOptimSection):
    warmup_steps: int = doc("linear warmup length, optimizer steps", 20, ge=0)


@dataclass(frozen=True)
class DetectionModelSection:
    arch: str = doc("timm architecture of the backbone; empty = the checkpoint's (a different name is an error)", "")
    detector: Literal["faster_rcnn", "retinanet", "fcos"] = doc(
        "faster_rcnn (two-stage, FPN) | retinanet | fcos (one-stage, FPN)", "faster_rcnn")
    fpn_channels: int = doc("channels of every FPN level and of the heads", 256)
    anchor_scale: float = doc("anchor size / feature stride; 0 = image_size/100 within [2, 8] (8 = torchvision's "
                              "800 px default)", 0.0)
    score_thresh: float = doc("detections below this score are dropped (0..1)", 0.05)
    nms_thresh: float = doc("IoU of non-maximum suppression (0..1)", 0.5)
    detections_per_image: int = doc("at most this many detections per image", 100)

    def validate(self) -> None:
        require(self.detector in DETECTORS, "model.detector", f"must be one of {list(DETECTORS)}")
        require(self.fpn_channels >= 8, "model.fpn_channels", "must be >= 8")
        require(self.detector != "fcos" or self.fpn_channels % 16 == 0, "model.fpn_channels",
                "must be a multiple of 16 for fcos (its heads use GroupNorm with 16 groups)")
        require(self.anchor_scale >= 0, "model.anchor_scale", "must be >= 0 (0 = auto)")
        require(0.0 <= self.score_thresh < 1.0, "model.score_thresh", "must be in [0, 1)")
        require(0.0 < self.nms_thresh <= 1.0, "model.nms_thresh", "must be in (0, 1]")
        require(self.detections_per_image >= 1, "model.detections_per_image", "must be >= 1")


@dataclass(frozen=True)
class DetectionSourceSection(SourceSection):
    mode: Literal["full", "linear"] = doc("full: train everything | linear: freeze the backbone body "
                                          "(FPN and heads train)", "full")

    def validate(self) -> None:
        require(self.mode in DETECTION_MODES, "finetune.mode",
                f"must be one of {list(DETECTION_MODES)} for detection (lp-ft is classification only)")
        require(not (self.scratch and self.mode == "linear"), "finetune.scratch",
                "a frozen random backbone (finetune.mode=linear) is not a baseline; use mode full")


@dataclass(frozen=True)
class DetectionConfig(FinetuneSections):
    model: DetectionModelSection = field(default_factory=DetectionModelSection)
    optim: DetectionOptimSection = field(default_factory=DetectionOptimSection)
    finetune: DetectionSourceSection = field(default_factory=DetectionSourceSection)
