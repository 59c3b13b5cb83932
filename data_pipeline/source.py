"""Read an ingestion source into one Arrow table: source_row, key, url, label.

A source is a parquet, CSV or JSONL table with columns `url` and `label` (optional `key`), or
an image folder `ROOT/<class name>/<image>` (the class is the folder name). Both may live at
any fsspec URL. Problems that make the whole table unusable (unreadable file, missing column,
no rows, no usable URL at all, duplicate or unsafe keys) raise `SourceError` naming the problem
before any work starts; problems of single rows (a malformed URL, a missing label) are left to
the planner, which records them per row.
"""

from __future__ import annotations

import hashlib
import posixpath
import re

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from data_pipeline.config import ConfigError

TABLE_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl",
                  ".ndjson": "jsonl", ".json": "jsonl"}
SAFE_KEY = re.compile(r"^[A-Za-z0-9_\-]+$")  # no dots: webdataset splits key and extension at the first dot
SOURCE_SCHEMA = pa.schema([("source_row", pa.int64()), ("key", pa.string()), ("url", pa.string()),
                           ("label", pa.string())])


class SourceError(ConfigError):
    """The source as a whole is unusable; raised before any work."""


def _read_table(url: str, kind: str) -> pa.Table:
    try:
        with fsspec.open(url, "rb") as f:
            if kind == "parquet":
                return pq.read_table(f)
            if kind == "csv":
                return pacsv.read_csv(f, convert_options=pacsv.ConvertOptions(
                    column_types={"url": pa.string(), "label": pa.string(), "key": pa.string()}))
            return pajson.read_json(f)
    except FileNotFoundError:
        raise SourceError(f"source {url}: file not found") from None
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"source {url}: cannot read as {kind}: {str(exc).splitlines()[0]}") from None


def _as_string(table: pa.Table, name: str, url: str) -> pa.Array:
    column = table.column(name).combine_chunks()
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column.cast(pa.string())
    if pa.types.is_integer(column.type) or pa.types.is_null(column.type) or (
            name != "url" and pa.types.is_dictionary(column.type)):
        return column.cast(pa.string())
    raise SourceError(f"source {url}: column '{name}' has type {column.type}, expected strings")


def fingerprint_file(url: str) -> str:
    h = hashlib.sha256()
    with fsspec.open(url, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def key_width(num_rows: int) -> int:
    return max(9, len(str(max(num_rows - 1, 0))))


def row_keys(num_rows: int) -> pa.Array:
    width = key_width(num_rows)
    return pa.array([f"{i:0{width}d}" for i in range(num_rows)], pa.string())


def read_table_source(url: str) -> tuple[pa.Table, str]:
    """(table with SOURCE_SCHEMA, fingerprint) of a parquet/CSV/JSONL source."""
    suffix = posixpath.splitext(url.rstrip("/"))[1].lower()
    kind = TABLE_SUFFIXES.get(suffix)
    if kind is None:
        raise SourceError(f"source {url}: unknown table type '{suffix}' (use .parquet, .csv, .jsonl "
                          "or an image folder ROOT/<class>/<image>)")
    table = _read_table(url, kind)
    missing = [c for c in ("url", "label") if c not in table.column_names]
    if missing:
        raise SourceError(f"source {url}: missing column(s) {', '.join(missing)} "
                          f"(has: {', '.join(table.column_names) or 'none'})")
    if table.num_rows == 0:
        raise SourceError(f"source {url}: zero rows")
    urls = _as_string(table, "url", url)
    labels = _as_string(table, "label", url)
    if "key" in table.column_names:
        keys = _as_string(table, "key", url)
        _check_keys(keys, url)
    else:
        keys = row_keys(table.num_rows)
    rows = pa.array(range(table.num_rows), pa.int64())
    out = pa.Table.from_arrays([rows, keys, urls, labels], schema=SOURCE_SCHEMA)
    return out, fingerprint_file(url)


def _check_keys(keys: pa.Array, url: str) -> None:
    if keys.null_count:
        raise SourceError(f"source {url}: column 'key' has {keys.null_count} empty value(s)")
    if pc.count_distinct(keys).as_py() != len(keys):
        raise SourceError(f"source {url}: column 'key' has duplicate values (keys must be unique)")
    bad = [k for k in keys.to_pylist() if not SAFE_KEY.fullmatch(k)]
    if bad:
        raise SourceError(f"source {url}: key {bad[0]!r} may only use letters, digits, '_' and '-'")


def read_folder_source(url: str) -> tuple[pa.Table, str]:
    """ROOT/<class>/<file> -> table; rows sorted by (class, file) so keys are stable."""
    fs, root = fsspec.core.url_to_fs(url)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        raise SourceError(f"source {url}: not found") from None
    root = root.rstrip("/")
    entries = []
    for path, info in found.items():
        if info.get("type") == "directory":
            continue
        rel = path[len(root):].lstrip("/")
        parts = rel.split("/")
        if len(parts) == 2 and not any(p.startswith(".") for p in parts):
            entries.append((parts[0], parts[1], path, int(info.get("size") or 0)))
    entries.sort()
    if not entries:
        raise SourceError(f"source {url}: no images found as ROOT/<class name>/<image>")
    if protocol in ("file", "local"):
        urls = [f"file://{e[2]}" for e in entries]
    else:
        urls = [fs.unstrip_protocol(e[2]) for e in entries]
    labels = [e[0] for e in entries]
    table = pa.Table.from_arrays([pa.array(range(len(entries)), pa.int64()), row_keys(len(entries)),
                                  pa.array(urls, pa.string()), pa.array(labels, pa.string())],
                                 schema=SOURCE_SCHEMA)
    listing = hashlib.sha256()
    for label, name, _, size in entries:
        listing.update(f"{label}/{name}\t{size}\n".encode())
    return table, listing.hexdigest()


def own_scheme(url: str) -> str:
    """The URL scheme of files next to `url` (`file` for a local path)."""
    fs, _ = fsspec.core.url_to_fs(url)
    return fs.unstrip_protocol("/x").split("://", 1)[0].lower() if "://" in fs.unstrip_protocol("/x") else "file"


def is_folder(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.isdir(path)


def read_source(url: str) -> tuple[pa.Table, str]:
    """The source table (SOURCE_SCHEMA; a COCO JSON adds detection columns) and a fingerprint of its content."""
    fs, path = fsspec.core.url_to_fs(url)
    if fs.isdir(path):
        return read_folder_source(url)
    if not fs.exists(path):
        raise SourceError(f"source {url}: file not found")
    from data_pipeline.detection import is_coco_json, read_coco_source  # detection imports this module

    if is_coco_json(url):
        return read_coco_source(url)
    return read_table_source(url)
