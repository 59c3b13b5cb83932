"""The fine-tuning run dir (same layout as pretrain's): config, metrics, step checkpoints, best/, final/.

    RUN/config.yaml      the resolved FinetuneConfig
    RUN/metrics.jsonl    one JSON record per log/eval event
    RUN/tensorboard/     event files (local run dirs)
    RUN/step-NNNNNNNN/   resumable run checkpoints (contract 2 + train_state/state.pt)
    RUN/best/            the best model so far by val top-1 (contract 2)
    RUN/final/           the selected (best) model: what to publish, evaluate, export

Only rank 0 writes. Every file is written atomically; metrics.jsonl is rewritten whole (it is small)
because fsspec object stores cannot append.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any, Callable

import fsspec
import torch

from data_pipeline.config import to_yaml
from data_pipeline.dataset import atomic_write_bytes, exists, join
from pretrain.checkpoint import TRAIN_STATE_DIR, prune_checkpoints

log = logging.getLogger(__name__)
STATE_FILE = "state.pt"


class RunDir:
    def __init__(self, url: str, *, is_main: bool, tensorboard: bool):
        self.url = url
        self.is_main = is_main
        self.records: list[dict] = []
        self.writer = None
        if is_main and exists(join(url, "metrics.jsonl")):
            with fsspec.open(join(url, "metrics.jsonl"), "r") as f:
                self.records = [json.loads(line) for line in f if line.strip()]
        protocol = fsspec.core.url_to_fs(url)[0].protocol
        local = "file" in (protocol if isinstance(protocol, tuple) else (protocol,))
        if is_main and tensorboard and local:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(Path(fsspec.core.url_to_fs(url)[1]) / "tensorboard"))

    def step_url(self, step: int) -> str:
        return join(self.url, f"step-{step:08d}")

    @property
    def best_url(self) -> str:
        return join(self.url, "best")

    @property
    def final_url(self) -> str:
        return join(self.url, "final")

    def write_config(self, cfg: Any) -> None:
        if self.is_main:
            atomic_write_bytes(join(self.url, "config.yaml"), to_yaml(cfg).encode())

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        self.records.append(record)
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.records)
        atomic_write_bytes(join(self.url, "metrics.jsonl"), text.encode())
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, record["step"])
            self.writer.flush()

    def prune(self, keep: int) -> None:
        """Delete all but the newest `keep` step checkpoints."""
        if self.is_main:
            prune_checkpoints(self.url, keep)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def state_writer(state: dict) -> Callable[[str], None]:
    """A `write_train_state` callback for save_checkpoint: torch.save of plain tensors and numbers."""
    def write(staging_dir: str) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        with fsspec.open(join(staging_dir, STATE_FILE), "wb") as f:
            f.write(buf.getvalue())
    return write


def read_state(ckpt_url: str) -> dict:
    """The train state of a step checkpoint (weights_only: nothing but tensors, numbers, strings)."""
    with fsspec.open(join(ckpt_url, TRAIN_STATE_DIR, STATE_FILE), "rb") as f:
        return torch.load(io.BytesIO(f.read()), weights_only=True, map_location="cpu")
