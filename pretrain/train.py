"""Pretraining: a dataset (contract 1) in, a run dir with checkpoints (contract 2) out. Plain PyTorch.

The backbone (any timm model, num_classes=0) runs under DDP; the classifier is the class-sharded
`pretrain.head.ShardedClassifierHead`. The same `train()` runs alone, under torchrun, and inside
Ray Train (cluster.runtime calls `train_from_dict`). It resumes itself from the newest run
checkpoint in checkpoint.url, so a restarted worker group continues where the last one stopped;
SIGTERM (preemption) writes a checkpoint before it exits.

    python -m pretrain.train --config configs/pretrain_tiny.yaml --set train.max_steps=20
    torchrun --nproc-per-node 2 -m pretrain.train --config f.yaml --set scaling.num_workers=2

Set the allocator variables of data_pipeline.ALLOCATOR_ENV in the environment for speed (the Makefile does).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import random
import sys
from typing import Any, Callable, Sequence

import numpy as np
import torch

from data_pipeline.config import ConfigError, from_dict
from pretrain.config import PretrainConfig, load_pretrain_config
from pretrain.dist import DistInfo, all_gather, all_reduce_max, init_distributed, replica_spread
from pretrain.head import clip_grad_norm_, sharded_topk_correct
from pretrain.metrics import StepTimer, memory_stats
from pretrain.run import Preemption, Run, build_run, save_run_checkpoint
from pretrain.rundir import EVAL_TOP1, EVAL_TOP5, EVENT, IMAGES_PER_S, LOSS, LR, RunDir, create_run_dir

log = logging.getLogger(__name__)


def train(cfg: PretrainConfig, dist: DistInfo | None = None,
          report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train until train.max_steps (or epochs / total_samples); returns the final metrics.

    report(metrics) is called on every rank after each checkpoint with {"step", ..., "checkpoint": url}
    (the metrics are rank 0's view on rank 0; Ray Train keeps rank 0's). On object storage a step
    checkpoint may still be uploading then: it completes at the next checkpoint (save_run_checkpoint).
    """
    dist = dist or init_distributed(use_gpu=cfg.scaling.use_gpu)
    run = build_run(cfg, dist)
    run_dir = create_run_dir(cfg, is_main=dist.is_main, start_step=run.progress.step)
    if run.resumed_from:  # the record that tells a restart apart from a fresh run (simulate --chaos reads it)
        run_dir.log(run.progress.step, {EVENT: "resume", "checkpoint": run.resumed_from})
    timer, window, last = StepTimer(), [], {}
    with Preemption() as preemption:
        while run.progress.step < run.total_steps:
            for micro_batches in run.epoch_steps(timer):
                window.append(train_step(run, micro_batches))
                step = run.progress.step
                if step % cfg.log.every_steps == 0 or step == run.total_steps:
                    last = log_step(run, run_dir, timer, window)
                    window = []
                # Under Ray Train no handler is installed (not the main thread) on any rank: no collective.
                stop = preemption.installed and bool(all_reduce_max(float(preemption.requested), dist))
                if stop or step == run.total_steps or (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0):
                    url = save_run_checkpoint(run, last, final=step == run.total_steps, wait=stop)
                    if report is not None:  # every rank: Ray Train's report is a barrier
                        report({**last, "step": step, "checkpoint": url})
                if stop:
                    log.warning("stopping at step %d on request (SIGTERM); checkpoint written", step)
                    run_dir.close()
                    return {**last, "step": step, "preempted": True}
                if step == run.total_steps:
                    break
    run_dir.finish()
    return {**last, "step": run.progress.step, "preempted": False}


def train_step(run: Run, micro_batches: list) -> torch.Tensor:
    """One optimizer step over `grad_accum_steps` micro-batches; returns the (global mean) loss as a
    0-dim tensor on the device. No host sync here: the loop reads the loss only when it logs."""
    cfg, dist = run.cfg, run.dist
    run.optimizer.zero_grad(set_to_none=True)
    total_loss = torch.zeros((), device=dist.device)
    for index, batch in enumerate(micro_batches):
        images = run.normalize(batch.images)
        labels = batch.labels.to(dist.device, non_blocking=True)
        labels_b, lam = None, 1.0
        if run.erasing is not None:  # seeded like mixup: resumable
            random.seed(f"{cfg.train.seed}:{run.progress.step}:{dist.rank}:{index}:erase")
            images = run.erasing(images)
        if run.mixup is not None:  # seeded per (seed, step, rank, micro-batch): resumable and rank-independent
            np.random.seed([cfg.train.seed, run.progress.step, dist.rank, index])
            # timm's in-place batch mix; targets become label pairs. The per-sample lam goes to the head
            # even when this rank's draw left the batch unmixed (lam 1.0): every rank must issue the same
            # gathers, whatever its own draw (mix_prob < 1 would otherwise desynchronise the collectives).
            lam = torch.full(labels.shape, float(run.mixup._mix_batch(images)), device=labels.device)
            labels_b = labels.flip(0)
        sync = index == len(micro_batches) - 1
        with (contextlib.nullcontext() if sync or dist.world_size == 1 else run.model.no_sync()), run.autocast():
            out = run.head.forward_loss(run.model(images), labels, label_smoothing=cfg.loss.label_smoothing,
                                        targets_b_local=labels_b, lam=lam)
            (out.loss / len(micro_batches)).backward()
        total_loss += out.loss.detach() / len(micro_batches)
    if cfg.train.grad_clip_norm:
        clip_grad_norm_(run.backbone.parameters(), run.head.parameters(), cfg.train.grad_clip_norm, dist)
    run.optimizer.step()
    run.progress.step += 1
    run.progress.steps_in_epoch += 1
    run.scheduler.step_update(num_updates=run.progress.step)
    if run.ema is not None:
        run.ema.update(run.backbone, step=run.progress.step)
    return total_loss


@torch.no_grad()
@torch.random.fork_rng(devices=[])  # evaluating must not move the training RNG (exact resume)
def evaluate(run: Run) -> dict[str, float]:
    """Held-out top-1/top-5 over log.eval_batches batches per rank (collective: every rank evaluates)."""
    loader = run.eval_loader()
    if loader is None:
        return {}
    run.sync_buffers()
    run.model.eval(), run.head.eval()
    counts, seen = {1: 0, 5: 0}, 0
    for index, batch in enumerate(loader):
        if run.cfg.log.eval_batches and index >= run.cfg.log.eval_batches:
            break
        images = run.normalize(batch.images)
        with run.autocast():
            logits = run.head(run.model(images))
        targets = all_gather(batch.labels.to(run.dist.device), run.dist)
        ks = (1, min(5, run.num_classes))
        for k, hits in sharded_topk_correct(logits, targets, run.dist, run.head.start, ks=ks).items():
            counts[5 if k == ks[1] else 1] += hits
        seen += len(targets)
    run.model.train(), run.head.train()
    return {EVAL_TOP1: counts[1] / max(seen, 1), EVAL_TOP5: counts[5] / max(seen, 1), "eval_samples": seen}


def log_step(run: Run, run_dir: RunDir, timer: StepTimer, losses: list[torch.Tensor]) -> dict[str, Any]:
    cfg, step = run.cfg, run.progress.step
    loss = float(torch.stack(losses).mean()) if losses else 0.0  # the window's one host sync, before timing it
    elapsed_s, data_s = timer.read()
    images_per_s = len(losses) * cfg.train.global_batch_size / max(elapsed_s, 1e-9)
    values: dict[str, Any] = {
        LOSS: loss, LR: max(g["lr"] for g in run.optimizer.param_groups),
        "epoch": run.progress.epoch, IMAGES_PER_S: images_per_s, "images_per_s_per_rank": images_per_s / run.dist.world_size,
        "data_wait_fraction": data_s / max(elapsed_s, 1e-9), **memory_stats(run.dist.device),
        # DDP replicas must stay bit-identical; anything but 0.0 means ranks took different updates.
        "replica_spread": replica_spread(torch.stack([p.detach().double().sum() for p in run.backbone.parameters()]),
                                         run.dist)}
    eval_every = cfg.log.eval_every_steps or cfg.log.every_steps
    if step % eval_every == 0 or step == run.total_steps:
        values.update(evaluate(run))
    timer.read()  # evaluation time is not training time
    run_dir.log(step, values)
    return values


def train_from_dict(cfg_dict: dict[str, Any], report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Entry point for cluster.runtime (Ray Train): the config as a plain dict."""
    return train(from_dict(PretrainConfig, cfg_dict), report=report)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_pretrain_config(args.config, args.set)
    except ConfigError as exc:
        print(f"pretrain: error: {exc}", file=sys.stderr)
        return 2
    result = train(cfg)
    return 0 if not result.get("preempted") else 143


if __name__ == "__main__":
    sys.exit(main())
