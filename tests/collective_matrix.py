"""Many small 2-rank training runs ("cells") in one torchrun launch, for tests/test_pretrain_collectives.py.

Run it under TORCH_DISTRIBUTED_DEBUG=DETAIL, which makes every collective check that all ranks issue
the same one (a mismatch raises instead of hanging). Each rank writes OUT/rank-R.json with, per
cell, the metrics of every logged step (loss, replica_spread, ...) or the error that ended the cell.

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.collective_matrix DATASET OUT
"""
from __future__ import annotations

import json
import os
import signal
import sys
import traceback

import torch
import torch.distributed as torch_dist

import pretrain.train as train_module
from pretrain.config import load_pretrain_config
from pretrain.dist import cleanup, init_distributed

BASE = {"model.arch": "test_resnet", "data.image_size": 32, "data.num_workers": 0, "data.shuffle_buffer": 16,
        "train.global_batch_size": 8, "train.channels_last": False, "train.max_steps": 3, "train.num_threads": 1,
        "optim.name": "adamw", "optim.lr": 0.01, "optim.scheduler": "constant", "log.every_steps": 1,
        "log.eval_every_steps": 1000, "log.eval_batches": 1, "log.eval_batch_size": 4, "log.tensorboard": False,
        "checkpoint.every_steps": 0, "scaling.num_workers": 2, "loss.label_smoothing": 0.1}
MIX = {"loss.mix_prob": 0.5, "train.max_steps": 4}
# name -> overrides; "resume" cells are trained twice (see run_cell).
CELLS: dict[str, dict] = {
    "mixup": {**MIX, "loss.mixup": 0.5},
    "cutmix": {**MIX, "loss.cutmix": 0.5},
    "mixup_cutmix": {**MIX, "loss.mixup": 0.5, "loss.cutmix": 0.5},
    "sampled_head": {"model.head_sample_ratio": 0.5},
    "grad_clip": {"train.grad_clip_norm": 0.05},
    "lamb": {"optim.name": "lamb"},  # LAMB's own clipping would use each rank's norm, not the global one
    "grad_accum": {"train.grad_accum_steps": 2},
    "bf16_ema": {"train.precision": "bf16", "train.ema": True, "train.ema_decay": 0.5},
    "eval_and_checkpoint_steps": {"log.eval_every_steps": 1, "checkpoint.every_steps": 1, "checkpoint.keep": 1},
    "resume": {**MIX, "loss.mixup": 0.5, "loss.cutmix": 0.5, "train.grad_clip_norm": 0.05, "train.ema": True,
               "checkpoint.every_steps": 2, "train.deterministic": True},
    "straight": {**MIX, "loss.mixup": 0.5, "loss.cutmix": 0.5, "train.grad_clip_norm": 0.05, "train.ema": True,
                 "checkpoint.every_steps": 2, "train.deterministic": True},
}


def run_cell(name: str, overrides: dict, dataset: str, out: str, dist, logged: list) -> dict:
    args = {**BASE, **overrides, "data.url": dataset, "checkpoint.url": os.path.join(out, name)}
    cfg = load_pretrain_config(None, [f"{k}={v}" for k, v in args.items()])
    if name != "resume":
        return train_module.train(cfg, dist)
    # Rank 0 alone is preempted after the step-2 checkpoint; every rank must stop together (at step 3),
    # then a second train() resumes from step-3 and finishes.
    first = train_module.train(cfg, dist, report=lambda m: dist.rank == 0 and m["step"] == 2
                               and os.kill(os.getpid(), signal.SIGTERM))
    logged.append({"event": "preempted", "step": first["step"], "preempted": first["preempted"]})
    return train_module.train(cfg, dist)


class _DdpLogger:
    """torch 2.14.1 segfaults in DDP's C++ Logger.set_construction_data_and_log when the process group is
    DETAIL's checking wrapper (a bare Linear under DDP reproduces it). That call only records construction
    facts for DDP's own logging, so this stand-in skips it and forwards everything else."""

    def __init__(self, reducer):
        self._logger = _REAL_DDP_LOGGER(reducer)

    def set_construction_data_and_log(self, *args) -> None:
        return None

    def __getattr__(self, name):
        return getattr(self._logger, name)


_REAL_DDP_LOGGER = torch_dist.Logger


def main(argv: list[str]) -> int:
    dataset, out = argv
    torch_dist.Logger = _DdpLogger  # DDP looks it up as torch.distributed.Logger at construction
    dist = init_distributed("gloo", use_gpu=False)
    log_step = train_module.log_step
    logged: list[dict] = []

    def recording_log_step(run, *args, **kwargs):
        values = log_step(run, *args, **kwargs)
        logged.append({"step": run.progress.step, **{k: v for k, v in values.items() if isinstance(v, (int, float))}})
        return values

    train_module.log_step = recording_log_step
    results = {}
    for name, overrides in CELLS.items():
        logged.clear()
        try:
            final = run_cell(name, overrides, dataset, out, dist, logged)
            results[name] = {"steps": list(logged), "final_step": final["step"]}
        except Exception:  # recorded per cell: the test names the cell that broke and shows why
            results[name] = {"error": traceback.format_exc()[-3000:]}
            break  # the ranks' collective sequences may now differ: later cells would hang, not report
        finally:
            torch.use_deterministic_algorithms(False)
    with open(os.path.join(out, f"rank-{dist.rank}.json"), "w") as f:
        json.dump(results, f)
    cleanup(dist)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
