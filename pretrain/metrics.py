"""Training measurements: step timing (data wait vs compute) and memory, for the records of pretrain.rundir.

`StepTimer` splits wall time into waiting for data and computing, which gives the data-wait
fraction and images/s.

    timer = StepTimer(); ...; timer.data_ready(); step(); timer.mark(); elapsed_s, data_s = timer.read()
"""

from __future__ import annotations

import resource
import time

import torch


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
