"""Fine-tune a detector (Faster R-CNN FPN, RetinaNet or FCOS) on a megaclass backbone checkpoint.

    megaclass finetune --task detection --checkpoint CKPT --train train.json --val val.json --out RUN
    python -m finetune.detection.train --set finetune.checkpoint_url=CKPT --set data.url=train.json ...

Plain PyTorch like classification fine-tuning: `finetune_detection(cfg)` runs in one process, under
torchrun, or inside Ray Train's TorchTrainer (`finetune_detection_from_dict`). The reader streams
the detection dataset (images resized to data.image_size square, boxes with them, seeded flips),
DDP averages gradients, validation mAP (pycocotools, rank 0) picks the best step and stops early,
RUN/step-*/ are resumable, RUN/final/ is the best detector as a contract-2 checkpoint with
`megaclass.task = detection` (docs/design.md).
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from data_pipeline.config import from_dict
from data_pipeline.dataset import DatasetError
from data_pipeline.detection import DetectionDecoder
from data_pipeline.reader import create_loader
from finetune.detection.config import DetectionConfig
from finetune.data import DataPlan
from finetune.detection.data import prepare_detection_data
from finetune.detection.evaluate import coco_metrics, run_detection
from finetune.detection.model import (DetectorSpec, create_detector, set_body_frozen, set_train_mode, to_targets)
from finetune.evaluate import preprocessing
from finetune.loop import (check_arch, check_resumable, checkpoint_block, optimizer_step, rank0_first, resume_state,
                           run_main, save_model, save_step, start_ranks, wrap_ddp)
from finetune.train_state import state_writer
from pretrain.checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint
from pretrain.dist import DistInfo, barrier, broadcast_object
from pretrain.rundir import EVENT, IMAGES_PER_S, LOSS, LR, RunDir, create_run_dir

log = logging.getLogger(__name__)
HFLIP = 0.5


@dataclass
class Progress:
    step: int = 0
    best_map: float = -1.0
    best_step: int = -1
    bad_evals: int = 0


@dataclass
class _Run:
    cfg: DetectionConfig
    ranks: DistInfo
    source: LoadedCheckpoint
    data: DataPlan
    spec: DetectorSpec
    run: RunDir
    report: object
    steps_per_epoch: int
    total_steps: int


STATE_COUNTERS = ("step", "best_map", "best_step", "bad_evals")  # train_state/state.json


def check_source(cfg: DetectionConfig, source: LoadedCheckpoint) -> None:
    if source.task != "classification":
        raise CheckpointError(f"{source.url}: a {source.task} checkpoint; detection fine-tuning starts from a "
                              "classification backbone checkpoint (pretrain's, or a classification fine-tune's)")
    check_arch(cfg.model.arch, source.arch)


def check_detection_inputs(cfg: DetectionConfig) -> DataPlan:
    """What a launcher checks before starting workers: checkpoint, arch, data (ingesting COCO JSON once)."""
    cfg.check_runnable()
    check_source(cfg, load_checkpoint(cfg.finetune.checkpoint_url))
    check_resumable(cfg.checkpoint.url, STATE_COUNTERS)
    return _prepare_data(cfg)


def _prepare_data(cfg: DetectionConfig) -> DataPlan:
    return prepare_detection_data(cfg.data.url, cfg.data.val_url, train_split=cfg.data.train_split,
                                  cache_url=cfg.data.cache_url)


def create_optimizer_and_schedule(cfg: DetectionConfig, model: nn.Module, total_steps: int):
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    o = cfg.optim
    optimizer = create_optimizer_v2(model, opt=o.name, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum)
    warmup = min(o.warmup_steps, max(0, total_steps - 1))
    schedule = CosineLRScheduler(optimizer, t_initial=total_steps, lr_min=o.min_lr, warmup_t=warmup,
                                 warmup_lr_init=o.warmup_lr, t_in_epochs=False)
    return optimizer, schedule


def train_step(model, optimizer, batch, *, cfg: DetectionConfig, device: torch.device) -> dict[str, float]:
    images = [im.to(device, non_blocking=True).float().div_(255) for im in batch.images]
    targets = to_targets(batch.targets, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.train.precision == "bf16" else nullcontext()
    with autocast:
        losses = model(images, targets)
    loss = sum(v.float() for v in losses.values())
    optimizer_step(model, optimizer, loss, cfg.train.grad_clip_norm)
    return {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in losses.items()}}


def finetune_detection(cfg: DetectionConfig, dist: DistInfo | None = None, report=None) -> dict:
    """Train the detector `cfg` describes; returns a summary (final_url, best_map, ...)."""
    cfg.check_runnable()
    ranks = start_ranks(cfg, dist)
    source = load_checkpoint(cfg.finetune.checkpoint_url)
    check_source(cfg, source)
    data = rank0_first(lambda: _prepare_data(cfg), ranks)  # COCO JSON is ingested once
    size, _, mean, std = preprocessing(source.pretrained_cfg, cfg.data.image_size)
    m = cfg.model
    spec = DetectorSpec(m.detector, len(data.class_names), size, m.fpn_channels, m.anchor_scale, m.score_thresh,
                        m.nms_thresh, m.detections_per_image, tuple(mean), tuple(std))
    model, spec = create_detector(spec, source.arch, source.model_args, seed=cfg.train.seed, source_url=source.url,
                                  backbone_state=None if cfg.finetune.scratch else source.state_dict)
    model.to(ranks.device)
    steps_per_epoch = data.num_train_samples // cfg.train.global_batch_size
    if steps_per_epoch < 1:
        raise DatasetError(f"{cfg.data.url}: {data.num_train_samples} training images are fewer than one global "
                           f"batch of {cfg.train.global_batch_size} (lower train.global_batch_size)")
    total = cfg.train.max_steps or math.ceil(cfg.train.epochs * steps_per_epoch)
    progress, optimizer_state = _resume(cfg.checkpoint.url, model) if cfg.checkpoint.resume else (Progress(), None)
    run = create_run_dir(cfg, is_main=ranks.is_main, start_step=progress.step)
    run.write_config(cfg)
    if progress.step:  # a restart is visible in the run's own log
        run.log(progress.step, {EVENT: "resume", "checkpoint": run.step_url(progress.step)})
    ctx = _Run(cfg, ranks, source, data, spec, run, report, steps_per_epoch, total)
    frozen = cfg.finetune.mode == "linear"
    set_body_frozen(model, frozen)
    wrapped = wrap_ddp(model, ranks)
    optimizer, schedule = create_optimizer_and_schedule(cfg, model, total)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    schedule.step_update(progress.step)
    stopped = _train(ctx, model, wrapped, optimizer, schedule, progress, frozen)
    summary = {"final_url": run.final_url, "best_map": progress.best_map, "best_step": progress.best_step,
               "steps": progress.step, "stopped_early": stopped, "num_classes": len(data.class_names),
               "num_train_samples": data.num_train_samples, "detector": spec.name, "scratch": cfg.finetune.scratch}
    if ranks.is_main:
        best = load_checkpoint(run.best_url)
        _save(ctx, run.final_url, best.state_dict, progress, extra={"selected_step": progress.best_step})
        run.log(progress.step, {EVENT: "final", "best_eval_map": progress.best_map, "best_step": progress.best_step})
    barrier(ranks)
    run.finish()
    return summary


def _train(ctx: _Run, model, wrapped, optimizer, schedule, progress: Progress, frozen: bool) -> bool:
    """Steps from progress.step to the total; True when early stopping ended the run."""
    cfg, ranks = ctx.cfg, ctx.ranks
    bpr = cfg.train.global_batch_size // ranks.world_size
    decoder = DetectionDecoder(ctx.spec.image_size, hflip=HFLIP, num_classes=len(ctx.data.class_names))
    t0, images_seen, stop = time.perf_counter(), 0, False
    while progress.step < ctx.total_steps and not stop:
        epoch, skip = divmod(progress.step, ctx.steps_per_epoch)
        loader = create_loader(ctx.data.train_url, ctx.data.train_split, batch_size_per_rank=bpr, rank=ranks.rank,
                               world_size=ranks.world_size, num_workers=cfg.data.num_workers, seed=cfg.train.seed,
                               epoch=epoch, shuffle_buffer=cfg.data.shuffle_buffer, decoder=decoder,
                               samples_per_epoch=ctx.steps_per_epoch * cfg.train.global_batch_size,
                               skip_batches=skip)
        set_train_mode(model, body_frozen=frozen)
        for batch in loader:
            losses = train_step(wrapped, optimizer, batch, cfg=cfg, device=ranks.device)
            progress.step += 1
            images_seen += len(batch.keys) * ranks.world_size
            schedule.step_update(progress.step)
            if progress.step % cfg.log.every_steps == 0:
                record = {LOSS: losses["loss"], LR: max(g["lr"] for g in optimizer.param_groups),
                          IMAGES_PER_S: images_seen / (time.perf_counter() - t0)}
                ctx.run.log(progress.step, record | {k if k.startswith("loss_") else f"loss_{k}": v
                                                    for k, v in losses.items() if k != "loss"})
            every = cfg.train.eval_every_steps
            end_of_epoch = progress.step % ctx.steps_per_epoch == 0
            if (every and progress.step % every == 0) or (not every and end_of_epoch) or progress.step == ctx.total_steps:
                stop = _validate(ctx, model, progress)
                set_train_mode(model, body_frozen=frozen)
            if cfg.checkpoint.every_steps and progress.step % cfg.checkpoint.every_steps == 0 and not stop:
                _save_step(ctx, model, optimizer, progress)
            if stop or progress.step >= ctx.total_steps:
                break
    return stop


def _validate(ctx: _Run, model: nn.Module, progress: Progress) -> bool:
    """Rank 0 scores the val split (COCO mAP); every rank learns it. True = stop (patience exhausted)."""
    cfg, ranks = ctx.cfg, ctx.ranks
    metrics = [0.0, 0.0, 0.0]
    if ranks.is_main:
        loader = create_loader(ctx.data.val_url, ctx.data.val_split,
                               batch_size_per_rank=max(1, cfg.train.global_batch_size // ranks.world_size),
                               num_workers=cfg.data.num_workers, decoder=DetectionDecoder(ctx.spec.image_size),
                               shuffle=False, drop_last=False)
        truths, detections, _ = run_detection(model, loader, device=ranks.device, targets_map=ctx.data.val_targets,
                                              bf16=cfg.train.precision == "bf16")
        result = coco_metrics(truths, detections, ctx.data.class_names, ctx.spec.image_size)
        metrics = [result["map"], result["map_50"], result["map_75"]]
    val_map, map_50, map_75 = broadcast_object(metrics, ranks)
    if val_map > progress.best_map:
        progress.best_map, progress.best_step, progress.bad_evals = val_map, progress.step, 0
        if ranks.is_main:
            _save(ctx, ctx.run.best_url, model.state_dict(), progress)
    else:
        progress.bad_evals += 1
    record = {"eval_map": val_map, "eval_map_50": map_50, "eval_map_75": map_75, "best_eval_map": progress.best_map}
    ctx.run.log(progress.step, record)
    log.info("step %d: val mAP %.4f mAP@.5 %.4f (best %.4f at step %d)", progress.step, val_map, map_50,
             progress.best_map, progress.best_step)
    if ctx.report is not None:
        ctx.report({"step": progress.step, **record})
    barrier(ranks)
    return bool(cfg.train.patience) and progress.bad_evals >= cfg.train.patience


def _resume(run_url: str, model: nn.Module) -> tuple[Progress, dict | None]:
    state = resume_state(run_url, model, STATE_COUNTERS)
    if state is None:
        return Progress(), None
    progress = Progress(int(state["step"]), float(state["best_map"]), int(state["best_step"]), int(state["bad_evals"]))
    return progress, state["optimizer"]


def _save(ctx: _Run, url: str, state_dict: dict, progress: Progress, *, extra: dict | None = None,
          write_train_state=None) -> str:
    names = ctx.data.class_names
    size = ctx.spec.image_size
    pretrained_cfg = dict(ctx.source.pretrained_cfg, input_size=[3, size, size], num_classes=len(names))
    block = checkpoint_block(ctx.cfg, ctx.source, train_url=ctx.data.train_url, step=progress.step,
                             steps_per_epoch=ctx.steps_per_epoch,
                             metrics={"eval_map": progress.best_map, "best_step": progress.best_step})
    block.update({"task": "detection", "detector": ctx.spec.as_dict(), **(extra or {})})
    return save_model(url, state_dict, ctx.source, names, pretrained_cfg=pretrained_cfg, megaclass=block,
                      write_train_state=write_train_state)


def _save_step(ctx: _Run, model: nn.Module, optimizer, progress: Progress) -> None:
    counters = {"step": progress.step, "best_map": progress.best_map, "best_step": progress.best_step,
                "bad_evals": progress.bad_evals}
    save_step(ctx.run, ctx.ranks, progress.step, ctx.cfg.checkpoint.keep,
              lambda url: _save(ctx, url, model.state_dict(), progress,
                                write_train_state=state_writer(counters, optimizer.state_dict())))


def finetune_detection_from_dict(cfg_dict: dict, report=None) -> dict:
    """Entry point for cluster.runtime's TorchTrainer: the resolved config as a plain dict."""
    return finetune_detection(from_dict(DetectionConfig, cfg_dict), report=report)


def main(argv: list[str] | None = None) -> int:
    return run_main(argv, __doc__.splitlines()[0], DetectionConfig, finetune_detection,
                    lambda summary: f"final model: {summary['final_url']} (val mAP {summary['best_map']:.4f} "
                                    f"at step {summary['best_step']})")


if __name__ == "__main__":
    raise SystemExit(main())
