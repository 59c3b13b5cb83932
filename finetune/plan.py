"""The shape of a fine-tuning run, from the config and the size of the data: batch, phases,
validation cadence, loader workers and the size-dependent optimizer defaults.

Fine-tuning data is often tiny (a few images per class): a batch larger than the data becomes the
data, an epoch may be a single step, and validation may cost more than training. Everything here is
a pure function of (config, data sizes, world size), computed identically on every rank and by the
launcher before workers start.

    cfg, notice = fit_batch_to_data(cfg, num_train_samples=15, world_size=1)   # batch 64 -> 15
    every = eval_cadence(cfg, phase_steps=150, num_val_samples=880)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from data_pipeline.config import ConfigError, from_dict, merge, to_dict
from data_pipeline.dataset import DatasetError
from finetune.config import FinetuneConfig

# Below this many training images the optimizer defaults of few-shot fine-tuning apply (see
# resolve_optim): layer-wise lr decay and a long warmup help at scale but cost accuracy here.
SMALL_DATA_SAMPLES = 2000


@dataclass(frozen=True)
class Phase:
    name: str       # "linear" or "full"
    frozen: bool    # backbone frozen (linear probe)
    start: int      # first global step of the phase
    end: int        # global step at which the phase ends
    lr: float


def fit_batch_to_data(cfg: FinetuneConfig, num_train_samples: int, world_size: int) -> tuple[FinetuneConfig, str]:
    """`cfg` with train.global_batch_size lowered to what the data allows, and a one-line notice ('' if unchanged).

    The batch stays divisible by the world size (and even per rank with mixup/cutmix)."""
    batch = cfg.train.global_batch_size
    if batch <= num_train_samples:
        return cfg, ""
    step = world_size * (2 if cfg.loss.mixup > 0 or cfg.loss.cutmix > 0 else 1)
    fitted = num_train_samples // step * step
    if fitted < 1:
        raise DatasetError(f"{cfg.data.url}: {num_train_samples} training image(s) cannot fill one batch "
                           f"per rank on {world_size} rank(s)")
    notice = (f"train.global_batch_size {batch} is larger than the {num_train_samples} training images: "
              f"using {fitted}")
    return from_dict(FinetuneConfig, merge(to_dict(cfg), {"train": {"global_batch_size": fitted}})), notice


def resolve_optim(cfg: FinetuneConfig, num_train_samples: int) -> FinetuneConfig:
    """Fill the optimizer fields left at 'auto' (-1) from the data size.

    layer_decay: 0.75 from SMALL_DATA_SAMPLES training images up, else 1 (off): on a few images per
    class it slowed the backbone's adaptation more than it protected it (BENCHMARKS.md, finetune).
    warmup_steps: 5% of the steps on small data, else 20, never more than a tenth of the run.
    """
    o = cfg.optim
    small = num_train_samples < SMALL_DATA_SAMPLES
    total = cfg.train.max_steps or math.ceil(cfg.train.epochs * max(1, num_train_samples // cfg.train.global_batch_size))
    updates = {}
    if o.layer_decay < 0:
        updates["layer_decay"] = 1.0 if small else 0.75
    if o.warmup_steps < 0:
        updates["warmup_steps"] = min(round(0.05 * total) if small else 20, total // 10)
    if not updates:
        return cfg
    return from_dict(FinetuneConfig, merge(to_dict(cfg), {"optim": updates}))


def plan_phases(cfg: FinetuneConfig, steps_per_epoch: int) -> list[Phase]:
    total = cfg.train.max_steps or math.ceil(cfg.train.epochs * steps_per_epoch)
    ft = cfg.finetune
    lp_lr = ft.lp_lr or cfg.optim.lr * 10
    if ft.mode == "full":
        return [Phase("full", False, 0, total, cfg.optim.lr)]
    if ft.mode == "linear":
        return [Phase("linear", True, 0, total, lp_lr)]
    lp_steps = ft.lp_steps or ft.lp_epochs * steps_per_epoch
    if lp_steps >= total:
        raise ConfigError(f"finetune.lp_steps: the linear probe ({lp_steps} steps) leaves nothing of the "
                          f"{total} total steps for the full fine-tune")
    return [Phase("linear", True, 0, lp_steps, lp_lr), Phase("full", False, lp_steps, total, cfg.optim.lr)]


def eval_cadence(cfg: FinetuneConfig, phase_steps: int, num_val_samples: int) -> int:
    """Validate every N steps: train.eval_every_steps, or (0 = auto) at most train.max_evals times per
    phase and at most train.eval_budget of the training compute (a validation image is a forward
    pass: a third of a training image). The last step of a phase always validates."""
    if cfg.train.eval_every_steps:
        return cfg.train.eval_every_steps
    by_count = math.ceil(phase_steps / cfg.train.max_evals)
    by_cost = math.ceil(num_val_samples / (3 * cfg.train.eval_budget * cfg.train.global_batch_size))
    return max(1, by_count, by_cost)


def loader_workers(cfg: FinetuneConfig, num_train_samples: int, world_size: int) -> int:
    """data.num_workers, lowered so that each worker's share of the data fills a batch: a rank's batch
    comes from one worker's share, and a share smaller than a batch repeats images within a batch."""
    per_rank = cfg.train.global_batch_size // world_size
    return min(cfg.data.num_workers, max(1, num_train_samples // (world_size * per_rank)))
