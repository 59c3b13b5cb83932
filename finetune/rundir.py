"""The fine-tuning run dir (same layout as pretrain's): config, metrics, step checkpoints, best/, final/.

    RUN/config.yaml      the resolved FinetuneConfig
    RUN/metrics.jsonl    one JSON record per log/eval event
    RUN/tensorboard/     event files (local run dirs)
    RUN/step-NNNNNNNN/   resumable run checkpoints (contract 2 + train_state/: DCP tensors + state.json)
    RUN/best/            the best model so far by val top-1 (contract 2)
    RUN/final/           the selected (best) model: what to publish, evaluate, export

Only rank 0 writes. Every file is written atomically; metrics.jsonl is rewritten whole (it is small)
because fsspec object stores cannot append.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import fsspec
import torch

from data_pipeline.config import to_yaml
from data_pipeline.dataset import atomic_write_bytes, exists, join
from pretrain.checkpoint import (STATE_JSON_FILE, TRAIN_STATE_DIR, CheckpointError, load_state, prune_checkpoints,
                                 save_state)

log = logging.getLogger(__name__)


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


def state_writer(counters: dict, optimizer_state: dict) -> Callable[[str], None]:
    """A `write_train_state` callback for save_checkpoint: the optimizer's tensors through DCP, its
    param groups and the counters as JSON (contract 2), so resuming never unpickles anything."""
    tensors, scalars = {}, {}
    for index, slots in optimizer_state["state"].items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{index}/{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    info = {**counters, "optimizer": {"param_groups": optimizer_state["param_groups"], "scalars": scalars}}

    def write(staging_dir: str) -> None:
        save_state(staging_dir, tensors, info)
    return write


def read_state(ckpt_url: str, counters: tuple[str, ...]) -> dict:
    """The train state of a step checkpoint: the named `counters` (numbers), and "optimizer" as an
    optimizer state_dict. Anything else is refused with a CheckpointError naming the file."""
    url = join(ckpt_url, TRAIN_STATE_DIR)
    tensors, info = load_state(url)
    try:
        optimizer = info["optimizer"]
        state: dict[int, dict] = {}
        for index, slots in optimizer["scalars"].items():
            state.setdefault(int(index), {}).update(slots)
        for key, value in tensors.items():
            prefix, index, slot = key.split("/", 2)
            if prefix != "optim":
                raise ValueError(f"unexpected entry {key!r}")
            state.setdefault(int(index), {})[slot] = value
        out = {key: info[key] for key in counters}
        bad = [k for k, v in out.items() if isinstance(v, bool) or not isinstance(v, (int, float))]
        if bad:
            raise ValueError(f"{bad[0]} is not a number")
        # JSON has no tuples: hyper-parameters such as betas were tuples; "params" is a list of ids.
        groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
                  for group in optimizer["param_groups"]]
        out["optimizer"] = {"state": state, "param_groups": groups}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{join(url, STATE_JSON_FILE)}: not a fine-tuning train state ({exc!r})") from None
    return out
