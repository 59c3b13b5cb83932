"""Ingestion as three pure steps that any runner can schedule (cluster/ingest_runner.py uses Ray).

    plan = plan_shards("urls.parquet", "out/", cfg)      # read + validate source, classes, splits
    results = [write_shard(plan.task(i), cfg) for i in range(plan.num_tasks)]   # any order, any host
    summary = finalize(plan, results, cfg)               # classes.parquet, manifest.json, _info.json

Output is a pure function of (source, options): every row gets its key, split, class id and
shard in the plan, before anything is fetched. A task writes its shard tar, then its index part
(which records the tar's sha256 and the plan fingerprint), so "index part present and matching"
means "shard committed"; re-running skips committed tasks and finishes byte-identically.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_pipeline import dataset, detection
from data_pipeline.accounting import split_totals, summary_table  # noqa: F401 (summary_table: ingest's API)
from data_pipeline.config import ConfigError, doc, require, to_dict
from data_pipeline.fetch import DEFAULT_OPTOUT, ConnectionPool, FetchOptions, fetch
from data_pipeline.image import RESAMPLE, ImageOptions, process_image
from data_pipeline.netpolicy import NetworkPolicy, parse_networks
from data_pipeline.shard_plan import PLAN_SCHEMA as PLAN_SCHEMA  # re-exported: the plan's row schema
from data_pipeline.shard_plan import IngestPlan, ShardTask, check_usable_urls
from data_pipeline.shard_plan import plan_shards as _plan_source

log = logging.getLogger(__name__)

PART_META_KEY = b"megaclass.ingest"


@dataclass(frozen=True)
class FetchSection:
    timeout_s: float = doc("seconds for one attempt at a URL: DNS, connect, TLS, headers and body of all hops", 10.0)
    deadline_s: float = doc("seconds for all attempts at one URL, backoff waits included", 30.0)
    retries: int = doc("further attempts after a transient failure (timeout, connection, DNS, 408/429/5xx)", 2)
    retry_backoff_s: float = doc("seconds; the first backoff ceiling, doubled per attempt, full jitter", 0.5)
    max_retry_after_s: float = doc("seconds; a server's Retry-After is honoured up to this", 10.0)
    max_bytes: int = doc("bytes; larger downloads are stopped and recorded as too_large", 20 * 1024 * 1024)
    max_redirects: int = doc("redirect hops followed before too_many_redirects", 5)
    threads: int = doc("concurrent downloads per shard task", 32)
    allow_networks: list[str] = doc("CIDRs opened despite the default deny of non-global addresses", [])
    allow_schemes: list[str] = doc("URL schemes a table source may name (file, s3, ... only when opened here)",
                                   ["http", "https"])
    ca_file: str | None = doc("PEM CA bundle trusted in addition to the system CAs (private mirrors)", None)
    honour_optout: bool = doc("refuse responses whose X-Robots-Tag carries an opt-out directive", True)
    optout_directives: list[str] = doc("X-Robots-Tag directives that mean opt-out", list(DEFAULT_OPTOUT))
    user_agent: str = doc("User-Agent header sent", "megaclass/0.1 (+dataset ingestion; honours X-Robots-Tag noai)")

    def validate(self) -> None:
        require(0 < self.timeout_s < math.inf, "fetch.timeout_s", "must be a finite number of seconds > 0")
        require(self.timeout_s <= self.deadline_s < math.inf, "fetch.deadline_s",
                "must be finite and >= fetch.timeout_s")
        require(self.retries >= 0, "fetch.retries", "must be >= 0")
        require(0 <= self.retry_backoff_s < math.inf, "fetch.retry_backoff_s", "must be finite and >= 0")
        require(0 <= self.max_retry_after_s < math.inf, "fetch.max_retry_after_s", "must be finite and >= 0")
        require(self.max_bytes > 0, "fetch.max_bytes", "must be > 0")
        require(self.max_redirects >= 0, "fetch.max_redirects", "must be >= 0")
        require(self.threads >= 1, "fetch.threads", "must be >= 1")
        require(all(s and s.isascii() and s.isalnum() for s in self.allow_schemes), "fetch.allow_schemes",
                "must be plain scheme names such as http, https, file, s3")
        require(self.ca_file is None or os.path.isfile(self.ca_file), "fetch.ca_file",
                f"{self.ca_file!r} is not a readable file")
        parse_networks(self.allow_networks)


@dataclass(frozen=True)
class ImageSection:
    image_size: int = doc("px; stored shorter side at most this (never upscaled)", 256)
    min_side: int = doc("px; images with a smaller side are refused (too_small)", 16)
    max_pixels: int = doc("width*height above this is refused before decoding (too_many_pixels)", 64_000_000)
    jpeg_quality: int = doc("JPEG quality of re-encoded images (1-95)", 90)
    keep_original: bool = doc("store RGB baseline JPEGs that already fit byte for byte", True)
    resample: str = doc("filter of the final resize: bilinear (antialiased), bicubic, lanczos, box", "bilinear")

    def validate(self) -> None:
        require(self.image_size >= 1, "image.image_size", "must be >= 1")
        require(1 <= self.min_side <= self.image_size, "image.min_side", "must be in 1..image_size")
        require(self.max_pixels >= self.min_side ** 2, "image.max_pixels", "must be >= min_side**2")
        require(1 <= self.jpeg_quality <= 95, "image.jpeg_quality", "must be in 1..95")
        require(self.resample in RESAMPLE, "image.resample", f"must be one of {', '.join(RESAMPLE)}")


@dataclass(frozen=True)
class OutputSection:
    shard_size: int = doc("input rows per shard task (~30 kB per stored image: 30000 is ~1 GB)", 30000)
    val_fraction: float = doc("fraction of rows held out by key hash into the validation split", 0.0)
    train_split: str = doc("name of the main split", "train")
    val_split: str = doc("name of the held-out split", "val")
    seed: int = doc("salt of the held-out key hash", 0)
    name: str = doc("dataset name written to _info.json", "megaclass")
    max_failed_fraction: float = doc("fail the run when failed/(ok+failed) exceeds this", 0.8)

    def validate(self) -> None:
        require(self.shard_size >= 1, "output.shard_size", "must be >= 1")
        require(0.0 <= self.val_fraction < 1.0, "output.val_fraction", "must be in [0, 1)")
        require(0.0 <= self.max_failed_fraction <= 1.0, "output.max_failed_fraction", "must be in [0, 1]")
        for name, value in (("train_split", self.train_split), ("val_split", self.val_split)):
            require(value.isidentifier(), f"output.{name}", "must be a plain name")
        require(self.train_split != self.val_split, "output.val_split", "must differ from train_split")


EXECUTORS = ("auto", "ray", "local")


@dataclass(frozen=True)
class RuntimeSection:
    executor: str = doc("where shard tasks run: auto (Ray when ray_address/$RAY_ADDRESS is set or Ray is "
                        "running, else local), ray (a local Ray if no address), local (processes here)", "auto")
    ray_address: str | None = doc("Ray cluster to join (None: see executor)", None)
    local_workers: int = doc("executor local: worker processes (0: one per core this process may use)", 0)
    max_task_retries: int = doc("retries of a failed shard task", 3)
    progress: bool = doc("show a progress bar", True)

    def validate(self) -> None:
        require(self.executor in EXECUTORS, "runtime.executor", f"must be one of {', '.join(EXECUTORS)}")
        require(self.local_workers >= 0, "runtime.local_workers", "must be >= 0")
        require(self.max_task_retries >= 0, "runtime.max_task_retries", "must be >= 0")


@dataclass(frozen=True)
class SourceSection:
    url_column: str = doc("source column with the image URL (--url-col)", "url")
    label_column: str = doc("source column with the class name (--label-col)", "label")
    key_column: str = doc("source column with a unique sample key; row numbers when absent (--key-col)", "key")
    keep_columns: list[str] = doc("source columns copied into each sample's json and the index (--keep-columns)", [])

    def validate(self) -> None:
        names = [self.url_column, self.label_column, self.key_column]
        require(all(names) and len(set(names)) == 3, "source.url_column",
                "url, label and key columns must be three different non-empty names")
        require(len(set(self.keep_columns)) == len(self.keep_columns), "source.keep_columns", "names a column twice")
        require(not set(self.keep_columns) & set(names), "source.keep_columns",
                "must not repeat the url/label/key columns (they are stored already)")


@dataclass(frozen=True)
class IngestConfig:
    """`megaclass ingest` options; output-affecting ones are recorded in manifest.json."""
    source: SourceSection = field(default_factory=SourceSection)
    fetch: FetchSection = field(default_factory=FetchSection)
    image: ImageSection = field(default_factory=ImageSection)
    output: OutputSection = field(default_factory=OutputSection)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)

    def fetch_options(self) -> FetchOptions:
        f = self.fetch
        return FetchOptions(f.timeout_s, f.max_bytes, f.max_redirects, f.honour_optout,
                            tuple(f.optout_directives), f.user_agent, NetworkPolicy.from_cidrs(f.allow_networks),
                            tuple(s.lower() for s in f.allow_schemes), f.ca_file, f.retries, f.retry_backoff_s,
                            f.max_retry_after_s, f.deadline_s)

    def image_options(self) -> ImageOptions:
        i = self.image
        return ImageOptions(i.image_size, i.min_side, i.max_pixels, i.jpeg_quality, i.keep_original, i.resample)

    def recorded_options(self) -> dict:
        """Options that change what a stored sample looks like: part of the fingerprint.

        Parallelism, timing and retries decide only whether a row is fetched this time (a
        re-run or `--retry-failed` may fetch it later), so changing them never refuses OUT.
        """
        options = to_dict(self)
        del options["runtime"]
        for name in ("threads", "timeout_s", "deadline_s", "retries", "retry_backoff_s", "max_retry_after_s",
                     "ca_file", "user_agent"):
            del options["fetch"][name]
        del options["output"]["max_failed_fraction"]  # a check on the result, not an input to it
        return options


@dataclass
class ShardResult:
    task_id: int
    split: str
    shard: dataset.ShardRecord | None          # None when no row of the task succeeded
    num_rows: int
    status_counts: dict[str, int]
    reason_counts: dict[str, int]
    class_ids: list[int]                       # classes with ok samples (detection: boxes) in this shard ...
    class_counts: list[int]                    # ... and their counts (merged in finalize)
    skipped_existing: bool = False
    box_counts: dict | None = None             # detection: detection.BoxCounts.as_dict() of this shard


class IngestError(RuntimeError):
    """The run could not produce a dataset (too many failures, foreign data in OUT)."""


def plan_shards(source_url: str | list[str], out_url: str, cfg: IngestConfig) -> IngestPlan:
    """Read and validate the source (pass 1); `plan.tasks()` then streams the shard tasks."""
    plan = _plan_source(source_url, out_url, cfg)
    check_usable_urls(plan)
    return plan


# ---- one shard -------------------------------------------------------------------------------

def _summarize(task_id: int, split: str, shard: dataset.ShardRecord | None, index: pa.Table,
               skipped_existing: bool = False, box_counts: dict | None = None) -> ShardResult:
    def counts(column: str, mask=None) -> dict[str, int]:
        values = index.column(column) if mask is None else index.column(column).filter(mask)
        result = pc.value_counts(values).to_pylist()
        return {item["values"]: item["counts"] for item in result if item["values"]}

    ok = pc.equal(index.column("status"), "ok")
    if box_counts is not None:  # detection: a class counts its boxes
        class_ids, class_counts = detection.class_counts(box_counts)
    else:
        ids, numbers = np.unique(index.column("class_id").filter(ok).to_numpy(), return_counts=True)
        class_ids, class_counts = ids.tolist(), numbers.tolist()
    return ShardResult(task_id, split, shard, index.num_rows, counts("status"), counts("reason"),
                       class_ids, class_counts, skipped_existing, box_counts)


def committed_result(task: ShardTask) -> ShardResult | None:
    """The result of an already committed task, or None if it must (re)run."""
    if not dataset.exists(task.part_url):
        return None
    with fsspec.open(task.part_url, "rb") as f:
        index = pq.read_table(f)
    meta = json.loads((index.schema.metadata or {}).get(PART_META_KEY, b"{}"))
    if meta.get("fingerprint") != task.fingerprint:
        raise IngestError(f"{task.part_url} was written from another source or with other options; "
                          "use a new output location or delete the old one")
    shard = dataset.ShardRecord(**meta["shard"]) if meta.get("shard") else None
    if shard is not None:
        fs, path = fsspec.core.url_to_fs(task.shard_url)
        if not fs.exists(path) or fs.size(path) != shard.bytes:
            return None
    return _summarize(task.task_id, task.split, shard, index, skipped_existing=True,
                      box_counts=meta.get("box_counts"))


def check_out_location(plan: IngestPlan) -> None:
    """Refuse to mix runs: OUT may be empty or hold a (partial) run of the same plan only."""
    manifest_url = dataset.join(plan.out_url, dataset.MANIFEST_FILE)
    if dataset.exists(manifest_url):
        found = dataset.read_json(manifest_url).get("fingerprint", {}).get("ingest")
        if found != plan.fingerprint:
            raise ConfigError(f"{plan.out_url} holds a dataset from another source or other options; "
                              "use a new output location or delete the old one")
    if plan.num_tasks:
        try:
            committed_result(plan.task(0))
        except IngestError as exc:
            raise ConfigError(str(exc)) from None


def _ingest_row(row: dict, fetch_opts: FetchOptions, image_opts: ImageOptions,
                cpu: threading.Semaphore, connections: ConnectionPool | None) -> dict:
    if row["skip_reason"]:
        return {"status": "skipped", "reason": row["skip_reason"], "attempts": 0}
    fetched = fetch(row["url"], fetch_opts, connections)
    if fetched.data is None:
        return {"status": "failed", "reason": fetched.reason, "attempts": fetched.attempts}
    with cpu:  # downloads overlap; decoding stays on the one core the task was given
        image = process_image(fetched.data, image_opts)
    if image.jpg is None:
        return {"status": "failed", "reason": image.reason, "attempts": fetched.attempts}
    return {"status": "ok", "reason": "", "image": image, "attempts": fetched.attempts}


def process_row(row: dict, fetch_opts: FetchOptions, image_opts: ImageOptions, cpu: threading.Semaphore,
                connections: ConnectionPool | None = None) -> dict:
    """One row never stops a shard: any exception becomes the row's recorded reason.

    connections: the task's keep-alive pool (None: a new connection per request).
    """
    try:
        return _ingest_row(row, fetch_opts, image_opts, cpu, connections)
    except Exception as exc:  # a bug or a library surprise on one hostile row; recorded, logged, not hidden
        log.warning("internal_error on row %s (%s): %s: %s", row["source_row"], row["url"], type(exc).__name__, exc)
        return {"status": "failed", "reason": f"internal_error:{type(exc).__name__}", "attempts": 1}


def process_rows(rows: list[dict], fetch_opts: FetchOptions, image_opts: ImageOptions, threads: int) -> list[dict]:
    """`process_row` of each row, `threads` downloads at once sharing one keep-alive pool; decoding
    takes one image at a time, so the task stays on the one core it was given."""
    cpu = threading.Semaphore(1)
    with ConnectionPool(max_idle=threads) as connections, \
            ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fetch") as pool:
        return list(pool.map(lambda row: process_row(row, fetch_opts, image_opts, cpu, connections), rows))


def json_value(value):
    """A kept source value as JSON can hold it (NaN -> null; dates, bytes, decimals -> text)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    return str(value)


def write_shard(task: ShardTask, cfg: IngestConfig) -> ShardResult:
    """Fetch, process and write one shard plus its index part; a committed task is skipped."""
    done = committed_result(task)
    if done is not None:
        return done
    rows = task.rows.to_pylist()
    fetch_opts = dataclasses.replace(cfg.fetch_options(), allow_schemes=task.schemes)
    image_opts = cfg.image_options()
    outcomes = [{"status": "skipped", "reason": r["skip_reason"], "attempts": 0} if r["skip_reason"] else None
                for r in rows]
    todo = [i for i, outcome in enumerate(outcomes) if outcome is None]  # skipped rows never cost a thread hop
    for i, outcome in zip(todo, process_rows([rows[i] for i in todo], fetch_opts, image_opts, cfg.fetch.threads)):
        outcomes[i] = outcome

    samples = []
    records = {name: [] for name in dataset.INDEX_SCHEMA.names}
    box_counts = detection.BoxCounts() if detection.OBJECTS_COLUMN in task.rows.column_names else None
    for row, outcome in zip(rows, outcomes):
        image = outcome.get("image")
        shard_name = ""
        if image is not None:
            shard_name = dataset.shard_name(task.split, task.shard_index)
            meta = {"url": row["url"], "label": row["label"], "width": image.original_width,
                    "height": image.original_height}
            meta.update({name: json_value(row[name]) for name in task.keep_columns})
            if box_counts is not None:
                meta.update(detection.sample_fields(row, image, box_counts))
            samples.append(dataset.encode_sample(row["key"], image.jpg, row["class_id"], meta))
        values = {"key": row["key"], "source_row": row["source_row"], "url": row["url"], "label": row["label"],
                  "class_id": row["class_id"], "status": outcome["status"], "reason": outcome["reason"],
                  "split": task.split, "shard": shard_name,
                  "width": image.width if image else None, "height": image.height if image else None,
                  "bytes": len(image.jpg) if image else None,
                  "sha256": dataset.sha256_bytes(image.jpg) if image else None, "attempts": outcome["attempts"]}
        for name, value in values.items():
            records[name].append(value)
    shard = dataset.write_shard(task.shard_url, samples) if samples else None
    index = pa.Table.from_pydict(records, schema=dataset.INDEX_SCHEMA)
    for name in task.keep_columns:  # kept source columns, typed as in the source
        index = index.append_column(task.rows.schema.field(name), task.rows.column(name))
    if box_counts is not None:  # detection: each row's boxes, so `--retry-failed` can build its sample later
        for name in (detection.OBJECTS_COLUMN, detection.IMAGE_ID_COLUMN):
            index = index.append_column(task.rows.schema.field(name), task.rows.column(name))
    meta = {"fingerprint": task.fingerprint, "shard": dataclasses.asdict(shard) if shard else None}
    if box_counts is not None:
        meta["box_counts"] = box_counts.as_dict()
    index = index.replace_schema_metadata({PART_META_KEY: json.dumps(meta, sort_keys=True).encode()})
    dataset.atomic_write_table(task.part_url, index)  # written last: its presence commits the shard
    return _summarize(task.task_id, task.split, shard, index, box_counts=meta.get("box_counts"))


# ---- the whole dataset ------------------------------------------------------------------------

def _remove_stale_temporaries(out_url: str) -> None:
    """Temporary files of writers killed mid-write (never committed, safe to delete now)."""
    fs, root = fsspec.core.url_to_fs(out_url)
    for sub in (dataset.SHARDS_DIR, dataset.INDEX_DIR, ""):
        folder = root.rstrip("/") + ("/" + sub if sub else "")
        if not fs.isdir(folder):
            continue
        for path in fs.ls(folder, detail=False):
            if path.rstrip("/").rsplit("/", 1)[-1].startswith(".tmp-"):
                fs.rm(path)


def fold_class_counts(result: ShardResult, counts: np.ndarray) -> None:
    """Add a result's per-class counts into `counts` and drop them from the result.

    A runner folds each result as it arrives, so the driver holds one array of classes instead
    of a list per shard (tens of thousands of classes x thousands of shards at web scale).
    """
    np.add.at(counts, np.asarray(result.class_ids, dtype=np.int64), np.asarray(result.class_counts, np.int64))
    result.class_ids, result.class_counts = [], []


def finalize(plan: IngestPlan, results: list[ShardResult], cfg: IngestConfig,
             class_counts: np.ndarray | None = None) -> dict:
    """Merge the shard results into classes.parquet, manifest.json and (last) _info.json.

    `class_counts`: the results' class counts already folded (`fold_class_counts`), if so.
    """
    results = sorted(results, key=lambda r: r.task_id)
    if [r.task_id for r in results] != list(range(plan.num_tasks)):
        raise IngestError(f"finalize needs all {plan.num_tasks} shard results, got {len(results)}")
    totals = {split: split_totals(results, split) for split in plan.splits}
    for split, t in totals.items():
        assert t["ok"] + t["failed"] + t["skipped"] == t["rows"], f"accounting broken for {split}: {t}"
    assert sum(t["rows"] for t in totals.values()) == plan.num_rows, "rows lost between plan and shards"
    attempted = sum(t["ok"] + t["failed"] for t in totals.values())
    failed = sum(t["failed"] for t in totals.values())
    if attempted and failed / attempted > cfg.output.max_failed_fraction:
        raise IngestError(f"{failed} of {attempted} fetched rows failed ({failed / attempted:.0%} > "
                          f"output.max_failed_fraction={cfg.output.max_failed_fraction}); reasons: "
                          f"{summary_table(totals)}\nper-row reasons are in {dataset.join(plan.out_url, 'index')}/")

    counts = np.zeros(len(plan.class_names), dtype=np.int64) if class_counts is None else class_counts
    for result in results:  # per-shard counts merged: linear in classes + shards, no per-class files
        fold_class_counts(result, counts)
    classes = pa.Table.from_arrays([pa.array(np.arange(len(counts), dtype=np.int32)),
                                    pa.array(plan.class_names, pa.string()), pa.array(counts)],
                                   schema=dataset.CLASSES_SCHEMA)
    dataset.atomic_write_table(dataset.join(plan.out_url, dataset.CLASSES_FILE), classes)
    _remove_stale_temporaries(plan.out_url)

    shards = {split: [r.shard for r in results if r.split == split and r.shard is not None] for split in plan.splits}
    manifest = {
        "format_version": dataset.FORMAT_VERSION,
        "name": cfg.output.name,
        "fingerprint": {"source": plan.source_fingerprint, "ingest": plan.fingerprint},
        "options": cfg.recorded_options(),
        "num_rows": plan.num_rows,
        "num_classes": len(plan.class_names),
        "totals": totals,
        "summary": summary_table(totals).splitlines(),
        "index": [dataset.index_part_url("", r.task_id).lstrip("/") for r in results],
        "splits": {split: {"num_samples": sum(s.num_samples for s in records),
                           "shards": [dataclasses.asdict(s) for s in records]}
                   for split, records in shards.items()},
    }
    if plan.dataset_task == detection.TASK:
        manifest.update(detection.manifest_fields([(r.split, r.box_counts) for r in results], plan.splits))
    dataset.atomic_write_json(dataset.join(plan.out_url, dataset.MANIFEST_FILE), manifest)
    dataset.write_info(plan.out_url, cfg.output.name, shards)
    return manifest
