"""The dataset report: what a dataset holds and what ingestion refused, gathered for one static page.

    data = gather_report("s3://bucket/ds")                  # a JSON-able dict (also saved as report.json)
    write_report("s3://bucket/ds")                          # -> s3://bucket/ds/report/index.html + report.json

Everything comes from contract-1 files (manifest.json, classes.parquet, index/ parts, shards), so it
works wherever fsspec reaches. The index is streamed one part at a time and reduced to counts and
integer histograms, so memory grows with the number of classes and domains, never with rows. The
thumbnails need image bytes: samples of the selected classes are chosen from the index, the shards
holding most of them are read first, and at most `max_shards` shards are opened; every thumbnail's
bytes are checked against the sha256 the index recorded. Unreadable or altered samples and missing
index parts are listed under `problems` instead of stopping the report.
"""

from __future__ import annotations

import base64
import io
import logging
import tarfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from data_pipeline import dataset as ds

log = logging.getLogger(__name__)

REPORT_DIR = "report"
HTML_FILE = "index.html"
JSON_FILE = "report.json"
# scheme://[userinfo@]host -- the host is what "domain" means in the report.
_HOST_RE = r"^[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/?#]*@)?(?P<host>\[[^\]/]*\]|[^:/?#]*)"
_INDEX_COLUMNS = ["key", "url", "class_id", "status", "reason", "split", "shard", "width", "height", "bytes", "sha256"]
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


@dataclass(frozen=True)
class ReportOptions:
    num_classes_shown: int = 12     # classes in each thumbnail grid (largest, rarest)
    thumbs_per_class: int = 8       # thumbnails per class
    thumb_px: int = 96              # longer side of a thumbnail, px
    max_shards: int = 16            # shards opened at most to find thumbnails
    max_domains: int = 25           # domains listed one by one; the rest are summed
    max_thumb_pixels: int = 64_000_000  # a stored image above this is not decoded (recorded as a problem)

    def validate(self) -> None:
        for name in ("num_classes_shown", "thumbs_per_class", "thumb_px", "max_shards", "max_domains"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


class _Histogram:
    """Counts of non-negative integers in buckets of `bucket` units (exact for bucket=1); grows as needed."""

    def __init__(self, bucket: int = 1) -> None:
        self.bucket = bucket
        self.counts = np.zeros(0, dtype=np.int64)

    def add(self, values: np.ndarray) -> None:
        values = values[values >= 0].astype(np.int64) // self.bucket
        if values.size:
            found = np.bincount(values)
            if found.size > self.counts.size:
                self.counts = np.pad(self.counts, (0, found.size - self.counts.size))
            self.counts[:found.size] += found

    def summary(self) -> dict[str, Any]:
        total = int(self.counts.sum())
        if not total:
            return {"count": 0}
        cumulative = np.cumsum(self.counts)
        quantile = {f"p{q}": self.bucket * int(np.searchsorted(cumulative, total * q / 100, side="left"))
                    for q in (1, 10, 50, 90, 99)}
        nonzero = np.nonzero(self.counts)[0]
        return {"count": total, "bucket": self.bucket, "min": self.bucket * int(nonzero[0]),
                "max": self.bucket * int(nonzero[-1]), **quantile,
                "values": (self.bucket * nonzero).tolist(), "counts": self.counts[nonzero].tolist()}


def _domains(urls: pa.ChunkedArray) -> pa.Array:
    parsed = pc.struct_field(pc.extract_regex(urls, _HOST_RE), "host")
    hosts = pc.utf8_lower(parsed)
    hosts = pc.if_else(pc.equal(hosts, ""), pa.scalar("(no host)"), hosts)
    return pc.fill_null(hosts, "(no host)")


class _IndexTally:
    """Counts by status/reason and domain, size histograms and thumbnail candidates, part by part."""

    def __init__(self, wanted: set[int], pool_per_class: int):
        self._groups: list[pa.Table] = []               # (status, reason, domain, rows) per part, merged now and then
        self.width, self.height, self.bytes = _Histogram(), _Histogram(), _Histogram(bucket=256)
        self.wanted, self.pool_per_class = wanted, pool_per_class
        self.candidates: dict[int, list[tuple[str, str, str]]] = defaultdict(list)  # class -> [(shard, key, sha)]
        self.rows = 0

    def add(self, part: pa.Table) -> None:
        self.rows += part.num_rows
        reason = pc.fill_null(part.column("reason"), "")
        status = part.column("status")
        rows = pa.table({"status": status, "reason": reason, "domain": _domains(part.column("url")),
                         "rows": pa.repeat(pa.scalar(1, pa.int64()), part.num_rows)})
        self._groups.append(_group_rows(rows))
        if len(self._groups) >= 64:  # bounded: memory follows the distinct (status, reason, domain), not the parts
            self._groups = [_group_rows(pa.concat_tables(self._groups))]
        ok = part.filter(pc.equal(status, "ok"))
        for column, hist in (("width", self.width), ("height", self.height)):
            hist.add(ok.column(column).fill_null(-1).to_numpy())
        self.bytes.add(ok.column("bytes").fill_null(-1).to_numpy())
        if self.wanted:
            mask = pc.is_in(ok.column("class_id"), value_set=pa.array(sorted(self.wanted), pa.int32()))
            for row in ok.filter(mask).select(["class_id", "shard", "key", "sha256"]).to_pylist():
                pool = self.candidates[row["class_id"]]
                if len(pool) < self.pool_per_class:
                    pool.append((row["shard"], row["key"], row["sha256"]))


    def counts(self) -> tuple[Counter, dict[str, Counter]]:
        """(rows by (status, reason), {domain: {"rows", "ok", "failed", "skipped", "reason:R": rows}})."""
        reasons: Counter = Counter()
        by_domain: dict[str, Counter] = defaultdict(Counter)
        if not self._groups:
            return reasons, by_domain
        for row in _group_rows(pa.concat_tables(self._groups)).to_pylist():  # one Python pass, at the end
            count = row["rows"]
            reasons[(row["status"], row["reason"])] += count
            entry = by_domain[row["domain"]]
            entry["rows"] += count
            entry[row["status"]] += count
            if row["reason"]:
                entry["reason:" + row["reason"]] += count
        return reasons, by_domain


def _group_rows(table: pa.Table) -> pa.Table:
    summed = table.group_by(["status", "reason", "domain"]).aggregate([("rows", "sum")])
    return summed.rename_columns({"rows_sum": "rows"})


def _read_part(url: str) -> pa.Table:
    with fsspec.open(url, "rb") as f:
        table = pq.read_table(f)
    return table.select([c for c in _INDEX_COLUMNS if c in table.column_names])


def _class_selection(classes: pa.Table, opts: ReportOptions) -> tuple[list[dict], list[dict]]:
    """(largest, rarest) classes with images; with few classes each grid gets half of them."""
    rows = [r for r in classes.to_pylist() if r["count"] > 0]
    num_largest = min(opts.num_classes_shown, (len(rows) + 1) // 2)
    largest = sorted(rows, key=lambda r: (-r["count"], r["id"]))[:num_largest]
    shown = {r["id"] for r in largest}
    rarest = [r for r in sorted(rows, key=lambda r: (r["count"], r["id"])) if r["id"] not in shown]
    return largest, rarest[:opts.num_classes_shown]


def _thumbnail(jpg: bytes, opts: ReportOptions) -> str:
    """A small JPEG data URI, decoded with a pixel cap (stored bytes may come from anyone)."""
    with Image.open(io.BytesIO(jpg)) as img:
        if img.width * img.height > opts.max_thumb_pixels:
            raise ValueError(f"{img.width}x{img.height} px exceeds the thumbnail decode cap")
        img.draft("RGB", (opts.thumb_px, opts.thumb_px))
        img = img.convert("RGB")
        img.thumbnail((opts.thumb_px, opts.thumb_px))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plan_shards(candidates: dict[int, list[tuple[str, str, str]]], need: int, max_shards: int) -> list[str]:
    """Greedy: open first the shard that still covers the most missing thumbnails."""
    missing = {c: need for c in candidates}
    chosen: list[str] = []
    while len(chosen) < max_shards:
        gain: Counter = Counter()
        for class_id, pool in candidates.items():
            per_shard = Counter(shard for shard, _, _ in pool if shard not in chosen)
            for shard, count in per_shard.items():
                gain[shard] += min(count, missing[class_id])
        if not gain or max(gain.values()) == 0:
            break
        best = min(gain, key=lambda s: (-gain[s], s))
        chosen.append(best)
        for class_id, pool in candidates.items():
            missing[class_id] = max(0, missing[class_id] - sum(1 for shard, _, _ in pool if shard == best))
    return chosen


def _collect_thumbnails(root: str, manifest: dict, wanted: set[int], candidates: dict | None,
                        opts: ReportOptions, problems: list[str]) -> dict[int, list[str]]:
    """class id -> thumbnail data URIs. Without an index, the first shards are scanned by label."""
    thumbs: dict[int, list[str]] = defaultdict(list)
    if not wanted:
        return thumbs
    if candidates is not None:
        expected = {key: (class_id, sha) for class_id, pool in candidates.items() for _, key, sha in pool}
        shards = _plan_shards(candidates, opts.thumbs_per_class, opts.max_shards)
    else:
        expected = None
        shards = [s["name"] for entry in manifest.get("splits", {}).values() for s in entry["shards"]][:opts.max_shards]
    for shard in shards:
        url = ds.join(root, ds.SHARDS_DIR, shard)
        try:
            for sample in ds.iter_shard(url):
                key = sample.get("__key__", "")
                if expected is not None:
                    if key not in expected:
                        continue
                    class_id, sha = expected[key]
                else:
                    try:
                        class_id, sha = int(sample.get("cls", b"-1")), None
                    except ValueError:
                        continue
                if class_id not in wanted or len(thumbs[class_id]) >= opts.thumbs_per_class:
                    continue
                jpg = sample.get("jpg", b"")
                if sha is not None and ds.sha256_bytes(jpg) != sha:
                    problems.append(f"{shard}/{key}: image bytes differ from the sha256 in the index")
                    continue
                try:
                    thumbs[class_id].append(_thumbnail(jpg, opts))
                except _IMAGE_ERRORS as exc:
                    problems.append(f"{shard}/{key}: undecodable image ({exc})")
                if all(len(thumbs[c]) >= opts.thumbs_per_class for c in wanted):
                    return thumbs
        except (OSError, EOFError, ValueError, tarfile.TarError) as exc:  # a damaged shard is a finding
            problems.append(f"{shard}: unreadable shard ({exc})")
    return thumbs


def _domain_rows(by_domain: dict[str, Counter], max_domains: int) -> tuple[list[dict], int]:
    ranked = sorted(by_domain.items(), key=lambda kv: (-kv[1]["rows"], kv[0]))
    rows = []
    for domain, counts in ranked[:max_domains]:
        rows.append(_domain_row(domain, [counts]))
    if len(ranked) > max_domains:
        rows.append(_domain_row(f"({len(ranked) - max_domains} other domains)", [c for _, c in ranked[max_domains:]]))
    return rows, len(ranked)


def _domain_row(domain: str, counters: list[Counter]) -> dict:
    total: Counter = Counter()
    for counts in counters:
        total.update(counts)
    reasons = {k.split(":", 1)[1]: v for k, v in total.items() if k.startswith("reason:")}
    return {"domain": domain, "rows": total["rows"], "ok": total["ok"], "failed": total["failed"],
            "skipped": total["skipped"], "reasons": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))}


def gather_report(root: str, opts: ReportOptions = ReportOptions()) -> dict[str, Any]:
    """Everything the page shows, as plain JSON-able data. DatasetError if `root` is not a dataset."""
    opts.validate()
    manifest = ds.read_manifest(root)
    classes = ds.read_classes(root).sort_by("id")
    largest, rarest = _class_selection(classes, opts)
    wanted = {r["id"] for r in largest + rarest}
    problems: list[str] = []
    tally = _IndexTally(wanted, pool_per_class=4 * opts.thumbs_per_class)
    parts = manifest.get("index")
    for rel in parts or []:
        url = ds.join(root, rel)
        try:
            tally.add(_read_part(url))
        except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
            problems.append(f"{rel}: unreadable index part ({exc})")
    have_index = bool(parts) and tally.rows > 0
    if not parts:
        problems.append("manifest.json lists no index parts: per-row sections are empty")
    thumbs = _collect_thumbnails(root, manifest, wanted, tally.candidates if have_index else None, opts, problems)
    counts = classes.column("count").to_numpy()
    ordered = np.sort(counts)[::-1]
    total = int(counts.sum())
    top = max(1, len(ordered) // 100)
    reasons, by_domain = tally.counts()
    domains, num_domains = _domain_rows(by_domain, opts.max_domains)

    def grid(rows: list[dict]) -> list[dict]:
        return [{"id": r["id"], "name": r["name"], "count": r["count"], "thumbs": thumbs.get(r["id"], [])}
                for r in rows]

    return {
        "dataset": {"url": str(root), "name": manifest.get("name"), "format_version": manifest.get("format_version"),
                    "num_rows": manifest.get("num_rows", tally.rows), "num_classes": len(counts),
                    "splits": {s: {"num_samples": e.get("num_samples", 0), "num_shards": len(e.get("shards", [])),
                                   "bytes": sum(int(x.get("bytes", 0)) for x in e.get("shards", []))}
                               for s, e in manifest.get("splits", {}).items()},
                    "totals": manifest.get("totals", {})},
        "classes": {"counts_desc": ordered.tolist(), "num_empty": int((counts == 0).sum()),
                    "median": float(np.median(counts)) if len(counts) else 0.0,
                    "max": int(ordered[0]) if len(ordered) else 0,
                    "top_1pct_share": float(ordered[:top].sum() / total) if total else 0.0},
        "reasons": [{"status": s, "reason": r, "rows": n}
                    for (s, r), n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))],
        "domains": domains, "num_domains": num_domains, "have_index": have_index,
        "sizes": {"width_px": tally.width.summary(), "height_px": tally.height.summary(),
                  "bytes": tally.bytes.summary()},
        "largest": grid(largest), "rarest": grid(rarest),
        "problems": problems,
    }


def write_report(root: str, out_url: str | None = None, opts: ReportOptions = ReportOptions()) -> str:
    """Gather, render and write OUT/index.html (self-contained) and OUT/report.json; returns the page URL."""
    from data_pipeline.report_page import render_page

    out_url = out_url or ds.join(root, REPORT_DIR)
    data = gather_report(root, opts)
    summary = {**data, **{g: [{**c, "thumbs": len(c["thumbs"])} for c in data[g]] for g in ("largest", "rarest")}}
    ds.atomic_write_json(ds.join(out_url, JSON_FILE), summary)
    page_url = ds.join(out_url, HTML_FILE)
    ds.atomic_write_bytes(page_url, render_page(data).encode("utf-8"))
    return page_url
