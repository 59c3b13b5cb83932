"""Run ingestion on Ray: one task per shard, retried on failure, progress as tasks complete.

    manifest = run_ingest("urls.parquet", "s3://bucket/ds", cfg)

`data_pipeline.ingest` does the work as pure functions; this module only schedules them.
Without `runtime.ray_address` a local Ray is started for the command (and stopped after);
with it, the driver joins that cluster. An already initialised Ray (tests, `megaclass submit`)
is used as it is. Committed shards are skipped inside the task, so a re-run after any crash
resumes where the last one stopped.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter

import numpy as np
import ray
from tqdm import tqdm

from cluster.runtime import ray_session
from data_pipeline.ingest import (IngestConfig, IngestPlan, ShardResult, check_out_location, finalize,
                                  fold_class_counts, plan_shards, summary_table, write_shard)
from data_pipeline.report import write_report

log = logging.getLogger(__name__)


@ray.remote(num_cpus=1)
def _write_shard_task(task, cfg: IngestConfig) -> tuple[ShardResult, str]:
    """One shard, and the Ray node that wrote it (for the per-node count printed at the end)."""
    return write_shard(task, cfg), ray.get_runtime_context().get_node_id()


class _Progress:
    """rows/s, ok % and ETA, fed as shard tasks complete (rows of a shard arrive together)."""

    def __init__(self, total_rows: int, enabled: bool):
        self.bar = tqdm(total=total_rows, unit="row", dynamic_ncols=True, disable=not enabled,
                        file=sys.stderr, smoothing=0.1)
        self.ok = 0
        self.attempted = 0
        self.resumed = 0

    def update(self, result: ShardResult) -> None:
        self.ok += result.status_counts.get("ok", 0)
        self.attempted += result.status_counts.get("ok", 0) + result.status_counts.get("failed", 0)
        self.resumed += int(result.skipped_existing)
        ok_pct = 100.0 * self.ok / self.attempted if self.attempted else 0.0
        self.bar.set_postfix_str(f"ok {ok_pct:.1f}% shards resumed {self.resumed}", refresh=False)
        self.bar.update(result.num_rows)

    def close(self) -> None:
        self.bar.close()


def run_plan(plan: IngestPlan, cfg: IngestConfig, nodes: Counter | None = None) -> tuple[list[ShardResult], np.ndarray]:
    """Every shard task of `plan` on the current Ray, at most ~2 tasks per CPU in flight.

    Returns the results and the per-class counts folded from them as they arrived (for `finalize`).
    nodes: counts the tasks that completed on each Ray node (by node id). A task whose node dies is
    retried elsewhere by Ray (worker and node deaths count against runtime.max_task_retries).
    """
    remote = _write_shard_task.options(max_retries=cfg.runtime.max_task_retries, retry_exceptions=[OSError])  # transient storage errors; worker deaths are always retried
    cfg_ref = ray.put(cfg)
    class_counts = np.zeros(len(plan.class_names), dtype=np.int64)
    max_in_flight = max(2, int(2 * ray.cluster_resources().get("CPU", 1)))
    progress = _Progress(plan.num_rows, cfg.runtime.progress)
    results: list[ShardResult] = []
    pending = []
    tasks = plan.tasks()  # streamed: the plan is read part by part as slots free up
    exhausted = False
    try:
        while not exhausted or pending:
            while not exhausted and len(pending) < max_in_flight:
                task = next(tasks, None)
                if task is None:
                    exhausted = True
                    break
                pending.append(remote.remote(task, cfg_ref))
            if not pending:
                break
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                result, node_id = ray.get(ref)
                if nodes is not None:
                    nodes[node_id] += 1
                progress.update(result)
                fold_class_counts(result, class_counts)
                results.append(result)
    finally:
        progress.close()
    return results, class_counts


def run_ingest(source_url: str, out_url: str, cfg: IngestConfig) -> dict:
    """Plan, run every shard task, finalize; returns the manifest. Prints the summary table."""
    start = time.monotonic()
    plan = plan_shards(source_url, out_url, cfg)
    log.info("planned %d rows, %d classes, %d shard tasks, splits %s", plan.num_rows, len(plan.class_names),
             plan.num_tasks, ", ".join(plan.splits))
    check_out_location(plan)
    nodes: Counter = Counter()
    with ray_session(cfg.runtime.ray_address, log_to_driver=False, dashboard=False):
        results, class_counts = run_plan(plan, cfg, nodes)
    manifest = finalize(plan, results, cfg, class_counts)
    elapsed = time.monotonic() - start
    print(summary_table(manifest["totals"]))
    print("shard tasks by Ray node: " + ", ".join(f"{node[:12]} {count}" for node, count in nodes.most_common()))
    print(f"{plan.num_rows} rows in {elapsed:.1f} s ({plan.num_rows / max(elapsed, 1e-9):.0f} rows/s) -> {out_url}")
    try:
        print(f"report: {write_report(out_url)}")
    except (OSError, ValueError) as exc:  # the dataset is complete; a failed page must not fail the ingest
        log.warning("dataset report not written: %s", exc)
    return manifest
