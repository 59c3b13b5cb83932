"""The run dir (`checkpoint.url`, any fsspec URL) of pretraining and fine-tuning, and its one metrics log.

    RUN/config.yaml      the resolved config
    RUN/metrics.jsonl    one JSON record per log/eval event: {"step", "time", "host", "pid", KEY: value, ...}
    RUN/metrics.parts/   remote run dirs only, while a run is going: bounded pieces of metrics.jsonl
    RUN/tensorboard/     TensorBoard events (written locally, synced here for remote run dirs)
    RUN/step-NNNNNNNN/   resumable run checkpoints (contract 2 + train_state/)
    RUN/best/, final/    fine-tuning's best model so far / the model to publish (contract 2)
    RUN/curves.png       loss and held-out top-1 against the step
    RUN/trackers.json    ids of the MLflow / W&B runs (log.trackers), so a resume continues them (pretrain.trackers)

Only rank 0 writes (`is_main`). On a resume, records and TensorBoard events past the resumed step
(written after the checkpoint by the run that died) are dropped, so the files describe the run
that counts. Object stores cannot append, so a remote run writes its records in pieces of at most
`piece_records` (each log rewrites only the current piece) and joins them into metrics.jsonl
when it closes; `read_metrics` reads both, so a run that died before closing reads whole.

Metric names are the module constants below, the same in every stage:

    run = RunDir(run_url, is_main=dist.is_main, start_step=step)
    run.log(step, {LOSS: 2.3, LR: 0.1, EVAL_TOP1: 0.41}); run.close(); plot_curves(run_url)
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
import socket
import tempfile
import time
from typing import Any

import fsspec

from data_pipeline.config import to_yaml
from data_pipeline.dataset import atomic_write_bytes, is_local, join, read_jsonl
from pretrain.checkpoint import prune_checkpoints, step_dir_name
from pretrain.trackers import Trackers, open_trackers

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
METRICS_PARTS_DIR = "metrics.parts"
TENSORBOARD_DIR = "tensorboard"
CURVES_FILE = "curves.png"
BEST_DIR = "best"
FINAL_DIR = "final"

# The metric keys of metrics.jsonl, TensorBoard and the reports, for every stage.
STEP = "step"
LOSS = "loss"                      # training loss (mean over the steps since the last log)
LR = "lr"                          # peak learning rate over the parameter groups
IMAGES_PER_S = "images_per_s"      # global training throughput
EVAL_TOP1 = "eval_top1"            # held-out top-1 (pretrain: the eval split; finetune: the validation data)
EVAL_TOP5 = "eval_top5"
BEST_EVAL_TOP1 = "best_eval_top1"  # the best EVAL_TOP1 so far (finetune selects its model by it)
EVENT = "event"                    # "resume", "final": records that mark a point of the run, not a measurement


def read_metrics(run_url: str) -> list[dict[str, Any]]:
    """Every record of the run, in order: metrics.jsonl, then any pieces a remote run has not joined yet."""
    records = read_jsonl(join(run_url, METRICS_FILE))
    for url in _part_urls(run_url):
        records.extend(read_jsonl(url))
    return records


def _part_urls(run_url: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(join(run_url, METRICS_PARTS_DIR))
    if not fs.exists(path):
        return []
    names = sorted(posixpath.basename(p) for p in fs.ls(path, detail=False) if p.endswith(".jsonl"))
    return [join(run_url, METRICS_PARTS_DIR, name) for name in names]


def _jsonl(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


class RunDir:
    """The files of one run; writes happen on rank 0 only, every other rank gets no-ops."""

    def __init__(self, url: str, *, is_main: bool, start_step: int = 0, tensorboard: bool = True,
                 piece_records: int = 1000, tensorboard_sync_s: float = 60.0, trackers: Trackers | None = None):
        self.url = url.rstrip("/")
        self.trackers = trackers or Trackers(self.url, {})
        self.is_main = is_main
        self.local = is_local(self.url)
        self.piece_records = piece_records
        self.tensorboard_sync_s = tensorboard_sync_s
        self._piece: list[dict[str, Any]] = []  # remote: the records of the piece being written
        self._piece_index = 0
        self._writer = None
        self._tb_local_dir: str | None = None   # remote: where events are written before each sync
        self._tb_synced = 0.0
        if not is_main:
            return
        self._truncate(start_step)
        if tensorboard:
            self._open_tensorboard(start_step)

    # -- layout --------------------------------------------------------------------------------------

    def step_url(self, step: int) -> str:
        return join(self.url, step_dir_name(step))

    @property
    def best_url(self) -> str:
        return join(self.url, BEST_DIR)

    @property
    def final_url(self) -> str:
        return join(self.url, FINAL_DIR)

    def write_config(self, cfg: Any) -> None:
        if self.is_main:
            atomic_write_bytes(join(self.url, CONFIG_FILE), to_yaml(cfg).encode())

    def prune(self, keep: int) -> None:
        """Delete all but the newest `keep` step checkpoints."""
        if self.is_main:
            prune_checkpoints(self.url, keep)

    # -- metrics -------------------------------------------------------------------------------------

    def _truncate(self, start_step: int) -> None:
        """Drop what a dead run wrote past `start_step`; remote: join earlier pieces into metrics.jsonl."""
        parts = [] if self.local else _part_urls(self.url)
        records = read_metrics(self.url)
        kept = [r for r in records if r.get(STEP, 0) <= start_step]
        if len(kept) != len(records) or parts:
            atomic_write_bytes(join(self.url, METRICS_FILE), _jsonl(kept))
            self._remove(parts)

    def _remove(self, urls: list[str]) -> None:
        for url in urls:
            fs, path = fsspec.core.url_to_fs(url)
            fs.rm(path)

    def log(self, step: int, values: dict[str, Any]) -> None:
        """Append one record (host and pid say which process wrote it); its numbers to TensorBoard and the trackers."""
        if not self.is_main:
            return
        record = {STEP: step, "time": time.time(), "host": socket.gethostname(), "pid": os.getpid(), **values}
        if self.local:
            with fsspec.open(join(self.url, METRICS_FILE), "a") as f:
                f.write(json.dumps(record) + "\n")
        else:
            if len(self._piece) >= self.piece_records:
                self._piece, self._piece_index = [], self._piece_index + 1
            self._piece.append(record)
            atomic_write_bytes(join(self.url, METRICS_PARTS_DIR, f"{self._piece_index:06d}.jsonl"), _jsonl(self._piece))
        if self._writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(key, value, step)
            self._sync_tensorboard(force=False)
        self.trackers.log(step, values)
        log.info("step %d %s", step, " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in values.items()))

    def finish(self) -> None:
        """The normal end of a run: write curves.png, give config.yaml and curves.png to the trackers, close."""
        if self.is_main:
            plot_curves(self.url)
            for name in (CONFIG_FILE, CURVES_FILE):
                self.trackers.log_artifact(join(self.url, name))
        self.close()

    def close(self, success: bool = True) -> None:
        """Flush TensorBoard; remote: sync it and join the pieces into metrics.jsonl; end the tracker runs."""
        if not self.is_main:
            return
        self.trackers.close(success)
        if self._writer is not None:
            self._writer.close()
            self._sync_tensorboard(force=True)
            self._writer = None
            if self._tb_local_dir:
                shutil.rmtree(self._tb_local_dir, ignore_errors=True)
        if not self.local and self._piece:
            self._truncate(start_step=2**62)  # keeps every record, joins the pieces
            self._piece, self._piece_index = [], 0

    # -- TensorBoard ---------------------------------------------------------------------------------

    def _open_tensorboard(self, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if self.local:
            events_dir = join(fsspec.core.url_to_fs(self.url)[1], TENSORBOARD_DIR)
        else:  # the event writer needs a local file; the run dir gets copies (see _sync_tensorboard)
            self._tb_local_dir = events_dir = tempfile.mkdtemp(prefix="megaclass-tensorboard-")
        # purge_step: TensorBoard discards the dead run's events past the resumed step
        self._writer = SummaryWriter(events_dir, purge_step=start_step + 1 if start_step else None)
        self._tb_synced = time.monotonic()

    def _sync_tensorboard(self, force: bool) -> None:
        """Copy the local event files to RUN/tensorboard/ (remote run dirs), at most every tensorboard_sync_s."""
        if self._tb_local_dir is None or self._writer is None and not force:
            return
        if not force and time.monotonic() - self._tb_synced < self.tensorboard_sync_s:
            return
        if self._writer is not None:
            self._writer.flush()
        for name in sorted(os.listdir(self._tb_local_dir)):
            with open(os.path.join(self._tb_local_dir, name), "rb") as f:
                atomic_write_bytes(join(self.url, TENSORBOARD_DIR, name), f.read())
        self._tb_synced = time.monotonic()


def create_run_dir(cfg: Any, *, is_main: bool, start_step: int = 0) -> RunDir:
    """The run dir of a training config (checkpoint.url) with TensorBoard and the trackers named in cfg.log."""
    from data_pipeline.config import to_dict

    names = list(cfg.log.trackers)
    trackers = open_trackers(names, cfg.checkpoint.url, is_main=is_main, config=to_dict(cfg), options=cfg.log.tracking)
    return RunDir(cfg.checkpoint.url, is_main=is_main, start_step=start_step,
                  tensorboard=cfg.log.tensorboard and "tensorboard" in names, trackers=trackers)


def plot_curves(run_url: str) -> str | None:
    """Write RUN/curves.png: training loss and held-out top-1 against the step. Returns its URL."""
    records = read_metrics(run_url)
    if not records:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    loss = [(r[STEP], r[LOSS]) for r in records if LOSS in r]
    acc = [(r[STEP], r[EVAL_TOP1]) for r in records if EVAL_TOP1 in r]
    if loss:
        ax_loss.plot(*zip(*loss), label="train loss")
    ax_loss.set_xlabel("step"), ax_loss.set_ylabel("loss"), ax_loss.set_title("training loss")
    if acc:
        ax_acc.plot(*zip(*acc), marker="o", label="held-out top-1")
    ax_acc.set_xlabel("step"), ax_acc.set_ylabel("top-1"), ax_acc.set_title("held-out top-1")
    fig.tight_layout()
    url = join(run_url, CURVES_FILE)
    with fsspec.open(url, "wb") as f:
        fig.savefig(f, format="png", dpi=80)
    plt.close(fig)
    return url
