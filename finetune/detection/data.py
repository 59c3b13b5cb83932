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

import fsspec

from data_pipeline.dataset import DatasetError, MANIFEST_FILE, class_names, exists, join
from data_pipeline.detection import TASK, dataset_task, is_coco_json
from finetune.data import DataPlan, default_cache_url, ingest_here, plan_data

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
    name = posixpath.splitext(posixpath.basename(json_url.rstrip("/")))[0] or "coco"
    manifest = ingest_here(json_url, out_url, name=name, image_size=image_size, what="COCO")
    for split, totals in manifest["totals"].items():
        if totals["failed"] or totals["skipped"]:
            log.warning("COCO %s (%s): %d image(s) not usable (%s), recorded in %s/index", json_url, split,
                        totals["failed"] + totals["skipped"], ", ".join(totals["reasons"]), out_url)
    boxes = manifest["detection"]["all"]
    if boxes["clipped"] or boxes["degenerate"]:
        log.warning("COCO %s: %d box(es) clipped to their image, %d degenerate dropped (listed per image as "
                    "box_issues in the samples; counts in manifest.json)", json_url, boxes["clipped"], boxes["degenerate"])
    return manifest


def prepare_detection_data(train: str, val: str, *, train_split: str, cache_url: str) -> DataPlan:
    train_url = resolve_detection_dataset(train, cache_url)
    val_url = resolve_detection_dataset(val, cache_url) if val else ""
    return plan_data(train_url, val_url, train_split=train_split, train_classes=lambda url, _: class_names(url),
                     no_val_split=DatasetError(f"{train}: has no 'val' split; give validation data (--val COCO.json)"),
                     what=f"validation data {val or train} (vs train {train})")
