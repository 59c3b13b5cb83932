"""Fine-tuning's train state in a step checkpoint: step, phase, best-so-far and the optimizer state.

Written into RUN/step-N/train_state/ by `save_checkpoint`'s write_train_state callback: the
optimizer's tensors through DCP, its param groups and the counters as JSON (contract 2), so
resuming never unpickles anything.
"""

from __future__ import annotations

from typing import Callable

import torch

from data_pipeline.dataset import join
from pretrain.checkpoint import (STATE_JSON_FILE, TRAIN_STATE_DIR, CheckpointError, load_state, save_state)


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
