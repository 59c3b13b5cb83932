"""Fine-tune a pretrained megaclass checkpoint on a small labelled dataset.

    megaclass finetune --checkpoint CKPT --train DATA --val DATA --set checkpoint.url=RUN   (Ray Train)
    python -m finetune.train --config ft.yaml --set finetune.checkpoint_url=CKPT ...       (one process / torchrun)

Plain PyTorch: `finetune(cfg)` runs in one process, under torchrun, or inside Ray Train's
TorchTrainer (`finetune_from_dict`, launched by cluster.runtime like pretraining). Modes:
`full` trains everything (layer-wise lr decay, warmup, cosine), `linear` trains only the new head
on a frozen backbone (BN statistics frozen too), `lp-ft` does a linear probe first and then the
full fine-tune, which keeps the pretrained features from being wrecked by a random head's early
gradients. Validation top-1 picks the best step (the later one where val top-1 differs by less than
its noise) and stops early; RUN/final/ is that model as a
contract-2 checkpoint. Resumes from the newest RUN/step-*/ when one exists.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from data_pipeline.config import ConfigError, from_dict
from data_pipeline.reader import create_loader
from data_pipeline.transforms import create_random_erasing, normalize
from finetune.config import FinetuneConfig
from finetune.data import DataPlan, check_train_classes, plan_data, resolve_dataset
from finetune.evaluate import preprocessing, run_eval
from finetune.loop import (check_arch, check_resumable, checkpoint_block, optimizer_step, rank0_first, resume_state,
                           run_main, save_model, save_step, start_ranks, wrap_ddp)
from finetune.model import create_finetune_model, set_backbone_frozen, set_train_mode
from finetune.plan import Phase, eval_cadence, fit_batch_to_data, loader_workers, plan_phases, resolve_optim
from finetune.train_state import state_writer
from pretrain.checkpoint import load_checkpoint, verify_checkpoint
from pretrain.dist import DistInfo, barrier, broadcast_object
from pretrain.rundir import BEST_EVAL_TOP1, EVAL_TOP1, EVAL_TOP5, EVENT, IMAGES_PER_S, LOSS, LR, RunDir, create_run_dir

log = logging.getLogger(__name__)


def _broadcast(values: list[float], dist: DistInfo) -> list[float]:
    """Rank 0's values on every rank, so that every rank takes the same early-stopping decision."""
    return broadcast_object(values, dist)


def prepare_data(cfg: FinetuneConfig, ranks) -> DataPlan:
    """Resolve (ingest) the data and match val classes to train classes. Rank 0 ingests first."""
    d = cfg.data

    def resolve() -> tuple[str, str]:
        return resolve_dataset(d.url, d.cache_url), (resolve_dataset(d.val_url, d.cache_url) if d.val_url else "")

    train_url, val_url = rank0_first(resolve, ranks)  # image folders are ingested once
    return plan_data(train_url, val_url, train_split=d.train_split, train_classes=check_train_classes,
                     no_val_split=ConfigError(f"data.val_url: required, {d.url} has no 'val' split (--val DATA)"),
                     what=f"validation data {d.val_url or d.url} (vs train {d.url})")


def check_inputs(cfg: FinetuneConfig) -> tuple[FinetuneConfig, DataPlan]:
    """Everything a launcher should check before starting workers: the checkpoint (checksums, arch),
    model.arch, the step checkpoint to resume from, the data and the class mapping. Raises CheckpointError /
    DatasetError / ConfigError. Returns `cfg` fitted to the data (a batch larger than the data becomes the
    data, with a notice)."""
    cfg.check_runnable()
    check_arch(cfg.model.arch, verify_checkpoint(cfg.finetune.checkpoint_url)["architecture"])
    check_resumable(cfg.checkpoint.url, STATE_COUNTERS)
    data = prepare_data(cfg, DistInfo())
    cfg = fit_to_data(cfg, data, cfg.scaling.num_workers)
    plan_phases(cfg, data.num_train_samples // cfg.train.global_batch_size)  # lp_steps leaving nothing for the full phase
    return cfg, data


def fit_to_data(cfg: FinetuneConfig, data: DataPlan, world_size: int) -> FinetuneConfig:
    """The batch fitted to the data (one notice when it changes) and the auto optimizer fields resolved."""
    cfg, notice = fit_batch_to_data(cfg, data.num_train_samples, world_size)
    if notice:
        log.warning("%s", notice)
    return resolve_optim(cfg, data.num_train_samples)


STATE_COUNTERS = ("step", "phase", "best_top1", "best_step", "bad_evals", "peak_top1")  # train_state/state.json


@dataclass
class Progress:
    step: int = 0
    best_top1: float = -1.0  # val top-1 of the selected step (best_step)
    best_step: int = -1
    bad_evals: int = 0  # validations in a row without a new peak, in the current phase
    peak_top1: float = -1.0  # the highest val top-1 seen


def counts_as_best(top1: float, peak: float, num_val: int, tolerance: float) -> bool:
    """Whether a validation becomes the selected step: its top-1 is within `tolerance` standard errors
    of the peak so far (the binomial error of the peak's top-1 on `num_val` images). On a small val
    set the noise between steps exceeds the differences, and selecting the strict maximum keeps an
    early, undertrained step; within noise, the later (longer-trained) step is the better bet."""
    if top1 >= peak:
        return True
    p = min(max(peak, 0.0), 1.0)
    return peak - top1 <= tolerance * math.sqrt(p * (1 - p) / max(num_val, 1))


def create_criterion_and_mixup(cfg: FinetuneConfig, num_classes: int):
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    lossc = cfg.loss
    if lossc.mixup > 0 or lossc.cutmix > 0:
        mixup = Mixup(mixup_alpha=lossc.mixup, cutmix_alpha=lossc.cutmix, prob=lossc.mix_prob,
                      switch_prob=lossc.switch_prob, label_smoothing=lossc.label_smoothing, num_classes=num_classes)
        return SoftTargetCrossEntropy(), mixup
    return nn.CrossEntropyLoss(label_smoothing=lossc.label_smoothing), None


def create_optimizer_and_schedule(cfg: FinetuneConfig, model: nn.Module, phase: Phase):
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    o = cfg.optim
    if phase.frozen:  # only the head trains: no layer decay, no backbone parameter groups
        params, layer_decay = model.get_classifier(), None
    else:
        params, layer_decay = model, (o.layer_decay if o.layer_decay < 1.0 else None)
    optimizer = create_optimizer_v2(params, opt=o.name, lr=phase.lr, weight_decay=o.weight_decay,
                                    momentum=o.momentum, layer_decay=layer_decay)
    num_steps = phase.end - phase.start
    warmup = min(o.warmup_steps, max(0, num_steps - 1))
    schedule = CosineLRScheduler(optimizer, t_initial=num_steps, lr_min=o.min_lr, warmup_t=warmup,
                                 warmup_lr_init=o.warmup_lr, t_in_epochs=False)
    return optimizer, schedule


def train_step(model, optimizer, batch, *, cfg: FinetuneConfig, device, mean, std, criterion, mixup,
               erasing=None) -> float:
    images = normalize(batch.images.to(device, non_blocking=True), mean, std)
    labels = batch.labels.to(device, non_blocking=True)
    if erasing is not None:
        images = erasing(images)
    if mixup is not None:
        images, labels = mixup(images, labels)
    if cfg.train.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.train.precision == "bf16" else nullcontext()
    with autocast:
        logits = model(images)
    loss = criterion(logits.float(), labels)
    optimizer_step(model, optimizer, loss, cfg.train.grad_clip_norm)
    return float(loss.detach())


def finetune(cfg: FinetuneConfig, dist=None, report=None) -> dict:
    """Run the fine-tune described by `cfg`; returns a summary (final_url, best_top1, ...)."""
    cfg.check_runnable()
    ranks = start_ranks(cfg, dist)
    if (cfg.loss.mixup or cfg.loss.cutmix) and (cfg.train.global_batch_size // ranks.world_size) % 2:
        raise ConfigError(f"train.global_batch_size: mixup/cutmix needs an even batch per rank, got "
                          f"{cfg.train.global_batch_size} / {ranks.world_size} ranks")
    source = load_checkpoint(cfg.finetune.checkpoint_url)
    check_arch(cfg.model.arch, source.arch)
    data = prepare_data(cfg, ranks)
    cfg = fit_to_data(cfg, data, ranks.world_size)
    model = create_finetune_model(source, len(data.class_names), drop_rate=cfg.model.drop_rate,
                                  drop_path_rate=cfg.model.drop_path_rate, seed=cfg.train.seed,
                                  scratch=cfg.finetune.scratch)
    model.to(ranks.device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    bpr = cfg.train.global_batch_size // ranks.world_size
    steps_per_epoch = data.num_train_samples // cfg.train.global_batch_size  # >= 1: the batch fits the data
    phases = plan_phases(cfg, steps_per_epoch)
    progress, opt_state = _resume(cfg.checkpoint.url, model) if cfg.checkpoint.resume else (Progress(), None)
    run = create_run_dir(cfg, is_main=ranks.is_main, start_step=progress.step)
    run.write_config(cfg)
    size, _, mean, std = preprocessing(source.pretrained_cfg, cfg.data.image_size)
    ctx = _Context(cfg, ranks, source, data, run, report, steps_per_epoch, bpr,
                   loader_workers(cfg, data.num_train_samples, ranks.world_size), size, mean, std)
    stopped = False
    for index, phase in enumerate(phases):
        if progress.step >= phase.end:
            continue
        resumed = opt_state if opt_state and opt_state.get("phase") == index else None
        # Early stopping ends a phase: the linear probe of lp-ft then hands over to the full fine-tune.
        stopped = _run_phase(ctx, model, phase, index, progress, resumed)
        opt_state = None
    summary = {"final_url": run.final_url, "best_top1": progress.best_top1, "best_step": progress.best_step,
               "steps": progress.step, "stopped_early": stopped, "num_classes": len(data.class_names),
               "num_train_samples": data.num_train_samples, "num_val_samples": data.num_val_samples,
               "mode": cfg.finetune.mode}
    if ranks.is_main:
        best = load_checkpoint(run.best_url)
        _save(run.final_url, best.state_dict, ctx, progress, extra={"selected_step": progress.best_step})
        run.log(progress.step, {EVENT: "final", BEST_EVAL_TOP1: progress.best_top1, "best_step": progress.best_step})
    barrier(ranks)
    run.finish()
    return summary


@dataclass
class _Context:
    cfg: FinetuneConfig
    ranks: object
    source: object
    data: DataPlan
    run: RunDir
    report: object
    steps_per_epoch: int
    batch_size_per_rank: int
    num_loader_workers: int
    image_size: int
    mean: tuple
    std: tuple


def _resume(run_url: str, model: nn.Module) -> tuple[Progress, dict | None]:
    state = resume_state(run_url, model, STATE_COUNTERS)
    if state is None:
        return Progress(), None
    progress = Progress(int(state["step"]), float(state["best_top1"]), int(state["best_step"]), int(state["bad_evals"]),
                        float(state.get("peak_top1", state["best_top1"])))
    return progress, {"phase": int(state["phase"]), "optimizer": state["optimizer"]}


def _run_phase(ctx: _Context, model: nn.Module, phase: Phase, index: int, progress: Progress,
               resumed: dict | None) -> bool:
    """Train one phase from progress.step to phase.end; True when early stopping ended it."""
    cfg, ranks, run = ctx.cfg, ctx.ranks, ctx.run
    set_backbone_frozen(model, phase.frozen)
    wrapped = wrap_ddp(model, ranks)
    optimizer, schedule = create_optimizer_and_schedule(cfg, model, phase)
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
    else:
        progress.bad_evals = 0
    criterion, mixup = create_criterion_and_mixup(cfg, len(ctx.data.class_names))
    erasing = create_random_erasing(cfg.data.re_prob, ranks.device)
    every = eval_cadence(cfg, phase.end - phase.start, ctx.data.num_val_samples)
    schedule.step_update(progress.step - phase.start)
    log.info("phase %s: steps %d..%d, lr %g, batch %d, validation every %d steps, %d trainable parameters",
             phase.name, phase.start, phase.end, phase.lr, cfg.train.global_batch_size, every,
             sum(p.numel() for p in model.parameters() if p.requires_grad))
    t0, images_seen, stop = time.perf_counter(), 0, False
    set_train_mode(model, backbone_frozen=phase.frozen)
    for batch in _phase_loader(ctx, phase, progress.step):
        loss = train_step(wrapped, optimizer, batch, cfg=cfg, device=ranks.device, mean=ctx.mean, std=ctx.std,
                          criterion=criterion, mixup=mixup, erasing=erasing)
        progress.step += 1
        images_seen += len(batch.labels) * ranks.world_size
        schedule.step_update(progress.step - phase.start)
        if progress.step % cfg.log.every_steps == 0:
            run.log(progress.step, {"phase": phase.name, LOSS: loss, LR: max(g["lr"] for g in optimizer.param_groups),
                                    IMAGES_PER_S: images_seen / (time.perf_counter() - t0)})
        if (progress.step - phase.start) % every == 0 or progress.step == phase.end:
            stop = _validate(ctx, model, phase, progress)
            set_train_mode(model, backbone_frozen=phase.frozen)
        if cfg.checkpoint.every_steps and progress.step % cfg.checkpoint.every_steps == 0 and not stop:
            _save_step(ctx, model, optimizer, progress, index)
        if stop or progress.step >= phase.end:
            break
    return stop


def _phase_loader(ctx: _Context, phase: Phase, step: int):
    """One loader for the rest of the phase: its workers live across epochs (on small data an epoch
    may be one step, and restarting workers per epoch cost more than training). Batch for batch the
    same data as one loader per epoch, so resuming at any step is exact."""
    cfg = ctx.cfg
    epoch, skip = divmod(step, ctx.steps_per_epoch)
    last_epoch = (phase.end - 1) // ctx.steps_per_epoch
    return create_loader(ctx.data.train_url, ctx.data.train_split, batch_size_per_rank=ctx.batch_size_per_rank,
                         rank=ctx.ranks.rank, world_size=ctx.ranks.world_size, num_workers=ctx.num_loader_workers,
                         seed=cfg.train.seed, epoch=epoch, transform=cfg.data.train_transform(ctx.image_size),
                         shuffle_buffer=cfg.data.shuffle_buffer,
                         samples_per_epoch=ctx.steps_per_epoch * cfg.train.global_batch_size,
                         skip_batches=skip, num_epochs=last_epoch - epoch + 1)


def _validate(ctx: _Context, model: nn.Module, phase: Phase, progress: Progress) -> bool:
    """Rank 0 scores the val split; every rank learns the result. True = stop (patience exhausted)."""
    cfg, ranks = ctx.cfg, ctx.ranks
    top1 = top5 = 0.0
    if ranks.is_main:
        loader = create_loader(ctx.data.val_url, ctx.data.val_split, batch_size_per_rank=max(64, ctx.batch_size_per_rank),
                               num_workers=min(cfg.data.num_workers, 1), transform=cfg.data.eval_transform(ctx.image_size),
                               shuffle=False, drop_last=False)
        result = run_eval(model, loader, device=ranks.device, mean=ctx.mean, std=ctx.std, targets=ctx.data.val_targets,
                          num_model_classes=len(ctx.data.class_names), channels_last=cfg.train.channels_last,
                          bf16=cfg.train.precision == "bf16")
        top1, top5 = result.top1, result.top5
    top1, top5 = _broadcast([top1, top5], ranks)
    selected = counts_as_best(top1, progress.peak_top1, ctx.data.num_val_samples, cfg.train.select_tolerance)
    progress.bad_evals = 0 if top1 > progress.peak_top1 else progress.bad_evals + 1
    progress.peak_top1 = max(progress.peak_top1, top1)
    if selected:
        progress.best_top1, progress.best_step = top1, progress.step
        if ranks.is_main:
            _save(ctx.run.best_url, model.state_dict(), ctx, progress)
    ctx.run.log(progress.step, {"phase": phase.name, EVAL_TOP1: top1, EVAL_TOP5: top5, BEST_EVAL_TOP1: progress.best_top1})
    log.info("step %d (%s): val top-1 %.4f top-5 %.4f (best %.4f at step %d)", progress.step, phase.name,
             top1, top5, progress.best_top1, progress.best_step)
    if ctx.report is not None:
        ctx.report({"step": progress.step, EVAL_TOP1: top1, EVAL_TOP5: top5, BEST_EVAL_TOP1: progress.best_top1})
    barrier(ranks)
    return bool(cfg.train.patience) and progress.bad_evals >= cfg.train.patience


def _save(url: str, state_dict: dict, ctx: _Context, progress: Progress, *, extra: dict | None = None,
          write_train_state=None) -> str:
    data = ctx.cfg.data
    # the evaluation preprocessing of this model: what evaluate, predict and export apply
    pretrained_cfg = dict(ctx.source.pretrained_cfg, input_size=[3, ctx.image_size, ctx.image_size],
                          num_classes=len(ctx.data.class_names), crop_pct=data.crop_pct,
                          interpolation=data.interpolation)
    block = checkpoint_block(ctx.cfg, ctx.source, train_url=ctx.data.train_url, step=progress.step,
                             steps_per_epoch=ctx.steps_per_epoch,
                             metrics={EVAL_TOP1: progress.best_top1, "best_step": progress.best_step})
    block.update({"augmentation": data.as_dict(), **(extra or {})})
    return save_model(url, state_dict, ctx.source, ctx.data.class_names, pretrained_cfg=pretrained_cfg,
                      megaclass=block, write_train_state=write_train_state)


def _save_step(ctx: _Context, model: nn.Module, optimizer, progress: Progress, phase_index: int) -> None:
    counters = {"step": progress.step, "phase": phase_index, "best_top1": progress.best_top1,
                "best_step": progress.best_step, "bad_evals": progress.bad_evals, "peak_top1": progress.peak_top1}
    save_step(ctx.run, ctx.ranks, progress.step, ctx.cfg.checkpoint.keep,
              lambda url: _save(url, model.state_dict(), ctx, progress,
                                write_train_state=state_writer(counters, optimizer.state_dict())))


def finetune_from_dict(cfg_dict: dict, report=None) -> dict:
    """Entry point for cluster.runtime's TorchTrainer: the resolved config as a plain dict."""
    return finetune(from_dict(FinetuneConfig, cfg_dict), report=report)


def main(argv: list[str] | None = None) -> int:
    return run_main(argv, __doc__.splitlines()[0], FinetuneConfig, finetune,
                    lambda summary: f"final model: {summary['final_url']} (val top-1 {summary['best_top1']:.4f} "
                                    f"at step {summary['best_step']})")


if __name__ == "__main__":
    raise SystemExit(main())
