"""Detectors on a checkpoint's timm backbone: torchvision's Faster R-CNN FPN, RetinaNet and FCOS.

    model = create_detector(spec, arch, model_args, backbone_state=ckpt.state_dict)   # pretrained
    model = create_detector(spec, arch, model_args)                                   # --scratch

The backbone is timm's `features_only` view of the checkpoint's architecture: its weights are the
checkpoint's own (every tensor of the feature extractor must be present and is copied; the
classifier is not used). torchvision supplies the FPN, anchors, RPN/RoI heads, one-stage heads,
losses, box coding and NMS; only the glue between timm features and the FPN is written here.

Sizes for small images: every image is resized to `image_size` square by the loader, the detector's
own transform keeps that size (min_size = max_size = image_size), and anchors follow the feature
strides scaled by `anchor_scale` (auto: image_size / 100, within [2, 8]; torchvision's 800 px
defaults are 8 x stride), so a 64 px image gets 8..128 px anchors rather than 32..512.
Detector class 0 is background: dataset class id c is detector label c + 1.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial

import timm
import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from pretrain.checkpoint import CheckpointError

DETECTORS = ("faster_rcnn", "retinanet", "fcos")
BODY_PREFIX = "backbone.body."
FCOS_NORM_GROUPS = 16


@dataclass(frozen=True)
class DetectorSpec:
    """What rebuilds a detector; stored as the checkpoint's megaclass.detector block."""
    name: str = "faster_rcnn"
    num_classes: int = 1                 # dataset classes (background excluded)
    image_size: int = 64
    fpn_channels: int = 256
    anchor_scale: float = 0.0            # 0 = auto from image_size
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_image: int = 100
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    out_indices: tuple = field(default=())  # timm feature levels used (filled by create_detector)

    def as_dict(self) -> dict:
        return {"name": self.name, "num_classes": self.num_classes, "image_size": self.image_size,
                "fpn_channels": self.fpn_channels, "anchor_scale": self.anchor_scale,
                "score_thresh": self.score_thresh, "nms_thresh": self.nms_thresh,
                "detections_per_image": self.detections_per_image, "mean": list(self.mean), "std": list(self.std),
                "out_indices": list(self.out_indices)}

    @classmethod
    def from_dict(cls, d: dict) -> "DetectorSpec":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for key in ("mean", "std", "out_indices"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)

    @property
    def effective_anchor_scale(self) -> float:
        return self.anchor_scale or min(8.0, max(2.0, self.image_size / 100))


class TimmFPN(nn.Module):
    """timm features_only body + torchvision FPN; `out_channels` and `strides` as torchvision expects."""

    def __init__(self, arch: str, model_args: dict, out_indices: tuple, fpn_channels: int, extra: str):
        super().__init__()
        self.body = timm.create_model(arch, pretrained=False, features_only=True, out_indices=out_indices,
                                      **model_args)
        channels = self.body.feature_info.channels()
        strides = list(self.body.feature_info.reduction())
        if extra == "pool":
            extra_blocks = LastLevelMaxPool()
            strides.append(strides[-1] * 2)
        else:
            extra_blocks = LastLevelP6P7(fpn_channels, fpn_channels)
            strides += [strides[-1] * 2, strides[-1] * 4]
        self.fpn = FeaturePyramidNetwork(channels, fpn_channels, extra_blocks=extra_blocks)
        self.out_channels = fpn_channels
        self.strides = strides

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        features = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))


def pick_out_indices(arch: str, model_args: dict, detector: str) -> tuple:
    """Feature levels: strides 4..32 for Faster R-CNN (+ max-pool P6), 8..32 for one-stage (+ P6, P7)."""
    with torch.device("meta"):
        probe = timm.create_model(arch, pretrained=False, features_only=True, **model_args)
    reductions = probe.feature_info.reduction()
    indices = list(probe.feature_info.out_indices)
    lowest = 4 if detector == "faster_rcnn" else 8
    chosen = tuple(i for i, r in zip(indices, reductions) if r >= lowest)
    if len(chosen) < 2:
        raise CheckpointError(f"{arch}: features_only gives strides {reductions}; a detector needs at least "
                              f"two levels of stride >= {lowest}")
    return chosen[-4:] if detector == "faster_rcnn" else chosen[-3:]


def create_detector(spec: DetectorSpec, arch: str, model_args: dict | None = None, *,
                    backbone_state: dict[str, torch.Tensor] | None = None, seed: int = 0,
                    source_url: str = "") -> tuple[nn.Module, DetectorSpec]:
    """A torchvision detector on the timm backbone; with backbone_state, every body weight from it."""
    if spec.name not in DETECTORS:
        raise ValueError(f"unknown detector {spec.name!r} (one of {DETECTORS})")
    model_args = dict(model_args or {})
    if not spec.out_indices:
        spec = DetectorSpec.from_dict({**spec.as_dict(), "out_indices": pick_out_indices(arch, model_args, spec.name)})
    # New layers start from a fixed seed: every DDP rank and every rerun builds the same model.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = TimmFPN(arch, model_args, spec.out_indices, spec.fpn_channels,
                           "pool" if spec.name == "faster_rcnn" else "p6p7")
        model = _heads(spec, backbone)
    if backbone_state is not None:
        load_backbone(backbone.body, backbone_state, source_url)
    return model, spec


def _heads(spec: DetectorSpec, backbone: TimmFPN) -> nn.Module:
    num_levels = len(backbone.strides)
    k = spec.effective_anchor_scale
    common = dict(min_size=spec.image_size, max_size=spec.image_size, image_mean=list(spec.mean),
                  image_std=list(spec.std), detections_per_img=spec.detections_per_image)
    if spec.name == "faster_rcnn":
        anchors = AnchorGenerator(tuple((round(k * s, 2),) for s in backbone.strides), ((0.5, 1.0, 2.0),) * num_levels)
        pool = MultiScaleRoIAlign([str(i) for i in range(num_levels - 1)], output_size=7, sampling_ratio=2)
        return FasterRCNN(backbone, num_classes=spec.num_classes + 1, rpn_anchor_generator=anchors,
                          box_roi_pool=pool, box_score_thresh=spec.score_thresh, box_nms_thresh=spec.nms_thresh,
                          box_detections_per_img=spec.detections_per_image,
                          **{k_: v for k_, v in common.items() if k_ != "detections_per_img"})
    if spec.name == "retinanet":
        sizes = tuple(tuple(round(k * s / 2 * 2 ** (i / 3), 2) for i in range(3)) for s in backbone.strides)
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * num_levels)
        return RetinaNet(backbone, num_classes=spec.num_classes + 1, anchor_generator=anchors,
                         score_thresh=spec.score_thresh, nms_thresh=spec.nms_thresh, **common)
    # FCOS assigns objects to levels by anchor size (4..8 x anchor): one anchor per location, = stride.
    anchors = AnchorGenerator(tuple((float(s),) for s in backbone.strides), ((1.0,),) * num_levels)
    # Heads with GroupNorm of 16 groups instead of torchvision's 32: on a small image P7 is 1x1, and
    # with 32 groups of one channel a single image leaves one value per group, which GroupNorm refuses.
    norm = partial(nn.GroupNorm, FCOS_NORM_GROUPS)
    head = FCOSHead(backbone.out_channels, 1, spec.num_classes + 1)
    head.classification_head = FCOSClassificationHead(backbone.out_channels, 1, spec.num_classes + 1, norm_layer=norm)
    head.regression_head = FCOSRegressionHead(backbone.out_channels, 1, norm_layer=norm)
    return FCOS(backbone, num_classes=spec.num_classes + 1, anchor_generator=anchors, head=head,
                score_thresh=spec.score_thresh, nms_thresh=spec.nms_thresh, **common)


def load_backbone(body: nn.Module, state: dict[str, torch.Tensor], source_url: str = "") -> None:
    """Copy every tensor of the features_only body from a classification state dict (timm naming)."""
    wanted = body.state_dict()
    missing = [k for k in wanted if k not in state or state[k].shape != wanted[k].shape]
    if missing:
        raise CheckpointError(f"{source_url}: backbone weights missing or of another shape for the detector's "
                              f"features_only body: {', '.join(missing[:5])}")
    body.load_state_dict({k: state[k] for k in wanted}, strict=True)


def set_body_frozen(model: nn.Module, frozen: bool) -> None:
    """Freeze the timm body (FPN and heads keep training): the detection form of a linear probe."""
    for p in model.backbone.body.parameters():
        p.requires_grad_(not frozen)


def set_train_mode(model: nn.Module, *, body_frozen: bool) -> None:
    model.train()
    if body_frozen:
        model.backbone.body.eval()  # BN statistics of a frozen body stay the checkpoint's


def to_targets(targets: tuple[dict, ...], device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Reader targets -> torchvision's: crowd regions left out (as COCO training does), labels + 1."""
    out = []
    for t in targets:
        keep = t["iscrowd"] == 0
        out.append({"boxes": t["boxes"][keep].to(device), "labels": (t["labels"][keep] + 1).to(device)})
    return out


def load_detector(url: str, *, verify: bool = True):
    """(eval-mode detector, LoadedCheckpoint, DetectorSpec) of a detection checkpoint.

    A classification checkpoint is a CheckpointError that says so: it has no detector to run.
    """
    from pretrain.checkpoint import load_checkpoint

    ckpt = load_checkpoint(url, verify=verify)
    if ckpt.task != "detection":
        raise CheckpointError(f"{url}: a {ckpt.task} checkpoint ({ckpt.arch}, {ckpt.num_classes} classes), not a "
                              "detector; make one with megaclass finetune --task detection --checkpoint " + url)
    block = ckpt.megaclass.get("detector")
    if not isinstance(block, dict) or block.get("name") not in DETECTORS:
        raise CheckpointError(f"{url}: config.json megaclass.detector is missing or names no known detector")
    spec = DetectorSpec.from_dict(block)
    model, spec = create_detector(spec, ckpt.arch, ckpt.model_args)
    try:
        model.load_state_dict(ckpt.state_dict, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{url}: weights do not fit a {spec.name} on {ckpt.arch}: {str(exc)[:300]}") from None
    model.eval()
    return model, ckpt, spec
