"""Evaluate a detector: COCO mAP@[.5:.95], mAP@.5, mAP@.75 and per-class AP with pycocotools.

    megaclass evaluate RUN/final VAL --out DIR      (VAL: a COCO JSON or a detection dataset)

Ground truth and detections are compared in the loader's frame (every image resized to the
detector's square input): IoU of axis-aligned boxes does not change under a per-axis scaling, so
the APs equal those in original pixels. Crowd boxes are passed as `iscrowd` and handled by
pycocotools as COCO does. Writes DIR/report.json (map, map_50, map_75, per_class, ...) and
DIR/predictions.png (a few validation images: ground truth dashed green, detections red).
"""

from __future__ import annotations

import contextlib
import io
import logging
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn

from data_pipeline.dataset import DatasetError, atomic_write_bytes, atomic_write_json, join
from data_pipeline.detection import DetectionDecoder
from data_pipeline.reader import create_loader
from finetune.evaluate import eval_device, evaluation_data, lowest_per_class

log = logging.getLogger(__name__)
PNG_IMAGES = 6


@torch.no_grad()
def run_detection(model: nn.Module, loader, *, device: torch.device, targets_map: torch.Tensor | None = None,
                  bf16: bool = False, keep_images: int = 0):
    """One pass: (ground truth per image, detections per image, the first `keep_images` uint8 images).

    Labels are class ids (the detector's label - 1); `targets_map[data class id]` = model class id.
    """
    model.eval()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    truths, detections, images = [], [], []
    for batch in loader:
        if not batch.keys:
            continue
        with autocast:
            outputs = model([im.to(device).float().div_(255) for im in batch.images])
        for image, target, out in zip(batch.images, batch.targets, outputs):
            labels = target["labels"] if targets_map is None else targets_map[target["labels"]]
            truths.append({"boxes": target["boxes"], "labels": labels, "iscrowd": target["iscrowd"],
                           "key": target["key"]})
            detections.append({"boxes": out["boxes"].float().cpu(), "scores": out["scores"].float().cpu(),
                               "labels": out["labels"].cpu() - 1})
            if len(images) < keep_images:
                images.append(image)
    return truths, detections, images


def _xywh(box: list[float]) -> list[float]:
    return [box[0], box[1], box[2] - box[0], box[3] - box[1]]


def coco_metrics(truths: list[dict], detections: list[dict], names: list[str], image_size: int) -> dict:
    """COCO bbox metrics of per-image ground truth and detections (xyxy boxes, 0-based class ids)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images = [{"id": i, "width": image_size, "height": image_size} for i in range(len(truths))]
    annotations = []
    for i, t in enumerate(truths):
        for box, label, crowd in zip(t["boxes"].tolist(), t["labels"].tolist(), t["iscrowd"].tolist()):
            xywh = _xywh(box)
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(label) + 1,
                                "bbox": xywh, "area": xywh[2] * xywh[3], "iscrowd": int(crowd)})
    if not any(a["iscrowd"] == 0 for a in annotations):
        raise DatasetError("the evaluation data has no (non-crowd) boxes: nothing to score")
    results = [{"image_id": i, "category_id": int(label) + 1, "bbox": _xywh(box), "score": float(score)}
               for i, d in enumerate(detections)
               for box, score, label in zip(d["boxes"].tolist(), d["scores"].tolist(), d["labels"].tolist())]
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(names)]
    per_class = {name: {"ap": None, "ap_50": None,
                        "num_boxes": sum(1 for a in annotations if a["category_id"] == k + 1 and not a["iscrowd"])}
                 for k, name in enumerate(names)}
    report = {"map": 0.0, "map_50": 0.0, "map_75": 0.0, "per_class": per_class, "num_images": len(truths),
              "num_boxes": sum(1 for a in annotations if not a["iscrowd"]), "num_detections": len(results)}
    if not results:  # pycocotools cannot load an empty result list: nothing detected scores 0
        for entry in per_class.values():
            entry.update(ap=0.0 if entry["num_boxes"] else None, ap_50=0.0 if entry["num_boxes"] else None)
        return report
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations, "categories": categories}
        gt.createIndex()
        dt = gt.loadRes(results)
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    report.update(map=max(0.0, float(stats[0])), map_50=max(0.0, float(stats[1])), map_75=max(0.0, float(stats[2])))
    precision = evaluator.eval["precision"]  # [iou thresholds, recall points, classes, areas, max dets]
    for k, cat_id in enumerate(evaluator.params.catIds):
        all_iou = precision[:, :, k, 0, -1]
        at_50 = precision[0, :, k, 0, -1]
        name = names[cat_id - 1]
        per_class[name]["ap"] = float(np.mean(all_iou[all_iou > -1])) if (all_iou > -1).any() else None
        per_class[name]["ap_50"] = float(np.mean(at_50[at_50 > -1])) if (at_50 > -1).any() else None
    return report


def predictions_png(images: list[torch.Tensor], truths: list[dict], detections: list[dict], names: list[str],
                    *, min_score: float = 0.3, title: str = "") -> bytes:
    """A grid of images: ground truth (dashed green) and detections >= min_score (red, label and score)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = max(1, len(images))
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, truth, det in zip(axes.flat, images, truths, detections):
        ax.imshow(image.permute(1, 2, 0).numpy())
        for box in truth["boxes"].tolist():
            ax.add_patch(Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False,
                                   edgecolor="lime", linestyle="--", linewidth=1.2))
        for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
            if score < min_score:
                continue
            ax.add_patch(Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False,
                                   edgecolor="red", linewidth=1.2))
            ax.text(box[0], box[1], f"{names[label]} {score:.2f}", color="white", fontsize=6,
                    bbox={"facecolor": "red", "alpha": 0.6, "pad": 1, "linewidth": 0})
        ax.set_title(truth.get("key", ""), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def evaluate_detection(model_url: str, data_url: str, *, split: str = "val", out_dir: str | None = None,
                       batch_size: int = 16, num_workers: int = 2, cache_url: str = "",
                       device: str | None = None) -> dict:
    """Score a detector checkpoint on a COCO JSON or detection dataset; returns (and writes) the report."""
    from finetune.detection.data import resolve_detection_dataset
    from finetune.detection.model import load_detector

    model, ckpt, spec = load_detector(model_url)
    dataset_url, split, _, targets_map = evaluation_data(data_url, model_url, ckpt.class_names, split=split,
                                                         cache_url=cache_url, resolve=resolve_detection_dataset)
    dev = eval_device(device)
    model.to(dev)
    loader = create_loader(dataset_url, split, batch_size_per_rank=batch_size, num_workers=num_workers,
                           decoder=DetectionDecoder(spec.image_size), shuffle=False, drop_last=False)
    truths, detections, images = run_detection(model, loader, device=dev, targets_map=targets_map,
                                               keep_images=PNG_IMAGES if out_dir else 0)
    report = coco_metrics(truths, detections, ckpt.class_names, spec.image_size)
    report.update({"task": "detection", "detector": spec.name, "model_url": model_url, "data_url": data_url,
                   "dataset_url": dataset_url, "split": split, "image_size": spec.image_size,
                   "num_bad_samples": loader.num_bad_samples})
    if out_dir:
        png = predictions_png(images, truths[:len(images)], detections[:len(images)], ckpt.class_names,
                              title=f"{split}: mAP {report['map']:.3f}, mAP@.5 {report['map_50']:.3f}")
        atomic_write_bytes(join(out_dir, "predictions.png"), png)
        report["predictions_png"] = join(out_dir, "predictions.png")
        atomic_write_json(join(out_dir, "report.json"), report)
    log.info("evaluate %s on %s/%s: mAP %.4f mAP@.5 %.4f mAP@.75 %.4f (%d images)", model_url, data_url, split,
             report["map"], report["map_50"], report["map_75"], report["num_images"])
    return report


def format_detection_report(report: dict) -> str:
    return "\n".join([f"mAP {report['map']:.4f}  mAP@.5 {report['map_50']:.4f}  mAP@.75 {report['map_75']:.4f}  "
                      f"({report['num_images']} images, {report['num_boxes']} boxes, split {report['split']})",
                      *lowest_per_class(report["per_class"], "ap", "AP", ".3f")])
