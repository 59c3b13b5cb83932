"""`--retry-failed`: fetch again only the rows whose recorded reason is transient, in a finished dataset.

    summary = retry_failed("out/", cfg)   # cfg: timeouts, threads and retries of this pass

Every index part with a transient failure (timeout, connection error, temporary DNS failure,
HTTP 408/429/5xx, truncated body) is redone: those rows are fetched again, the part's shard is
rebuilt from its stored samples plus the newly fetched ones in row order (exactly the shard a run
that had fetched them the first time would have written) and written atomically, then its index
part. Parts without such rows, and their shards, are not touched. Last, classes.parquet,
manifest.json (with the pass recorded under `retry_passes`) and _info.json are rewritten. An
interrupted pass is completed by running it again.

Detection datasets work the same way: their index parts carry each row's COCO objects and image
id, from which a newly fetched image's boxes are scaled into its sample exactly as the first run
would have; the part's box counts and the manifest's `detection` block are updated with them.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_pipeline import dataset, detection
from data_pipeline.config import ConfigError
from data_pipeline.fetch import is_transient
from data_pipeline.ingest import PART_META_KEY, IngestConfig, json_value, process_rows, summary_table


def _transient_mask(index: pa.Table) -> np.ndarray:
    failed = pc.equal(index.column("status"), "failed").to_numpy(zero_copy_only=False)
    reasons = index.column("reason").to_pylist()
    return failed & np.array([bool(r) and is_transient(r) for r in reasons], dtype=bool)


def _retry_part(out_url: str, part_url: str, index: pa.Table, mask: np.ndarray, cfg: IngestConfig,
                keep: list[str], schemes: tuple) -> tuple[pa.Table, int]:
    """The part with its transient rows fetched again; writes the rebuilt shard. Returns (index, recovered)."""
    meta = json.loads((index.schema.metadata or {}).get(PART_META_KEY, b"{}"))
    # detection: a recovered image adds its boxes to the shard's counts
    box_counts = detection.BoxCounts.from_dict(meta["box_counts"]) if "box_counts" in meta else None
    rows = index.to_pylist()
    split = rows[0]["split"]
    old_shard = dataset.ShardRecord(**meta["shard"]) if meta.get("shard") else None
    fetch_opts = dataclasses.replace(cfg.fetch_options(), allow_schemes=schemes)
    image_opts = cfg.image_options()
    todo = [dict(rows[i], skip_reason=None) for i in np.flatnonzero(mask)]
    outcomes = dict(zip(np.flatnonzero(mask).tolist(), process_rows(todo, fetch_opts, image_opts, cfg.fetch.threads)))

    shard_url = dataset.join(out_url, dataset.SHARDS_DIR, old_shard.name) if old_shard else None
    stored = {s["__key__"]: s for s in dataset.iter_shard(shard_url)} if shard_url else {}
    samples, recovered = [], 0
    for i, row in enumerate(rows):
        outcome = outcomes.get(i)
        if outcome is not None:
            image = outcome.get("image")
            row.update(status=outcome["status"], reason=outcome["reason"],
                       attempts=(row["attempts"] or 0) + outcome["attempts"])
            if image is not None:
                recovered += 1
                row.update(width=image.width, height=image.height, bytes=len(image.jpg),
                           sha256=dataset.sha256_bytes(image.jpg))
                sample_meta = {"url": row["url"], "label": row["label"], "width": image.original_width,
                               "height": image.original_height}
                sample_meta.update({name: json_value(row[name]) for name in keep})
                if box_counts is not None:
                    sample_meta.update(detection.sample_fields(row, image, box_counts))
                samples.append(dataset.encode_sample(row["key"], image.jpg, row["class_id"], sample_meta))
                continue
        if row["status"] == "ok":
            samples.append(stored[row["key"]])
    shard_name = old_shard.name if old_shard else None
    if samples:
        if shard_name is None:  # the first ok sample of this part: its shard is named from the task's split
            task_id = int(part_url.rsplit("-", 1)[-1].split(".")[0])
            shard_name = _shard_name_for(out_url, split, task_id)
        for row in rows:
            if row["status"] == "ok":
                row["shard"] = shard_name
        shard = dataset.write_shard(dataset.join(out_url, dataset.SHARDS_DIR, shard_name), samples)
    else:
        shard = None
    new_index = pa.Table.from_pylist(rows, schema=index.schema.remove_metadata())
    meta["shard"] = dataclasses.asdict(shard) if shard else None
    if box_counts is not None:
        meta["box_counts"] = box_counts.as_dict()
    new_index = new_index.replace_schema_metadata({PART_META_KEY: json.dumps(meta, sort_keys=True).encode()})
    dataset.atomic_write_table(part_url, new_index)
    return new_index, recovered


def _shard_name_for(out_url: str, split: str, task_id: int) -> str:
    """A part whose rows all failed has no shard yet; tasks of a split are numbered in order."""
    manifest = dataset.read_manifest(out_url)
    index_names = manifest["index"]
    position = sum(1 for name in index_names[:task_id] if _part_split(out_url, name) == split)
    return dataset.shard_name(split, position)


def _part_split(out_url: str, name: str) -> str:
    with fsspec.open(dataset.join(out_url, name), "rb") as f:
        return pq.read_table(f, columns=["split"]).column("split")[0].as_py()


def retry_failed(out_url: str, cfg: IngestConfig) -> dict[str, Any]:
    """Re-fetch the transient failures of the finished dataset at `out_url`; returns the pass record."""
    manifest = dataset.read_manifest(out_url)
    is_detection = manifest.get("task") == detection.TASK
    if is_detection and manifest["index"]:
        with fsspec.open(dataset.join(out_url, manifest["index"][0]), "rb") as f:
            if detection.OBJECTS_COLUMN not in pq.read_schema(f).names:
                raise ConfigError(f"--retry-failed {out_url}: its index parts have no '{detection.OBJECTS_COLUMN}' "
                                  "column (written by an older megaclass), so the boxes of a recovered image are "
                                  "unknown; re-ingest instead")
    options = manifest.get("options", {})
    keep = list(options.get("source", {}).get("keep_columns", []))
    schemes = tuple(options.get("fetch", {}).get("allow_schemes", ["http", "https"]))
    num_classes = manifest["num_classes"]
    counts = np.zeros(num_classes, dtype=np.int64)
    totals: dict[str, dict] = {}
    shards: dict[str, list[dataset.ShardRecord]] = {split: [] for split in manifest["splits"]}
    retried = recovered = rewritten = 0
    split_box_counts: list[tuple[str, dict | None]] = []
    for name in manifest["index"]:
        part_url = dataset.join(out_url, name)
        with fsspec.open(part_url, "rb") as f:
            index = pq.read_table(f)
        mask = _transient_mask(index)
        if mask.any():
            index, found = _retry_part(out_url, part_url, index, mask, cfg, keep, schemes)
            retried += int(mask.sum())
            recovered += found
            rewritten += 1
        meta = json.loads((index.schema.metadata or {}).get(PART_META_KEY, b"{}"))
        split = index.column("split")[0].as_py()
        if meta.get("shard"):
            shards.setdefault(split, []).append(dataset.ShardRecord(**meta["shard"]))
        _add_totals(totals.setdefault(split, {"rows": 0, "ok": 0, "failed": 0, "skipped": 0, "reasons": {}}), index)
        if is_detection:  # a class counts its boxes
            split_box_counts.append((split, meta.get("box_counts")))
            ids, numbers = detection.class_counts(meta.get("box_counts") or {"class_counts": {}})
            np.add.at(counts, np.asarray(ids, dtype=np.int64), np.asarray(numbers, dtype=np.int64))
        else:
            ok = pc.equal(index.column("status"), "ok")
            np.add.at(counts, index.column("class_id").filter(ok).to_numpy().astype(np.int64), 1)

    for split in shards:
        shards[split].sort(key=lambda r: r.name)
    classes = dataset.read_classes(out_url).sort_by("id")
    classes = classes.set_column(2, "count", pa.array(counts))
    dataset.atomic_write_table(dataset.join(out_url, dataset.CLASSES_FILE), classes)
    record = {"at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "rows_retried": retried, "rows_recovered": recovered, "shards_rewritten": rewritten}
    for t in totals.values():
        t["reasons"] = dict(sorted(t["reasons"].items()))
    manifest["totals"] = totals
    manifest["summary"] = summary_table(totals).splitlines()
    manifest["splits"] = {split: {"num_samples": sum(s.num_samples for s in records),
                                  "shards": [dataclasses.asdict(s) for s in records]}
                          for split, records in shards.items()}
    if is_detection:
        manifest.update(detection.manifest_fields(split_box_counts, list(manifest["splits"])))
    manifest["retry_passes"] = manifest.get("retry_passes", []) + [record]
    dataset.atomic_write_json(dataset.join(out_url, dataset.MANIFEST_FILE), manifest)
    dataset.write_info(out_url, manifest["name"], shards)
    return record


def _add_totals(totals: dict, index: pa.Table) -> None:
    totals["rows"] += index.num_rows
    for item in pc.value_counts(index.column("status")).to_pylist():
        totals[item["values"]] += item["counts"]
    for item in pc.value_counts(index.column("reason")).to_pylist():
        if item["values"]:
            totals["reasons"][item["values"]] = totals["reasons"].get(item["values"], 0) + item["counts"]
