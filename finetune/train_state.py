"""Fine-tuning's train state in a step checkpoint: step, phase, best-so-far and the optimizer state.

Written as RUN/step-N/train_state/state.pt by `save_checkpoint`'s write_train_state callback and
loaded with weights_only (tensors, numbers and strings only).
"""

from __future__ import annotations

import io
from typing import Callable

import fsspec
import torch

from data_pipeline.dataset import join
from pretrain.checkpoint import TRAIN_STATE_DIR

STATE_FILE = "state.pt"


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
