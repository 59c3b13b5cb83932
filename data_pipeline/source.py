"""Open an ingestion source as parts: source_row, key, url, label (and kept columns) per row.

A source is a parquet, CSV or JSONL table with columns `url` and `label` (optional `key`; other
names through `Columns`), given as one file, a comma-separated list, a glob or a folder of such
parts (LAION-style: hundreds of parquet files), or an image folder `ROOT/<class name>/<image>`
(the class is the folder name), or a COCO JSON. All may live at any fsspec URL; parts are read
one at a time so memory never holds the whole table. Problems that make the whole table unusable (unreadable file, missing column,
no rows, no usable URL at all, duplicate or unsafe keys) raise `SourceError` naming the problem
before any work starts; problems of single rows (a malformed URL, a missing label) are left to
the planner, which records them per row.
"""

from __future__ import annotations

import glob
import hashlib
import json
import posixpath
import re
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from data_pipeline.config import ConfigError

TABLE_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl",
                  ".ndjson": "jsonl", ".json": "jsonl"}
SAFE_KEY = re.compile(r"^[A-Za-z0-9_\-]{1,200}$")  # no dots: webdataset splits key and extension at the first dot
SOURCE_SCHEMA = pa.schema([("source_row", pa.int64()), ("key", pa.string()), ("url", pa.string()),
                           ("label", pa.string())])


class SourceError(ConfigError):
    """The source as a whole is unusable; raised before any work."""


def _as_string(table: pa.Table, name: str, url: str) -> pa.Array:
    column = table.column(name).combine_chunks()
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column.cast(pa.string())
    if pa.types.is_integer(column.type) or pa.types.is_null(column.type) or (
            name != "url" and pa.types.is_dictionary(column.type)):
        return column.cast(pa.string())
    raise SourceError(f"source {url}: column '{name}' has type {column.type}, expected strings")


def key_width(num_rows: int) -> int:
    return max(9, len(str(max(num_rows - 1, 0))))


def row_keys(num_rows: int) -> pa.Array:
    width = key_width(num_rows)
    return pa.array([f"{i:0{width}d}" for i in range(num_rows)], pa.string())


def check_keys(keys: pa.Array, url: str) -> None:
    """Keys of one part: present, unique within it, and safe as tar member names (vectorised)."""
    if keys.null_count:
        raise SourceError(f"source {url}: column 'key' has {keys.null_count} empty value(s)")
    if pc.count_distinct(keys).as_py() != len(keys):
        raise SourceError(f"source {url}: column 'key' has duplicate values (keys must be unique)")
    unsafe = pc.invert(pc.match_substring_regex(keys, SAFE_KEY.pattern))
    if pc.any(unsafe).as_py():
        bad = keys.filter(unsafe)[0].as_py()
        raise SourceError(f"source {url}: key {bad!r} may only use letters, digits, '_' and '-'")


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
    """The whole source as one table (SOURCE_SCHEMA; COCO adds detection columns) and its fingerprint.

    For small sources and tests; ingestion itself reads parts one at a time (`open_source`).
    """
    source = open_source(url)
    if isinstance(source, MemorySource):
        return source.table, source.fingerprint
    tables, shas = zip(*(source.read(i, ["url", "label", "key"] if source.has_key else ["url", "label"])
                         for i in range(source.num_parts)))
    table = pa.concat_tables(tables)
    rows = pa.array(range(table.num_rows), pa.int64())
    keys = table.column("key").combine_chunks() if source.has_key else row_keys(table.num_rows)
    out = pa.Table.from_arrays([rows, keys, table.column("url").combine_chunks(),
                                table.column("label").combine_chunks()], schema=SOURCE_SCHEMA)
    return out, source.fingerprint_of(list(shas))


# ---- sources in parts ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Columns:
    """Which source columns hold the URL, the label and the key, and which others travel along."""
    url: str = "url"
    label: str = "label"
    key: str = "key"
    keep: tuple = ()


RESERVED_COLUMNS = frozenset({"url", "label", "key", "source_row", "class_id", "split", "skip_reason", "status",
                              "reason", "shard", "width", "height", "bytes", "sha256", "attempts", "objects",
                              "image_id"})


def _suffix_kind(url: str) -> str | None:
    return TABLE_SUFFIXES.get(posixpath.splitext(url.rstrip("/"))[1].lower())


class TableSource:
    """A parquet/CSV/JSONL source in parts; each part is read whole when needed, one at a time."""

    def __init__(self, name: str, parts: list[str], columns: Columns):
        self.name = name
        self.parts = parts
        self.columns = columns
        for part in parts:
            if _suffix_kind(part) is None:
                raise SourceError(f"source {part}: unknown table type '{posixpath.splitext(part)[1]}' (use .parquet, "
                                  ".csv, .jsonl or an image folder ROOT/<class>/<image>)")
        self.has_key = columns.key in self._names(0)
        self.detection_names = None

    @property
    def num_parts(self) -> int:
        return len(self.parts)

    def _bytes(self, index: int) -> bytes:
        url = self.parts[index]
        try:
            with fsspec.open(url, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise SourceError(f"source {url}: file not found") from None

    def _names(self, index: int) -> list[str]:
        url = self.parts[index]
        if _suffix_kind(url) == "parquet":
            try:
                with fsspec.open(url, "rb") as f:
                    return pq.read_schema(f).names
            except FileNotFoundError:
                raise SourceError(f"source {url}: file not found") from None
            except (pa.ArrowInvalid, OSError) as exc:
                raise SourceError(f"source {url}: cannot read as parquet: {str(exc).splitlines()[0]}") from None
        return self._parse(index, self._bytes(index), None).column_names

    def _parse(self, index: int, data: bytes, wanted: list[str] | None) -> pa.Table:
        url, kind = self.parts[index], _suffix_kind(self.parts[index])
        c = self.columns
        try:
            if kind == "parquet":
                return pq.read_table(pa.BufferReader(data), columns=wanted)
            if kind == "csv":
                table = pacsv.read_csv(pa.BufferReader(data), convert_options=pacsv.ConvertOptions(
                    column_types={c.url: pa.string(), c.label: pa.string(), c.key: pa.string()}))
            else:
                table = pajson.read_json(pa.BufferReader(data))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, UnicodeDecodeError) as exc:
            raise SourceError(f"source {url}: cannot read as {kind}: {str(exc).splitlines()[0]}") from None
        return table if wanted is None else table.select(wanted)

    def read(self, index: int, names: list[str]) -> tuple[pa.Table, str]:
        """Part `index` with the canonical columns `names` (url, label, key, kept ones) and its sha256."""
        url, c = self.parts[index], self.columns
        source_of = {"url": c.url, "label": c.label, "key": c.key}
        data = self._bytes(index)
        available = self._names(index) if _suffix_kind(url) == "parquet" else None
        table = self._parse(index, data, None) if available is None else None
        available = available if available is not None else table.column_names
        missing = [source_of.get(n, n) for n in names if source_of.get(n, n) not in available]
        if missing:
            flag = {c.url: " (--url-col)", c.label: " (--label-col)", c.key: " (--key-col)"}
            raise SourceError(f"source {url}: missing column(s) "
                              f"{', '.join(m + flag.get(m, ' (--keep-columns)') for m in missing)} "
                              f"(has: {', '.join(available) or 'none'})")
        wanted = [source_of.get(n, n) for n in names]
        table = self._parse(index, data, wanted) if table is None else table.select(wanted)
        arrays = [_as_string(table, source_of[n], url) if n in source_of else table.column(source_of.get(n, n))
                  for n in names]
        return pa.Table.from_arrays(arrays, names=names), hashlib.sha256(data).hexdigest()

    def num_rows_of(self, index: int) -> int:
        url = self.parts[index]
        if _suffix_kind(url) == "parquet":
            with fsspec.open(url, "rb") as f:
                return pq.ParquetFile(f).metadata.num_rows
        return self._parse(index, self._bytes(index), None).num_rows

    def fingerprint_of(self, shas: list[str]) -> str:
        if len(shas) == 1:
            return shas[0]  # one file: its sha256, as always
        listing = [[posixpath.basename(p.rstrip("/")), sha] for p, sha in zip(self.parts, shas)]
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


class MemorySource:
    """An image folder or a COCO file: one part built whole (bounded by a listing or one JSON)."""

    has_key = True
    num_parts = 1

    def __init__(self, name: str, table: pa.Table, fingerprint: str, scheme: str):
        from data_pipeline.detection import source_class_names  # detection imports this module

        self.name = name
        self.table = table
        self.fingerprint = fingerprint
        self.scheme = scheme
        self.detection_names = source_class_names(table)

    def read(self, index: int, names: list[str]) -> tuple[pa.Table, str]:
        return self.table, self.fingerprint

    def num_rows_of(self, index: int) -> int:
        return self.table.num_rows

    def fingerprint_of(self, shas: list[str]) -> str:
        return self.fingerprint


def _table_parts(fs, paths: list[str]) -> list[str]:
    return [fs.unstrip_protocol(p) if "://" not in p else p for p in sorted(paths)
            if _suffix_kind(p) is not None and not posixpath.basename(p).startswith(".")]


def open_source(source: str | list[str], columns: Columns = Columns()) -> TableSource | MemorySource:
    """A source as parts: a table file, a comma-separated list or glob of them, a folder of them,
    an image folder ROOT/<class>/<image>, or a COCO JSON. SourceError before any work otherwise."""
    bad_keep = [k for k in columns.keep if k in RESERVED_COLUMNS]
    if bad_keep:
        raise SourceError(f"--keep-columns: {bad_keep[0]!r} is a column megaclass writes itself; rename it")
    if isinstance(source, (list, tuple)):
        return TableSource(",".join(source), list(source), columns)
    pieces = [p.strip() for p in source.split(",")]
    if len(pieces) > 1 and all(_suffix_kind(p) for p in pieces):
        return TableSource(source, pieces, columns)
    fs, path = fsspec.core.url_to_fs(source)
    if glob.has_magic(path):
        parts = _table_parts(fs, fs.glob(path))
        if not parts:
            raise SourceError(f"source {source}: the pattern matches no .parquet/.csv/.jsonl file")
        return TableSource(source, parts, columns)
    if fs.isdir(path):
        files = fs.find(path)
        root = path.rstrip("/")
        tables = _table_parts(fs, [f for f in files if "/" not in f[len(root):].strip("/")])
        nested = [f for f in files if f[len(root):].strip("/").count("/") == 1
                  and not any(p.startswith(".") for p in f[len(root):].strip("/").split("/"))]
        if tables and nested:
            raise SourceError(f"source {source}: holds both table files ({posixpath.basename(tables[0])}) and "
                              f"class folders ({nested[0][len(root):].strip('/')}); point at one kind")
        if tables:
            return TableSource(source, tables, columns)
        _no_flags_for_built_sources(source, columns)
        table, fingerprint = read_folder_source(source)
        return MemorySource(source, table, fingerprint, own_scheme(source))
    if not fs.exists(path):
        raise SourceError(f"source {source}: file not found")
    from data_pipeline.detection import is_coco_json, read_coco_source  # detection imports this module

    if is_coco_json(source):
        _no_flags_for_built_sources(source, columns)
        table, fingerprint = read_coco_source(source)
        return MemorySource(source, table, fingerprint, own_scheme(source))
    return TableSource(source, [source], columns)


def _no_flags_for_built_sources(source: str, columns: Columns) -> None:
    if columns != Columns():
        raise SourceError(f"source {source}: column options apply to table sources only (an image folder or "
                          "COCO file has no url/label/key columns to rename or keep)")
