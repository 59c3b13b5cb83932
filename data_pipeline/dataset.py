"""Contract 1, the dataset layout (format version 1): names, samples, shards, manifest, checks.

Writers (`data_pipeline.ingest`) and readers (`data_pipeline.reader`, timm's wds reader,
pretrain, finetune) agree on the layout through this module only:

    DATASET/_info.json                 timm wds-reader metadata, written last
    DATASET/manifest.json              version, fingerprint, options, totals, shards + sha256
    DATASET/classes.parquet            id:int32 dense, name:string, count:int64, sorted by name
    DATASET/index/part-NNNNNN.parquet  one row per input row
    DATASET/shards/SPLIT-NNNNNN.tar    WebDataset shards: KEY.jpg, KEY.cls, KEY.json

Every path is an fsspec URL. Files appear atomically: written under a temporary name, then moved.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

FORMAT_VERSION = 1
INFO_FILE = "_info.json"
MANIFEST_FILE = "manifest.json"
CLASSES_FILE = "classes.parquet"
INDEX_DIR = "index"
SHARDS_DIR = "shards"
SHARD_MTIME = 0  # fixed integer tar mtime: deterministic bytes, and no per-member PAX header (a float adds one)

CLASSES_SCHEMA = pa.schema([("id", pa.int32()), ("name", pa.string()), ("count", pa.int64())])
INDEX_SCHEMA = pa.schema([
    ("key", pa.string()), ("source_row", pa.int64()), ("url", pa.string()), ("label", pa.string()),
    ("class_id", pa.int32()), ("status", pa.string()), ("reason", pa.string()), ("split", pa.string()),
    ("shard", pa.string()), ("width", pa.int32()), ("height", pa.int32()), ("bytes", pa.int64()),
    ("sha256", pa.string()), ("attempts", pa.int32()),
])
STATUSES = ("ok", "failed", "skipped")


class DatasetError(ValueError):
    """A dataset that is missing, incomplete, of another format, or fails its checksums."""


def join(base: str, *parts: str) -> str:
    """Join URL/path parts with '/' (fsspec URLs and local paths alike)."""
    return posixpath.join(str(base).rstrip("/"), *parts)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def shard_url(root: str, split: str, index: int) -> str:
    return join(root, SHARDS_DIR, shard_name(split, index))


def index_part_url(root: str, index: int) -> str:
    return join(root, INDEX_DIR, f"part-{index:06d}.parquet")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_url(url: str, chunk_bytes: int = 1 << 20) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a file, streamed."""
    h = hashlib.sha256()
    size = 0
    with fsspec.open(url, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def atomic_write_bytes(url: str, data: bytes) -> None:
    """Write `data` to `url` so that readers see either nothing or the whole file."""
    fs, path = fsspec.core.url_to_fs(url)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def atomic_write_json(url: str, obj: Any) -> None:
    atomic_write_bytes(url, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_write_table(url: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(url, buf.getvalue())


def exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def is_local(url_or_fs: Any) -> bool:
    """True for a path on this machine's file system (plain path or file://), given a URL or an fsspec fs."""
    if isinstance(url_or_fs, (str, os.PathLike)):  # from the URL alone: no file system is imported or built
        return fsspec.utils.get_protocol(str(url_or_fs)) in ("file", "local")
    protocol = url_or_fs.protocol
    return "file" in ((protocol,) if isinstance(protocol, str) else tuple(protocol))


def read_jsonl(url: str) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (blank lines skipped); [] when the file does not exist."""
    fs, path = fsspec.core.url_to_fs(str(url))
    if not fs.exists(path):
        return []
    return [json.loads(line) for line in fs.cat_file(path).decode().splitlines() if line.strip()]


def read_json(url: str) -> Any:
    with fsspec.open(url, "r") as f:
        return json.load(f)


def encode_sample(key: str, jpg: bytes, class_id: int, meta: dict[str, Any]) -> dict[str, Any]:
    """One WebDataset sample as stored: `jpg` bytes, `cls` ASCII digits, `json` metadata."""
    return {
        "__key__": key,
        "jpg": jpg,
        "cls": str(int(class_id)).encode(),
        "json": json.dumps(meta, sort_keys=True, separators=(",", ":")).encode(),
    }


@dataclass(frozen=True)
class ShardRecord:
    """What the manifest says about one shard."""
    name: str
    num_samples: int
    bytes: int
    sha256: str


def write_shard(url: str, samples: Iterable[dict[str, Any]]) -> ShardRecord:
    """Write samples (from `encode_sample`) as a tar at `url`, atomically; deterministic bytes.

    The tar is assembled in memory (a shard is bounded by `--shard-size`) and then committed with
    one atomic write, so a killed writer never leaves a partial shard under the final name.
    Members are laid out as webdataset's TarWriter lays them out (KEY.EXT in sorted extension
    order, mode 0444, owner bigdata, mtime SHARD_MTIME), with plain `tarfile`: importing
    webdataset imports torch, seconds in every ingest worker for nothing a tar needs.
    """
    import tarfile

    buf = io.BytesIO()
    count = 0
    with tarfile.open(fileobj=buf, mode="w|") as tar:
        for sample in samples:
            key = sample["__key__"]
            for ext in sorted(sample):
                if ext.startswith("_"):
                    continue
                value = sample[ext]
                member = tarfile.TarInfo(f"{key}.{ext}")
                member.size, member.mtime, member.mode = len(value), SHARD_MTIME, 0o444
                member.uname = member.gname = "bigdata"
                tar.addfile(member, io.BytesIO(value))
            count += 1
    data = buf.getvalue()
    atomic_write_bytes(url, data)
    return ShardRecord(posixpath.basename(url), count, len(data), sha256_bytes(data))


def iter_shard(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard ({'__key__', 'jpg', 'cls', 'json'}) with plain tarfile."""
    import tarfile

    with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        current: dict[str, Any] = {}
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if current and current["__key__"] != key:
                yield current
                current = {}
            current["__key__"] = key
            current[ext] = tar.extractfile(member).read()
        if current:
            yield current


def read_manifest(root: str) -> dict[str, Any]:
    """The manifest of a complete dataset; DatasetError if absent or of another format."""
    url = join(root, MANIFEST_FILE)
    if not exists(url):
        raise DatasetError(f"{root}: no {MANIFEST_FILE}; not a megaclass dataset or ingestion did not finish")
    manifest = read_json(url)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise DatasetError(f"{root}: dataset format version {version!r}, this megaclass reads {FORMAT_VERSION}")
    return manifest


def manifest_sha256(root: str) -> str:
    """sha256 of manifest.json: the dataset's identity in checkpoint and registry lineage."""
    return sha256_url(join(root, MANIFEST_FILE))[0]


def read_classes(root: str) -> pa.Table:
    url = join(root, CLASSES_FILE)
    if not exists(url):
        raise DatasetError(f"{root}: no {CLASSES_FILE}")
    with fsspec.open(url, "rb") as f:
        return pq.read_table(f)


def class_names(root: str) -> list[str]:
    """Label names indexed by class id."""
    table = read_classes(root).sort_by("id")
    return table.column("name").to_pylist()


def split_shards(root: str, split: str) -> list[tuple[str, int]]:
    """[(shard URL, num_samples)] of a split, from the manifest."""
    manifest = read_manifest(root)
    splits = manifest.get("splits", {})
    if split not in splits:
        raise DatasetError(f"{root}: no split {split!r} (has: {', '.join(sorted(splits)) or 'none'})")
    return [(join(root, SHARDS_DIR, s["name"]), int(s["num_samples"])) for s in splits[split]["shards"]]


def write_info(root: str, name: str, splits: dict[str, list[ShardRecord]]) -> None:
    """`_info.json` in the schema timm's wds reader expects (filenames relative to the root)."""
    info = {
        "name": name,
        "splits": {
            split: {
                "name": split,
                "num_samples": sum(r.num_samples for r in records),
                "filenames": [posixpath.join(SHARDS_DIR, r.name) for r in records],
                "shard_lengths": [r.num_samples for r in records],
            }
            for split, records in splits.items()
        },
    }
    atomic_write_json(join(root, INFO_FILE), info)


def verify_dataset(root: str) -> list[str]:
    """Re-check every shard against the manifest's sha256, size and sample count.

    Returns a list of problems (empty when the dataset is intact).
    """
    manifest = read_manifest(root)
    problems = []
    for split, entry in manifest.get("splits", {}).items():
        for shard in entry["shards"]:
            url = join(root, SHARDS_DIR, shard["name"])
            if not exists(url):
                problems.append(f"{shard['name']}: missing")
                continue
            digest, size = sha256_url(url)
            if digest != shard["sha256"] or size != shard["bytes"]:
                problems.append(f"{shard['name']}: sha256/size mismatch (manifest {shard['sha256'][:12]}, "
                                f"file {digest[:12]}, {size} bytes)")
                continue
            try:
                count = sum(1 for _ in iter_shard(url))
            except Exception as exc:  # a corrupt tar is a finding, not a crash
                problems.append(f"{shard['name']}: unreadable tar ({exc})")
                continue
            if count != shard["num_samples"]:
                problems.append(f"{shard['name']}: {count} samples, manifest says {shard['num_samples']}")
    return problems
