"""Downstream data: dataset URLs or image folders, split choice, and class mapping between label sets.

`DATA` is either a dataset (contract 1, written by `megaclass ingest`) or an image folder
`ROOT/<class>/<image>`. A folder is ingested on the fly with the same ingest code, into a cache
keyed by a fingerprint of the folder (its path and every file's size and mtime), so the reader
serves both forms and a second run over an unchanged folder reuses the cache.

Class ids are matched by *name*: a validation set or a model may number its classes differently
from the train set, and a class present in one but missing in the other is a `DatasetError`
that lists the names.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import fsspec
import pyarrow.parquet as pq
import torch

from data_pipeline.dataset import (DatasetError, INDEX_DIR, MANIFEST_FILE, class_names, exists, join,
                                   read_classes, read_manifest, split_shards)

log = logging.getLogger(__name__)


def default_cache_url() -> str:
    return os.environ.get("MEGACLASS_CACHE") or str(Path.home() / ".cache" / "megaclass")


def is_image_folder(url: str) -> bool:
    """A local directory that is not a dataset: ROOT/<class>/<image>."""
    path = Path(url)
    return path.is_dir() and not (path / MANIFEST_FILE).exists()


def folder_fingerprint(root: str | Path) -> str:
    """sha256 over the folder's absolute path and (relative path, size, mtime_ns) of every file."""
    root = Path(root).resolve()
    h = hashlib.sha256(str(root).encode())
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        h.update(f"\0{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def check_folder_classes(root: str | Path) -> list[str]:
    """Class names (sub-directories) of an image folder; DatasetError for empty ones or none at all."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetError(f"{root}: no class folders; expected ROOT/<class>/<image>")
    empty = [c for c in classes if not any(f.is_file() for f in (root / c).rglob("*"))]
    if empty:
        raise DatasetError(f"{root}: empty class folder(s): {', '.join(empty)}")
    return classes


def resolve_dataset(url: str, cache_url: str = "") -> str:
    """A dataset URL for `url`: itself when it is a dataset, else the cached ingest of the image folder."""
    if not is_image_folder(url):
        read_manifest(url)  # a clear DatasetError for a missing or foreign path
        return url
    check_folder_classes(url)
    cached = join(cache_url or default_cache_url(), "image-folders", folder_fingerprint(url))
    if exists(join(cached, MANIFEST_FILE)):
        log.info("image folder %s: using cached dataset %s", url, cached)
        return cached
    log.info("image folder %s: ingesting into %s", url, cached)
    ingest_image_folder(str(Path(url).resolve()), cached)
    return cached


def ingest_image_folder(root: str, out_url: str, *, image_size: int = 256) -> None:
    """Ingest ROOT/<class>/<image> into a dataset at `out_url`, every image in one 'train' split.
    Non-images are recorded in the index as failed rows."""
    manifest = ingest_here(root, out_url, name=Path(root).name or "folder", image_size=image_size,
                           what="image folder")
    totals = manifest.get("totals", {})
    failed = sum(t.get("failed", 0) + t.get("skipped", 0) for t in totals.values())
    if failed:
        log.warning("image folder %s: %d file(s) not usable, recorded in %s/index (e.g. not an image)",
                    root, failed, out_url)


def ingest_here(source: str, out_url: str, *, name: str, image_size: int, what: str) -> dict:
    """Ingest `source` (an image folder, a COCO JSON) into a one-split ('train') dataset at `out_url`
    with the ingest module's three pure steps, in this process (finetune may not import cluster/, and
    downstream data is small); returns the manifest. The dataset counts as present only once
    manifest.json, written last, exists. An ingest failure is a DatasetError naming `what` and `source`."""
    from data_pipeline.config import from_dict
    from data_pipeline.ingest import IngestConfig, IngestError, finalize, plan_shards, write_shard

    cfg = from_dict(IngestConfig, {"image": {"image_size": image_size}, "fetch": {"threads": 4},
                                   "output": {"name": name}, "runtime": {"progress": False}})
    plan = plan_shards(source, out_url, cfg)
    results = [write_shard(plan.task(i), cfg) for i in range(plan.num_tasks)]
    try:
        return finalize(plan, results, cfg)
    except IngestError as exc:
        raise DatasetError(f"{what} {source}: {exc}") from None


def pick_split(dataset_url: str, preferred: str) -> str:
    """`preferred` when the dataset has it, else its only split; DatasetError otherwise."""
    splits = sorted(read_manifest(dataset_url).get("splits", {}))
    if preferred in splits:
        return preferred
    if len(splits) == 1:
        return splits[0]
    raise DatasetError(f"{dataset_url}: no split {preferred!r} (has: {', '.join(splits) or 'none'})")


def split_class_counts(dataset_url: str, split: str) -> dict[int, int] | None:
    """{class id: ok samples in `split`} from the index; None for a dataset without index/."""
    fs, path = fsspec.core.url_to_fs(join(dataset_url, INDEX_DIR))
    parts = sorted(fs.glob(path.rstrip("/") + "/*.parquet"))
    if not parts:
        return None
    counts: dict[int, int] = {}
    for part in parts:
        with fs.open(part, "rb") as f:
            table = pq.read_table(f, columns=["class_id", "status", "split"])
        for cid, status, sp in zip(*(table.column(c).to_pylist() for c in ("class_id", "status", "split"))):
            if status == "ok" and sp == split and cid is not None:
                counts[cid] = counts.get(cid, 0) + 1
    return counts


def skipped_samples(dataset_url: str) -> list[dict]:
    """Rows the ingest recorded as failed or skipped (e.g. non-images in a folder): url, status, reason."""
    fs, path = fsspec.core.url_to_fs(join(dataset_url, INDEX_DIR))
    rows = []
    for part in sorted(fs.glob(path.rstrip("/") + "/*.parquet")):
        with fs.open(part, "rb") as f:
            table = pq.read_table(f, columns=["url", "status", "reason"])
        rows.extend(r for r in table.to_pylist() if r["status"] != "ok")
    return rows


def check_train_classes(dataset_url: str, split: str) -> list[str]:
    """Class names of the train split; DatasetError naming every class without a usable image."""
    names = class_names(dataset_url)
    counts = split_class_counts(dataset_url, split)
    if counts is None:  # no index (hand-made dataset): fall back to the totals of classes.parquet
        table = read_classes(dataset_url).sort_by("id")
        counts = dict(enumerate(table.column("count").to_pylist()))
    empty = [name for cid, name in enumerate(names) if counts.get(cid, 0) == 0]
    if empty:
        raise DatasetError(f"{dataset_url} split {split!r}: no usable images for class(es): {', '.join(empty)}")
    return names


def label_map(source_names: list[str], target_names: list[str], what: str) -> torch.Tensor:
    """int64 tensor t with t[source id] = target id, matched by name; DatasetError lists unknown names."""
    index = {name: i for i, name in enumerate(target_names)}
    missing = [name for name in source_names if name not in index]
    if missing:
        shown = ", ".join(missing[:20]) + (f" (+{len(missing) - 20} more)" if len(missing) > 20 else "")
        raise DatasetError(f"{what}: {len(missing)} class(es) not among the {len(target_names)} known ones: {shown}")
    return torch.tensor([index[name] for name in source_names], dtype=torch.int64)


@dataclass(frozen=True)
class DataPlan:
    """The data of a fine-tuning run, resolved: datasets, splits, classes and sizes."""
    train_url: str
    train_split: str
    val_url: str
    val_split: str
    class_names: list[str]
    val_targets: torch.Tensor  # val class id -> train class id
    num_train_samples: int
    num_val_samples: int


def plan_data(train_url: str, val_url: str, *, train_split: str, train_classes: Callable[[str, str], list[str]],
              no_val_split: Exception, what: str) -> DataPlan:
    """The splits, classes and sizes of resolved datasets; an empty `val_url` means the train dataset's
    'val' split (`no_val_split` is raised when it has none). `train_classes(url, split)` gives the class
    names; the validation classes are matched to them by name (`what` names the pair in an error)."""
    train_split = pick_split(train_url, train_split)
    if val_url:
        val_split = pick_split(val_url, "val")
    elif "val" in read_manifest(train_url).get("splits", {}):
        val_url, val_split = train_url, "val"
    else:
        raise no_val_split
    names = train_classes(train_url, train_split)
    targets = label_map(class_names(val_url), names, what)
    return DataPlan(train_url, train_split, val_url, val_split, names, targets,
                    sum(n for _, n in split_shards(train_url, train_split)),
                    sum(n for _, n in split_shards(val_url, val_split)))
