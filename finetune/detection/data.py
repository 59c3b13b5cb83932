"""Detection data: a COCO instances JSON (ingested once into a cached dataset) or a detection dataset.

    url = resolve_detection_dataset("s3://b/ann/instances_val.json", cache_url)   # -> dataset URL
    plan = prepare_detection_data(train="ann/train.json", val="ann/val.json", cache_url="")

A COCO JSON is ingested with the ingest module's three pure steps, in this process (finetune may not
import cluster/), into CACHE/coco/<fingerprint>, where the fingerprint covers the JSON's bytes and its
URL; a second run over the same JSON reuses it. Images are read relative to the JSON's folder. The
result is a contract-1 dataset with `task: detection` in its manifest, so the reader, resume and DDP
sharding are classification's. A classification dataset given here (or the reverse) is one
DatasetError that says which task each side is.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from dataclasses import dataclass

import fsspec
import torch

from data_pipeline.dataset import DatasetError, MANIFEST_FILE, class_names, exists, join, split_shards
from data_pipeline.detection import TASK, dataset_task, is_coco_json
from finetune.data import default_cache_url, label_map, pick_split

log = logging.getLogger(__name__)
INGEST_IMAGE_SIZE = 256  # px, stored shorter side (boxes are scaled with the image)


def coco_fingerprint(url: str) -> str:
    h = hashlib.sha256(url.encode())
    with fsspec.open(url, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:20]


def resolve_detection_dataset(url: str, cache_url: str = "") -> str:
    """A detection dataset URL for `url` (itself, or the cached ingest of a COCO JSON)."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.isdir(path):
        if not fs.exists(path):
            raise DatasetError(f"{url}: no such file or dataset")
        if not is_coco_json(url):
            raise DatasetError(f"{url}: not a COCO instances JSON (an object with images, annotations, "
                               "categories) nor a dataset folder")
        cached = join(cache_url or default_cache_url(), "coco", coco_fingerprint(url))
        if exists(join(cached, MANIFEST_FILE)):
            log.info("COCO %s: using cached dataset %s", url, cached)
        else:
            log.info("COCO %s: ingesting into %s", url, cached)
            ingest_coco(url, cached)
        url = cached
    task = dataset_task(url)
    if task != TASK:
        raise DatasetError(f"{url}: a {task} dataset; detection needs a COCO JSON or a dataset ingested from one")
    return url


def ingest_coco(json_url: str, out_url: str, *, image_size: int = INGEST_IMAGE_SIZE) -> dict:
    """Ingest a COCO JSON into a one-split ('train') detection dataset at `out_url`; returns the manifest."""
    from data_pipeline.config import from_dict
    from data_pipeline.ingest import IngestConfig, IngestError, finalize, plan_shards, write_shard

    name = posixpath.splitext(posixpath.basename(json_url.rstrip("/")))[0] or "coco"
    cfg = from_dict(IngestConfig, {"image": {"image_size": image_size}, "fetch": {"threads": 4},
                                   "output": {"name": name}, "runtime": {"progress": False}})
    plan = plan_shards(json_url, out_url, cfg)
    results = [write_shard(plan.task(i), cfg) for i in range(plan.num_tasks)]
    try:
        manifest = finalize(plan, results, cfg)
    except IngestError as exc:
        raise DatasetError(f"COCO {json_url}: {exc}") from None
    for split, totals in manifest["totals"].items():
        if totals["failed"] or totals["skipped"]:
            log.warning("COCO %s (%s): %d image(s) not usable (%s), recorded in %s/index", json_url, split,
                        totals["failed"] + totals["skipped"], ", ".join(totals["reasons"]), out_url)
    boxes = manifest["detection"]["all"]
    if boxes["clipped"] or boxes["degenerate"]:
        log.warning("COCO %s: %d box(es) clipped to their image, %d degenerate dropped (listed per image as "
                    "box_issues in the samples; counts in manifest.json)", json_url, boxes["clipped"], boxes["degenerate"])
    return manifest


@dataclass(frozen=True)
class DetectionData:
    train_url: str
    train_split: str
    val_url: str
    val_split: str
    class_names: list[str]
    val_targets: torch.Tensor  # val class id -> train class id
    num_train_samples: int


def prepare_detection_data(train: str, val: str, *, train_split: str, cache_url: str) -> DetectionData:
    train_url = resolve_detection_dataset(train, cache_url)
    val_url = resolve_detection_dataset(val, cache_url) if val else train_url
    train_split = pick_split(train_url, train_split)
    if val:
        val_split = pick_split(val_url, "val")
    else:
        from data_pipeline.dataset import read_manifest
        if "val" not in read_manifest(train_url).get("splits", {}):
            raise DatasetError(f"{train}: has no 'val' split; give validation data (--val COCO.json)")
        val_split = "val"
    names = class_names(train_url)
    targets = label_map(class_names(val_url), names, f"validation data {val or train} (vs train {train})")
    num_train = sum(n for _, n in split_shards(train_url, train_split))
    return DetectionData(train_url, train_split, val_url, val_split, names, targets, num_train)
