"""Detection data in contract 1: a COCO instances JSON as an ingest source, boxes in each sample's json.

    table, fingerprint = read_coco_source("ann/instances_train.json")   # SourceError when malformed
    meta.update(scale_objects(row["objects"], image).meta)              # in the shard writer
    decoder = DetectionDecoder(image_size=64, hflip=0.5)                # in the reader: image + boxes

A COCO image becomes one row (its `file_name` relative to the JSON's folder, at any fsspec URL);
its annotations travel with the row as JSON and are written into the sample's `json` in the
stored image's pixels: `boxes` [[x0, y0, x1, y1]], `labels` (class ids), `iscrowd`, `ann_ids`,
`image_id`. Classes are the declared categories, sorted by name (dense ids, as classification).
A detection sample's `cls` is -1: it has no single class.

What a stranger's JSON can do wrong, and what happens:
* not JSON, wrong types, duplicate ids, an annotation whose image or category is not declared:
  `SourceError` naming the field (one line, before any work);
* a `file_name` that is absolute, climbs out of the folder or carries a URL scheme: the row is
  skipped with reason `unsafe_path` (nothing outside the JSON's folder is ever read);
* an image missing or undecodable: failed with the fetch/decode reason in the index, like any row;
* a box reaching outside the image: clipped to it; a box empty after clipping (or with w/h <= 0):
  dropped. Both are listed per image (`box_issues`) and counted in the manifest's `detection` block;
* `iscrowd=1`: kept and marked, excluded from training targets and treated by the evaluator as COCO
  does (detections matching a crowd region are ignored, not counted as false positives).
"""

from __future__ import annotations

import io
import json
import math
import posixpath
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import pyarrow as pa
from PIL import Image

from data_pipeline.source import SOURCE_SCHEMA, SourceError, row_keys

if TYPE_CHECKING:  # torch is imported by the reader side only: ingest workers never pay its seconds
    import torch

TASK = "detection"
OBJECTS_COLUMN = "objects"        # per row: JSON list of {"id", "bbox" [x, y, w, h], "class_id", "iscrowd"}
SKIP_COLUMN = "skip_reason"       # per row: a reason decided while reading the source, or null
IMAGE_ID_COLUMN = "image_id"      # per row: the COCO image id
CATEGORIES_META_KEY = b"megaclass.categories"
COCO_SCHEMA = pa.schema(list(SOURCE_SCHEMA) + [(OBJECTS_COLUMN, pa.string()), (SKIP_COLUMN, pa.string()),
                                               (IMAGE_ID_COLUMN, pa.int64())])
MIN_BOX_SIDE_PX = 1e-3            # in original pixels: narrower boxes are degenerate


def is_coco_json(url: str) -> bool:
    """A .json file whose content is one object with an `images` list (not JSON lines)."""
    if posixpath.splitext(url.rstrip("/"))[1].lower() != ".json":
        return False
    with fsspec.open(url, "rb") as f:
        head = f.read(1 << 16).lstrip()
    if not head.startswith(b"{"):
        return False
    return b'"images"' in head or b'"annotations"' in head or b'"categories"' in head


def _fail(url: str, where: str, problem: str) -> SourceError:
    return SourceError(f"COCO source {url}: {where}: {problem}")


def _require_int(value: Any, url: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(url, where, f"must be an integer, got {value!r:.40}")
    return value


def _unsafe(file_name: str) -> bool:
    if not file_name or "://" in file_name or file_name.startswith(("/", "\\")) or ":" in file_name.split("/")[0]:
        return True
    normalized = posixpath.normpath(file_name.replace("\\", "/"))
    return normalized == ".." or normalized.startswith("../")


def _categories(doc: dict, url: str) -> tuple[list[str], dict[int, int]]:
    """(class names sorted, {COCO category id: class id})."""
    cats = doc.get("categories")
    if not isinstance(cats, list) or not cats:
        raise _fail(url, "categories", "must be a non-empty list of {id, name}")
    by_id: dict[int, str] = {}
    for i, cat in enumerate(cats):
        if not isinstance(cat, dict):
            raise _fail(url, f"categories[{i}]", "must be an object {id, name}")
        cid = _require_int(cat.get("id"), url, f"categories[{i}].id")
        name = cat.get("name")
        if not isinstance(name, str) or not name.strip():
            raise _fail(url, f"categories[{i}].name", "must be a non-empty string")
        if cid in by_id:
            raise _fail(url, f"categories[{i}].id", f"duplicate id {cid}")
        by_id[cid] = name
    names = sorted(by_id.values())
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise _fail(url, "categories", f"duplicate name {dup!r}")
    index = {name: i for i, name in enumerate(names)}
    return names, {cid: index[name] for cid, name in by_id.items()}


def _bbox(value: Any, url: str, where: str) -> list[float]:
    if (not isinstance(value, list) or len(value) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
        raise _fail(url, where, f"must be [x, y, width, height] of 4 finite numbers, got {value!r:.60}")
    return [float(v) for v in value]


def read_coco_source(url: str) -> tuple[pa.Table, str]:
    """(table with COCO_SCHEMA and the class names in its metadata, sha256 of the JSON)."""
    import hashlib

    with fsspec.open(url, "rb") as f:
        raw = f.read()
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SourceError(f"COCO source {url}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise SourceError(f"COCO source {url}: the top level must be an object with images, annotations, categories")
    names, class_of = _categories(doc, url)
    images = doc.get("images")
    if not isinstance(images, list) or not images:
        raise _fail(url, "images", "must be a non-empty list of {id, file_name}")
    annotations = doc.get("annotations", [])
    if not isinstance(annotations, list):
        raise _fail(url, "annotations", "must be a list")

    row_of: dict[int, int] = {}
    file_names = []
    for i, image in enumerate(images):
        if not isinstance(image, dict):
            raise _fail(url, f"images[{i}]", "must be an object {id, file_name}")
        image_id = _require_int(image.get("id"), url, f"images[{i}].id")
        if image_id in row_of:
            raise _fail(url, f"images[{i}].id", f"duplicate image id {image_id}")
        name = image.get("file_name")
        if not isinstance(name, str):
            raise _fail(url, f"images[{i}].file_name", "must be a string (a path relative to the JSON's folder)")
        row_of[image_id] = i
        file_names.append(name)

    objects: list[list[dict]] = [[] for _ in images]
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            raise _fail(url, f"annotations[{i}]", "must be an object")
        image_id = _require_int(ann.get("image_id"), url, f"annotations[{i}].image_id")
        if image_id not in row_of:
            raise _fail(url, f"annotations[{i}].image_id", f"{image_id} is not an id in images")
        category = _require_int(ann.get("category_id"), url, f"annotations[{i}].category_id")
        if category not in class_of:
            raise _fail(url, f"annotations[{i}].category_id",
                        f"{category} is not declared in categories (declared: {sorted(class_of)[:20]})")
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1):
            raise _fail(url, f"annotations[{i}].iscrowd", f"must be 0 or 1, got {crowd!r:.20}")
        ann_id = ann.get("id", i)
        objects[row_of[image_id]].append({"id": _require_int(ann_id, url, f"annotations[{i}].id"),
                                          "bbox": _bbox(ann.get("bbox"), url, f"annotations[{i}].bbox"),
                                          "class_id": class_of[category], "iscrowd": int(crowd)})

    fs, path = fsspec.core.url_to_fs(url)
    folder = posixpath.dirname(path)
    urls, skips = [], []
    for name in file_names:
        if _unsafe(name):
            urls.append(None)
            skips.append("unsafe_path")
        else:
            urls.append(fs.unstrip_protocol(posixpath.join(folder, posixpath.normpath(name))))
            skips.append(None)
    n = len(images)
    table = pa.Table.from_arrays(
        [pa.array(range(n), pa.int64()), row_keys(n), pa.array(urls, pa.string()), pa.array([""] * n, pa.string()),
         pa.array([json.dumps(o, separators=(",", ":")) for o in objects], pa.string()),
         pa.array(skips, pa.string()), pa.array(list(row_of), pa.int64())],
        schema=COCO_SCHEMA.with_metadata({CATEGORIES_META_KEY: json.dumps(names).encode()}))
    return table, hashlib.sha256(raw).hexdigest()


def source_class_names(table: pa.Table) -> list[str] | None:
    """The declared categories of a COCO source table, or None for a classification source."""
    meta = table.schema.metadata or {}
    return json.loads(meta[CATEGORIES_META_KEY]) if CATEGORIES_META_KEY in meta else None


# ---- the planner and shard writer side (data_pipeline.ingest) ------------------------------------

def plan_classes(source: pa.Table, skip: np.ndarray) -> tuple[pa.Array, pa.Array]:
    """(class names, class ids -1) of a COCO source; its per-image skip reasons are applied to `skip`.

    The declared categories are the classes, every one even without boxes; a sample has no single class.
    """
    preset = np.array(source.column(SKIP_COLUMN).to_pylist(), dtype=object)
    given = np.array([p is not None for p in preset], dtype=bool)
    skip[given] = preset[given]
    return (pa.array(source_class_names(source), pa.string()),
            pa.array(np.full(source.num_rows, -1, dtype=np.int32)))


def with_objects(plan_table: pa.Table, source: pa.Table) -> pa.Table:
    """The plan table with the per-image objects and COCO image ids carried along to the shard writer."""
    for column in (OBJECTS_COLUMN, IMAGE_ID_COLUMN):
        plan_table = plan_table.append_column(column, source.column(column))
    return plan_table


@dataclass
class BoxCounts:
    """Per shard (and merged per dataset): what happened to the annotations."""
    boxes: int = 0          # kept, non-crowd
    crowd: int = 0          # kept, iscrowd=1
    clipped: int = 0        # kept after clipping to the image
    degenerate: int = 0     # dropped: empty after clipping, or width/height <= 0
    class_counts: dict[int, int] = field(default_factory=dict)  # kept non-crowd boxes per class id

    def add(self, other: "BoxCounts") -> None:
        self.boxes += other.boxes
        self.crowd += other.crowd
        self.clipped += other.clipped
        self.degenerate += other.degenerate
        for cid, count in other.class_counts.items():
            self.class_counts[int(cid)] = self.class_counts.get(int(cid), 0) + count

    def as_dict(self) -> dict:
        return {"boxes": self.boxes, "crowd": self.crowd, "clipped": self.clipped, "degenerate": self.degenerate,
                "class_counts": {str(k): v for k, v in sorted(self.class_counts.items())}}

    @classmethod
    def from_dict(cls, d: dict) -> "BoxCounts":
        return cls(d["boxes"], d["crowd"], d["clipped"], d["degenerate"],
                   {int(k): int(v) for k, v in d.get("class_counts", {}).items()})


def sample_fields(row: dict, image: Any, counts: "BoxCounts") -> dict:
    """The sample-json fields of one stored image (a data_pipeline.image.ProcessedImage); adds to `counts`."""
    fields, image_counts = scale_objects(row[OBJECTS_COLUMN], original_size=(image.original_width, image.original_height),
                                         stored_size=(image.width, image.height), image_id=row[IMAGE_ID_COLUMN])
    counts.add(image_counts)
    return fields


def class_counts(box_counts: dict) -> tuple[list[int], list[int]]:
    """(class ids, kept non-crowd boxes) of a shard's BoxCounts.as_dict(): what classes.parquet counts."""
    per_class = sorted((int(k), v) for k, v in box_counts["class_counts"].items())
    return [k for k, _ in per_class], [v for _, v in per_class]


def manifest_fields(split_counts: list[tuple[str, dict | None]], splits: list[str]) -> dict:
    """manifest.json's `task` and `detection` (box counts per split and in all) from the shard results."""
    def total(wanted: set[str]) -> dict:
        merged = BoxCounts()
        for split, counts in split_counts:
            if split in wanted and counts:
                merged.add(BoxCounts.from_dict(counts))
        return {k: v for k, v in merged.as_dict().items() if k != "class_counts"}
    return {"task": TASK, "detection": {**{s: total({s}) for s in splits}, "all": total(set(splits))}}


def scale_objects(objects_json: str, *, original_size: tuple[int, int], stored_size: tuple[int, int],
                  image_id: int) -> tuple[dict, BoxCounts]:
    """Sample-json fields for one image's annotations, boxes in stored pixels; and the counts."""
    ow, oh = original_size
    sx, sy = stored_size[0] / ow, stored_size[1] / oh
    counts = BoxCounts()
    boxes, labels, crowd, ann_ids, issues = [], [], [], [], []
    for obj in json.loads(objects_json):
        x, y, w, h = obj["bbox"]
        x0, y0, x1, y1 = max(0.0, x), max(0.0, y), min(float(ow), x + w), min(float(oh), y + h)
        if w <= 0 or h <= 0 or x1 - x0 < MIN_BOX_SIDE_PX or y1 - y0 < MIN_BOX_SIDE_PX:
            counts.degenerate += 1
            issues.append({"ann_id": obj["id"], "issue": "degenerate_dropped"})
            continue
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            counts.clipped += 1
            issues.append({"ann_id": obj["id"], "issue": "clipped"})
        boxes.append([round(x0 * sx, 3), round(y0 * sy, 3), round(x1 * sx, 3), round(y1 * sy, 3)])
        labels.append(obj["class_id"])
        crowd.append(obj["iscrowd"])
        ann_ids.append(obj["id"])
        if obj["iscrowd"]:
            counts.crowd += 1
        else:
            counts.boxes += 1
            counts.class_counts[obj["class_id"]] = counts.class_counts.get(obj["class_id"], 0) + 1
    meta = {"image_id": image_id, "boxes": boxes, "labels": labels, "iscrowd": crowd, "ann_ids": ann_ids}
    if issues:
        meta["box_issues"] = issues
    return meta, counts


# ---- the reader side --------------------------------------------------------------------------

def read_targets(meta: dict) -> dict[str, torch.Tensor]:
    """Boxes (float32 [N, 4] xyxy, stored px), labels (int64 class ids), iscrowd (uint8) of a sample json."""
    import torch

    boxes = torch.tensor(meta["boxes"], dtype=torch.float32).reshape(-1, 4)
    labels = torch.tensor(meta["labels"], dtype=torch.int64)
    crowd = torch.tensor(meta.get("iscrowd", [0] * len(labels)), dtype=torch.uint8)
    if not (len(boxes) == len(labels) == len(crowd)):
        raise ValueError(f"boxes/labels/iscrowd lengths differ: {len(boxes)}, {len(labels)}, {len(crowd)}")
    return {"boxes": boxes, "labels": labels, "iscrowd": crowd}


class DetectionDecoder:
    """A reader decoder: sample -> (uint8 [3, S, S], target); picklable for loader workers.

    Every image is resized to a square of `image_size` px (boxes scaled with it), so a batch stacks
    and small images are not upscaled further by the detector. Training flips horizontally with
    probability `hflip`, drawn from the reader's seeded rng (a resumed epoch sees the same flips).
    Target: boxes/labels/iscrowd in the resized frame, plus image_id, key, and the stored size (w, h).
    """

    def __init__(self, image_size: int, hflip: float = 0.0, num_classes: int | None = None):
        self.image_size = image_size
        self.hflip = hflip
        self.num_classes = num_classes

    def __call__(self, sample: dict[str, Any], rng: random.Random) -> tuple[torch.Tensor, dict]:
        import torch

        meta = json.loads(sample["json"])
        target = read_targets(meta)
        if self.num_classes is not None and len(target["labels"]) and not (
                0 <= int(target["labels"].min()) and int(target["labels"].max()) < self.num_classes):
            raise ValueError(f"label outside [0, {self.num_classes})")
        img = Image.open(io.BytesIO(sample["jpg"]))
        width, height = img.size
        size = self.image_size
        if img.format == "JPEG":
            img.draft("RGB", (size, size))
        img = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        boxes = target["boxes"] * torch.tensor([size / width, size / height] * 2)
        if self.hflip and rng.random() < self.hflip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            boxes = torch.stack([size - boxes[:, 2], boxes[:, 1], size - boxes[:, 0], boxes[:, 3]], dim=1)
        array = np.asarray(img, dtype=np.uint8)
        image = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
        target.update(boxes=boxes, image_id=int(meta.get("image_id", -1)), key=str(sample.get("__key__", "")),
                      stored_size=(width, height))
        return image, target


def dataset_task(dataset_url: str) -> str:
    """'detection' for a dataset ingested from COCO, 'classification' otherwise (from manifest.json)."""
    from data_pipeline.dataset import read_manifest

    return read_manifest(dataset_url).get("task", "classification")
