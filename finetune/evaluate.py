"""Evaluate a checkpoint on a labelled dataset: top-1, top-5, per-class accuracy, confusion matrix.

    megaclass evaluate MODEL DATA [--out DIR]

MODEL is a contract-2 checkpoint; DATA a dataset URL or an image folder (ingested on the fly).
Data classes are matched to the model's by name, so a dataset numbered differently still scores
correctly; a data class the model does not know is a DatasetError listing the names. Writes
`report.json` and `confusion.png` (matplotlib, Agg backend) into --out.
"""

from __future__ import annotations

import logging
import posixpath
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import nn

from data_pipeline.dataset import atomic_write_bytes, atomic_write_json, class_names, join
from data_pipeline.reader import create_loader
from data_pipeline.transforms import INTERPOLATIONS, EvalTransform, create_eval_transform, normalize
from finetune.data import label_map, pick_split, resolve_dataset
from finetune.model import load_model

log = logging.getLogger(__name__)
MAX_CONFUSION_PLOT_CLASSES = 100  # beyond this a per-cell plot is unreadable; the JSON still has per-class


@dataclass
class EvalResult:
    """Counts from one pass over an evaluation split."""
    num_samples: int
    top1_correct: int
    top5_correct: int
    confusion: torch.Tensor  # [num_data_classes, num_model_classes] int64: true data class x predicted model class

    @property
    def top1(self) -> float:
        return self.top1_correct / max(1, self.num_samples)

    @property
    def top5(self) -> float:
        return self.top5_correct / max(1, self.num_samples)


def preprocessing(pretrained_cfg: dict, image_size: int = 0) -> tuple[int, float, tuple, tuple]:
    """(image_size, crop_pct, mean, std) from a checkpoint's pretrained_cfg (image_size 0 = its own)."""
    size = image_size or int(pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    crop_pct = float(pretrained_cfg.get("crop_pct", 0.875))
    mean = tuple(pretrained_cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(pretrained_cfg.get("std", (0.229, 0.224, 0.225)))
    return size, crop_pct, mean, std


def checkpoint_eval_transform(pretrained_cfg: dict, image_size: int = 0) -> EvalTransform:
    """The evaluation preprocessing a checkpoint records (input_size, crop_pct, interpolation)."""
    size, crop_pct, _, _ = preprocessing(pretrained_cfg, image_size)
    interpolation = pretrained_cfg.get("interpolation", "bilinear")
    # timm names also include "random" (a training-only choice): evaluate such a model bilinear
    return create_eval_transform(size, crop_pct, interpolation=interpolation if interpolation in INTERPOLATIONS
                                 else "bilinear")


@torch.no_grad()
def run_eval(model: nn.Module, loader, *, device: torch.device, mean, std, targets: torch.Tensor,
             num_model_classes: int, channels_last: bool = False, bf16: bool = False) -> EvalResult:
    """One pass: `targets[data class id]` is the model class id of that data class."""
    num_data_classes = len(targets)
    confusion = torch.zeros(num_data_classes, num_model_classes, dtype=torch.int64)
    top1 = top5 = seen = 0
    model.eval()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    for batch in loader:
        images = normalize(batch.images.to(device, non_blocking=True), mean, std)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = model(images).float()
        data_labels = batch.labels.cpu()
        labels = targets[data_labels].to(logits.device)
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        top1 += int((topk[:, 0] == labels).sum())
        top5 += int((topk == labels[:, None]).any(dim=1).sum())
        seen += len(labels)
        confusion.index_put_((data_labels, topk[:, 0].cpu()), torch.ones(len(labels), dtype=torch.int64),
                             accumulate=True)
    return EvalResult(seen, top1, top5, confusion)


def confusion_png(confusion: torch.Tensor, row_names: list[str], col_names: list[str], title: str) -> bytes:
    """A confusion-matrix heat map as PNG bytes (rows: true class, columns: predicted)."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(row_names), len(col_names))
    fig, ax = plt.subplots(figsize=(min(4 + 0.25 * n, 30), min(3.5 + 0.25 * n, 30)))
    image = ax.imshow(confusion.numpy(), cmap="Blues", interpolation="nearest", aspect="auto")
    fig.colorbar(image, ax=ax)
    fontsize = max(4, min(9, 300 // max(1, n)))
    ax.set_xticks(range(len(col_names)), col_names, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(len(row_names)), row_names, fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


class EvalData(NamedTuple):
    dataset_url: str
    split: str
    class_names: list[str]
    targets: torch.Tensor  # data class id -> model class id


def evaluation_data(data_url: str, model_url: str, model_names: list[str], *, split: str, cache_url: str,
                    resolve: Callable[[str, str], str] = resolve_dataset) -> EvalData:
    """The dataset behind `data_url` (`resolve` ingests what needs it), its split, and its classes
    matched to the model's by name (a class the model does not know is a DatasetError)."""
    dataset_url = resolve(data_url, cache_url)
    split = pick_split(dataset_url, split)
    names = class_names(dataset_url)
    return EvalData(dataset_url, split, names, label_map(names, model_names, f"{data_url} (vs the classes of {model_url})"))


def eval_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def lowest_per_class(per_class: dict[str, dict], key: str, what: str, fmt: str, count: int = 5) -> list[str]:
    """One line naming the `count` classes with the lowest `key` (None = not scored), or none."""
    scored = sorted((v[key], name) for name, v in per_class.items() if v[key] is not None)
    if not scored:
        return []
    return [f"lowest per-class {what}: " + ", ".join(f"{name} {value:{fmt}}" for value, name in scored[:count])]


def evaluate(model_url: str, data_url: str, *, split: str = "val", out_dir: str | None = None,
             batch_size: int = 64, num_workers: int = 2, image_size: int = 0, cache_url: str = "",
             device: str | None = None) -> dict:
    """Score `model_url` on `data_url`; returns (and, with out_dir, writes) the JSON report."""
    model, ckpt = load_model(model_url)
    dataset_url, split, data_names, targets = evaluation_data(data_url, model_url, ckpt.class_names, split=split,
                                                              cache_url=cache_url)
    size, _, mean, std = preprocessing(ckpt.pretrained_cfg, image_size)
    dev = eval_device(device)
    model.to(dev)
    loader = create_loader(dataset_url, split, batch_size_per_rank=batch_size, num_workers=num_workers,
                           transform=checkpoint_eval_transform(ckpt.pretrained_cfg, image_size), shuffle=False,
                           drop_last=False)
    result = run_eval(model, loader, device=dev, mean=mean, std=std, targets=targets,
                      num_model_classes=len(ckpt.class_names))
    report = build_report(result, data_names, ckpt.class_names, targets)
    # What the user named: an image folder is ingested into one 'train' split, so its own name
    # ("val", "holdout") titles the report, not that internal split.
    title = split if dataset_url == data_url else posixpath.basename(str(data_url).rstrip("/"))
    report.update({"model_url": model_url, "data_url": data_url, "dataset_url": dataset_url, "split": split,
                   "title": title, "image_size": size})
    if out_dir:
        small = len(data_names) <= MAX_CONFUSION_PLOT_CLASSES
        if small:
            # Columns restricted to the data's classes: a 1000-class model on 10 data classes stays legible.
            sub = result.confusion[:, targets]
            atomic_write_bytes(join(out_dir, "confusion.png"),
                               confusion_png(sub, data_names, data_names, f"{title}: top-1 {result.top1:.3f}"))
            report["confusion_png"] = join(out_dir, "confusion.png")
        atomic_write_json(join(out_dir, "report.json"), report)
    log.info("evaluate %s on %s/%s: top-1 %.4f top-5 %.4f (%d samples)", model_url, data_url, split,
             report["top1"], report["top5"], report["num_samples"])
    return report


def build_report(result: EvalResult, data_names: list[str], model_names: list[str], targets: torch.Tensor) -> dict:
    per_class = {}
    counts = result.confusion.sum(dim=1)
    for cid, name in enumerate(data_names):
        correct = int(result.confusion[cid, targets[cid]])
        total = int(counts[cid])
        per_class[name] = {"count": total, "correct": correct, "accuracy": correct / total if total else None}
    report = {"num_samples": result.num_samples, "top1": result.top1, "top5": result.top5,
              "num_classes": len(data_names), "per_class": per_class}
    if len(data_names) <= MAX_CONFUSION_PLOT_CLASSES:
        report["confusion_matrix"] = {"labels": data_names,
                                      "counts": result.confusion[:, targets].tolist()}
    return report


def format_report(report: dict) -> str:
    """A short human-readable summary for the CLI."""
    return "\n".join([f"top-1 {report['top1']:.4f}  top-5 {report['top5']:.4f}  ({report['num_samples']} images, "
                      f"{report['num_classes']} classes, {report['title']})",
                      *lowest_per_class(report["per_class"], "accuracy", "accuracy", ".2f")])
