"""Run observability: step timing, metrics.jsonl + TensorBoard in the run dir, a PNG of the curves.

Only rank 0 writes. `StepTimer` splits wall time into waiting for data and computing, which gives
the data-wait fraction and images/s. On resume, records past the resumed step (written after the
checkpoint by the run that died) are dropped, so the files describe the run that actually counts.

    timer = StepTimer(); log = MetricsLog(run_url, enabled=dist.is_main, start_step=step)
    log.write(step, {"loss": 2.3, ...}); log.close(); plot_curves(run_url)
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import resource
import socket
import time
from typing import Any

import fsspec
import torch

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CURVES_FILE = "curves.png"


class StepTimer:
    """Accumulates data-wait and total seconds between `read()` calls."""

    def __init__(self) -> None:
        self.data_s = 0.0
        self.start = time.perf_counter()
        self._mark = self.start

    def data_ready(self) -> None:
        """Call when a batch arrived: time since the last mark counts as data wait."""
        now = time.perf_counter()
        self.data_s += now - self._mark
        self._mark = now

    def mark(self) -> None:
        """Call when compute for the batch is done."""
        self._mark = time.perf_counter()

    def read(self) -> tuple[float, float]:
        """(elapsed_s, data_wait_s) since the last read; resets."""
        now = time.perf_counter()
        elapsed, data = now - self.start, self.data_s
        self.start, self._mark, self.data_s = now, now, 0.0
        return elapsed, data


def memory_stats(device: torch.device) -> dict[str, float]:
    stats = {"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        stats["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return stats


def _is_local(url: str) -> bool:
    fs, _ = fsspec.core.url_to_fs(url)
    return "file" in ({fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol))


def read_metrics(run_url: str) -> list[dict[str, Any]]:
    url = posixpath.join(run_url.rstrip("/"), METRICS_FILE)
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return []
    return [json.loads(line) for line in fs.cat_file(path).decode().splitlines() if line.strip()]


class MetricsLog:
    """metrics.jsonl (one JSON object per log step) and TensorBoard scalars, rank 0 only.

    The JSONL file is rewritten whole on each write for object stores (no append there) and appended
    locally. TensorBoard needs a local run dir; elsewhere it is skipped with a warning.
    """

    def __init__(self, run_url: str, *, enabled: bool, start_step: int = 0, tensorboard: bool = True):
        self.run_url = run_url.rstrip("/")
        self.enabled = enabled
        self.url = posixpath.join(self.run_url, METRICS_FILE)
        self.local = _is_local(self.run_url)
        self.records: list[dict[str, Any]] = []
        self.writer = None
        if not enabled:
            return
        self.records = [r for r in read_metrics(self.run_url) if r.get("step", 0) <= start_step]
        self._rewrite()
        if tensorboard and self.local:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(posixpath.join(fsspec.core.url_to_fs(self.run_url)[1], TENSORBOARD_DIR),
                                        purge_step=start_step + 1)
        elif tensorboard:
            log.warning("TensorBoard events need a local run dir; %s is not local, skipping them", self.run_url)

    def _rewrite(self) -> None:
        fs, path = fsspec.core.url_to_fs(self.url)
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write("".join(json.dumps(r) + "\n" for r in self.records).encode())

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # host and pid say which process wrote the record (and which one to look at, or stop)
        record = {"step": step, "time": time.time(), "host": socket.gethostname(), "pid": os.getpid(), **values}
        self.records.append(record)
        if self.local:
            with fsspec.open(self.url, "a") as f:
                f.write(json.dumps(record) + "\n")
        else:
            self._rewrite()
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)
        log.info("step %d %s", step, " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in values.items()))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_curves(run_url: str) -> str | None:
    """Write RUN/curves.png: training loss and held-out top-1 against the step. Returns its URL."""
    records = read_metrics(run_url)
    if not records:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    loss = [(r["step"], r["loss"]) for r in records if "loss" in r]
    acc = [(r["step"], r["eval_top1"]) for r in records if "eval_top1" in r]
    if loss:
        ax_loss.plot(*zip(*loss), label="train loss")
    ax_loss.set_xlabel("step"), ax_loss.set_ylabel("loss"), ax_loss.set_title("training loss")
    if acc:
        ax_acc.plot(*zip(*acc), marker="o", label="held-out top-1")
    ax_acc.set_xlabel("step"), ax_acc.set_ylabel("top-1"), ax_acc.set_title("held-out top-1")
    fig.tight_layout()
    url = posixpath.join(run_url.rstrip("/"), CURVES_FILE)
    with fsspec.open(url, "wb") as f:
        fig.savefig(f, format="png", dpi=80)
    plt.close(fig)
    return url
