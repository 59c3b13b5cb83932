"""Tiny contract-1 datasets for tests: real JPEG shards, manifest.json, _info.json, classes.parquet.

    from tests.dataset_factory import make_dataset
    root = make_dataset(tmp_path / "ds", shard_sizes=[5, 3, 8], num_classes=4, image_size=32)

Sample keys are `s{shard:04d}i{index:05d}` and labels cycle through the classes, so a test can
tell where any sample came from. `bad_keys` stores garbage instead of a JPEG for those keys.
The manifest uses the schema `data_pipeline.ingest` writes (format_version, splits/shards records).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import pyarrow as pa

from data_pipeline import dataset as ds
from tests.conftest import noise_jpeg


def sample_key(shard: int, index: int) -> str:
    return f"s{shard:04d}i{index:05d}"


def make_dataset(root: str | Path, shard_sizes: Iterable[int] | Mapping[str, Iterable[int]], num_classes: int,
                 image_size: int = 32, *, bad_keys: Iterable[str] = (), name: str = "testset") -> str:
    """Write a dataset at `root` (local path or fsspec URL); returns the root as a string.

    `shard_sizes`: samples per shard of split "train", or {split: [sizes]} for several splits.
    """
    root = str(root)
    splits = shard_sizes if isinstance(shard_sizes, Mapping) else {"train": shard_sizes}
    bad = set(bad_keys)
    records: dict[str, list[ds.ShardRecord]] = {}
    counts = [0] * num_classes
    shard_number = 0
    for split, sizes in splits.items():
        records[split] = []
        for index, size in enumerate(sizes):
            samples = []
            for i in range(size):
                key = sample_key(shard_number, i)
                class_id = (shard_number * 7 + i) % num_classes
                counts[class_id] += 1
                jpg = b"not a jpeg" if key in bad else noise_jpeg(shard_number * 100_000 + i, image_size + 8, image_size)
                samples.append(ds.encode_sample(key, jpg, class_id, {"url": f"http://example.invalid/{key}.jpg",
                                                                      "label": f"class{class_id:05d}"}))
            records[split].append(ds.write_shard(ds.shard_url(root, split, index), samples))
            shard_number += 1
    names = [f"class{i:05d}" for i in range(num_classes)]
    ds.atomic_write_table(ds.join(root, ds.CLASSES_FILE), pa.table(
        {"id": pa.array(range(num_classes), pa.int32()), "name": pa.array(names, pa.string()),
         "count": pa.array(counts, pa.int64())}, schema=ds.CLASSES_SCHEMA))
    manifest = {
        "format_version": ds.FORMAT_VERSION,
        "name": name,
        "num_classes": num_classes,
        "splits": {split: {"num_samples": sum(r.num_samples for r in recs),
                           "shards": [{"name": r.name, "num_samples": r.num_samples, "bytes": r.bytes,
                                       "sha256": r.sha256} for r in recs]}
                   for split, recs in records.items()},
    }
    ds.atomic_write_json(ds.join(root, ds.MANIFEST_FILE), manifest)
    ds.write_info(root, name, records)
    return root
