"""Run ingestion: one task per shard, on Ray or in local processes, retried on failure, progress as tasks complete.

    manifest = run_ingest("urls.parquet", "s3://bucket/ds", cfg)

`data_pipeline.ingest` does the work as pure functions; this module only schedules them.
`runtime.executor` decides where: with a cluster to use (`runtime.ray_address`, $RAY_ADDRESS, or
an already initialised Ray: tests, `megaclass submit`) the tasks are Ray tasks; on one machine
without one (`auto`), a pool of local processes runs them, which starts in a fraction of a second
where starting and stopping a local Ray costs seconds; `ray` starts a local Ray anyway. Both
retry a task whose process dies and give byte-identical output. Committed shards are skipped
inside the task, so a re-run after any crash resumes where the last one stopped.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

import numpy as np
from tqdm import tqdm

from data_pipeline import apply_allocator_settings
from data_pipeline.ingest import (IngestConfig, IngestError, IngestPlan, ShardResult, check_out_location, finalize,
                                  fold_class_counts, plan_shards, summary_table, write_shard)
from data_pipeline.report import write_report

log = logging.getLogger(__name__)

# Ray is imported only on the Ray path: a one-machine run on the local executor never pays for it.


def _write_shard_task(task, cfg: IngestConfig) -> tuple[ShardResult, str]:
    """One shard, and the Ray node that wrote it (for the per-node count printed at the end)."""
    import ray

    return write_shard(task, cfg), ray.get_runtime_context().get_node_id()


@functools.cache
def _remote_write_shard():
    import ray

    return ray.remote(num_cpus=1)(_write_shard_task)


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
    import ray

    # retried: transient storage errors (OSError); worker and node deaths always
    remote = _remote_write_shard().options(max_retries=cfg.runtime.max_task_retries, retry_exceptions=[OSError])
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


def uses_ray(cfg: IngestConfig) -> bool:
    """Whether `runtime.executor` (auto: a cluster address or a running Ray) sends the tasks to Ray."""
    if cfg.runtime.executor != "auto":
        return cfg.runtime.executor == "ray"
    ray = sys.modules.get("ray")  # not imported: certainly not initialised
    return bool(cfg.runtime.ray_address or os.environ.get("RAY_ADDRESS") or (ray and ray.is_initialized()))


def _local_worker_start() -> None:
    """Initializer of local workers: the allocator settings, and SIGKILL when the driver dies (Linux),
    so a killed run leaves no orphans."""
    apply_allocator_settings()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: an orphan finishes its shard (committed atomically) and exits


def local_workers(cfg: IngestConfig) -> int:
    """Processes of the local executor: `runtime.local_workers`, or one per core this process may use."""
    return cfg.runtime.local_workers or len(os.sched_getaffinity(0))


def start_local_pool(cfg: IngestConfig) -> ProcessPoolExecutor:
    """`runtime.local_workers` processes (0: one per core this process may use), forked now.

    Forked, not spawned: a worker costs milliseconds instead of an interpreter start and imports,
    and no caller needs an `if __name__ == "__main__"` guard. Forked before planning starts
    Arrow's thread pool, so the only other threads copied are idle ones (numpy's OpenBLAS), whose
    libraries reinitialise after a fork.
    """
    pool = ProcessPoolExecutor(local_workers(cfg), mp_context=multiprocessing.get_context("fork"),
                               initializer=_local_worker_start)
    pool.submit(int).result()  # a fork pool starts every worker on its first task
    return pool


def run_plan_local(plan: IngestPlan, cfg: IngestConfig,
                   pool: ProcessPoolExecutor | None = None) -> tuple[list[ShardResult], np.ndarray]:
    """Every shard task of `plan` in a pool of local worker processes, at most 2 tasks per worker queued.

    pool: from `start_local_pool` (started here if None); shut down on return. As on Ray, a task
    whose process dies (OOM killer, SIGKILL) or that raises OSError runs again, up to
    `runtime.max_task_retries` times; a dead process breaks the pool, so every task in flight
    runs again in a new one.
    """
    class_counts = np.zeros(len(plan.class_names), dtype=np.int64)
    progress = _Progress(plan.num_rows, cfg.runtime.progress)
    results: list[ShardResult] = []
    failures: Counter = Counter()
    again: deque = deque()
    tasks = plan.tasks()
    pending: dict = {}
    try:
        while True:
            if pool is None:
                pool = start_local_pool(cfg)
            broken = False  # a worker died while idle: the pool refuses new tasks
            while not broken and len(pending) < 2 * local_workers(cfg):
                task = again.popleft() if again else next(tasks, None)
                if task is None:
                    break
                try:
                    pending[pool.submit(write_shard, task, cfg)] = task
                except BrokenProcessPool:
                    again.appendleft(task)
                    broken = True
            if not pending and not broken:
                break
            failed = []
            if not broken:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    task = pending.pop(future)
                    try:
                        result = future.result()
                    except (BrokenProcessPool, OSError) as exc:
                        failed.append((task, exc))
                        continue
                    progress.update(result)
                    fold_class_counts(result, class_counts)
                    results.append(result)
            if broken or any(isinstance(exc, BrokenProcessPool) for _, exc in failed):
                failed += [(task, BrokenProcessPool("a worker process died")) for task in pending.values()]
                pending.clear()
                pool.shutdown(wait=False, cancel_futures=True)
                pool = None
            for task, exc in failed:
                failures[task.task_id] += 1
                if failures[task.task_id] > cfg.runtime.max_task_retries:
                    raise IngestError(f"shard task {task.task_id} ({task.shard_url}) failed "
                                      f"{failures[task.task_id]} times; last: {type(exc).__name__}: {exc}") from exc
                log.warning("shard task %d failed (%s: %s); running it again", task.task_id, type(exc).__name__, exc)
                again.append(task)
        pool.shutdown()
        pool = None
    finally:
        progress.close()
        if pool is not None:  # an error or an interrupt: no new task starts, the running ones end with us
            pool.shutdown(wait=False, cancel_futures=True)
    return results, class_counts


def run_ingest(source_url: str, out_url: str, cfg: IngestConfig) -> dict:
    """Plan, run every shard task, finalize; returns the manifest. Prints the summary table."""
    start = time.monotonic()
    pool = None if uses_ray(cfg) else start_local_pool(cfg)
    try:
        plan = plan_shards(source_url, out_url, cfg)
        log.info("planned %d rows, %d classes, %d shard tasks, splits %s", plan.num_rows, len(plan.class_names),
                 plan.num_tasks, ", ".join(plan.splits))
        check_out_location(plan)
    except BaseException:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        raise
    nodes: Counter = Counter()
    if pool is None:
        from cluster.runtime import ray_session

        with ray_session(cfg.runtime.ray_address, log_to_driver=False, dashboard=False):
            results, class_counts = run_plan(plan, cfg, nodes)
    else:
        results, class_counts = run_plan_local(plan, cfg, pool)
    manifest = finalize(plan, results, cfg, class_counts)
    elapsed = time.monotonic() - start
    print(summary_table(manifest["totals"]))
    if nodes:
        print("shard tasks by Ray node: " + ", ".join(f"{node[:12]} {count}" for node, count in nodes.most_common()))
    print(f"{plan.num_rows} rows in {elapsed:.1f} s ({plan.num_rows / max(elapsed, 1e-9):.0f} rows/s) -> {out_url}")
    try:
        print(f"report: {write_report(out_url)}")
    except (OSError, ValueError) as exc:  # the dataset is complete; a failed page must not fail the ingest
        log.warning("dataset report not written: %s", exc)
    return manifest
