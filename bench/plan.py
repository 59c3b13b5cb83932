"""Planning at web scale: plan time, finalize time and the driver's peak RSS for URL tables in parts.

    .venv/bin/python bench/plan.py --rows 1000000 10000000 --parts 100 --classes 100000

For each size, generates (once, cached under .bench/plan/) a LAION-like source of `--parts`
parquet files: ~70-character URLs over 50k hosts, 1% repeated URLs, 0.1% malformed ones and
100k classes. Then, in a fresh process per size (so RSS counts the planner only):
  plan      plan_shards + streaming every shard task (what the driver does before and while fetching)
  finalize  finalize() over one fake result per shard, each with its classes (the merge alone)
  read      the ceiling: pyarrow reading the url and label columns of every part once, same process
and prints rows, wall and CPU seconds (CPU seconds do not grow when other work shares the
machine), the plan/read CPU ratio (plan reads each part twice and checks, hashes and
splits it, so ~2-4x is near the limit), peak RSS above the import baseline, and the growth per
million rows between the sizes, extrapolated to 65M rows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".bench" / "plan"
sys.path.insert(0, str(ROOT))


def generate(rows: int, parts: int, classes: int) -> Path:
    folder = WORK / f"{rows}-{parts}-{classes}"
    if (folder / "_done").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(rows)
    per_part = -(-rows // parts)
    for p in range(parts):
        n = min(per_part, rows - p * per_part)
        ids = np.arange(p * per_part, p * per_part + n)
        repeat = rng.random(n) < 0.01
        ids[repeat] = rng.integers(0, max(1, p * per_part + 1), repeat.sum())  # earlier rows again
        hosts = pa.array((ids * 2654435761 % 50000).astype(str))
        urls = pa.compute.binary_join_element_wise(
            "https://img", hosts, ".example-cdn.com/images/2023/", pa.array(ids.astype(str)), "/photo-large.jpg", "")
        bad = rng.random(n) < 0.001
        urls = pa.compute.if_else(pa.array(bad), "not a url", urls)
        labels = pa.array(np.char.add("class-", rng.integers(0, classes, n).astype(str)))
        pq.write_table(pa.table({"url": urls, "label": labels}), str(folder / f"part-{p:05d}.parquet"))
    (folder / "_done").write_text("ok")
    return folder


def measure(source: str, classes: int) -> dict:
    """Runs in its own process: plan + stream every task, then finalize fake results."""
    from data_pipeline.config import replace
    from data_pipeline.ingest import IngestConfig, ShardResult, finalize, plan_shards

    out = str(WORK / "out")
    cfg = replace(IngestConfig(), ["output.shard_size=30000", "runtime.progress=false"])
    rss_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start, cpu = time.monotonic(), time.process_time()
    for part in sorted(Path(source).glob("*.parquet")):
        pq.read_table(str(part), columns=["url", "label"])
    read_s, read_cpu_s = time.monotonic() - start, time.process_time() - cpu
    start, cpu = time.monotonic(), time.process_time()
    plan = plan_shards(source, out, cfg)
    sizes = [task.rows.num_rows for task in plan.tasks()]
    num_tasks = len(sizes)
    plan_s, plan_cpu_s = time.monotonic() - start, time.process_time() - cpu
    rss_plan = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rng = np.random.default_rng(0)
    fake = []
    for i in range(num_tasks):
        ids = np.unique(rng.integers(0, len(plan.class_names), 20000))
        fake.append(ShardResult(i, "train", None, sizes[i], {"ok": sizes[i]}, {}, ids.tolist(), [1] * len(ids)))
    start = time.monotonic()
    finalize(plan, fake, replace(cfg, ["output.max_failed_fraction=1.0"]))
    finalize_s = time.monotonic() - start
    return {"rows": plan.num_rows, "parts": plan.num_parts, "classes": len(plan.class_names), "shards": num_tasks,
            "skipped": dict(plan.skip_counts), "plan_s": round(plan_s, 2), "read_s": round(read_s, 2), "plan_cpu_s": round(plan_cpu_s, 2),
            "read_cpu_s": round(read_cpu_s, 2), "rss_base_mb": round(rss_base), "finalize_s": round(finalize_s, 2),
            "rss_plan_mb": round(rss_plan), "rss_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--parts", type=int, default=100)
    parser.add_argument("--classes", type=int, default=100_000)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.classes)))
        return
    results = []
    for rows in args.rows:
        source = generate(rows, args.parts, args.classes)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        line = subprocess.run([sys.executable, __file__, "--measure", str(source), "--classes", str(args.classes)],
                              check=True, capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1]
        results.append(json.loads(line))
        r = results[-1]
        print(f"{r['rows']:>10} rows {r['parts']:>4} parts {r['classes']:>7} classes {r['shards']:>5} shards: "
              f"plan {r['plan_s']:.1f} s wall, {r['plan_cpu_s']:.1f} s CPU ({r['plan_cpu_s'] / r['read_cpu_s']:.1f}x "
              f"the {r['read_cpu_s']:.1f} s CPU of the read ceiling), "
              f"finalize {r['finalize_s']:.1f} s, peak RSS {r['rss_peak_mb']} MB ({r['rss_peak_mb'] - r['rss_base_mb']} MB "
              f"above the {r['rss_base_mb']} MB after imports); skipped {r['skipped']}", flush=True)
    if len(results) > 1:
        a, b = results[0], results[-1]
        per_m_s = (b["plan_cpu_s"] - a["plan_cpu_s"]) / ((b["rows"] - a["rows"]) / 1e6)
        per_m_mb = (b["rss_peak_mb"] - a["rss_peak_mb"]) / ((b["rows"] - a["rows"]) / 1e6)
        print(f"growth: {per_m_s:.2f} CPU-s and {per_m_mb:.0f} MB per million rows; extrapolated to 65M rows: "
              f"plan {b['plan_cpu_s'] + per_m_s * (65 - b['rows'] / 1e6):.0f} CPU-s, "
              f"peak RSS {b['rss_peak_mb'] + per_m_mb * (65 - b['rows'] / 1e6):.0f} MB")


if __name__ == "__main__":
    main()
