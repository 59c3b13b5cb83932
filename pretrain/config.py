"""The pretraining config: one frozen tree, defaults < YAML < `--set section.field=value`.

The keys docs/design.md lists (data.url, data.image_size, data.num_workers, model.arch,
train.global_batch_size, train.max_steps, train.precision, train.seed, loss.label_smoothing,
loss.mixup, loss.cutmix, checkpoint.url, checkpoint.every_steps, checkpoint.keep,
scaling.num_workers, scaling.use_gpu, scaling.max_failures) keep their names and meaning.
`validate()` and the bounds in each field's `doc()` run on every load, so a bad value fails
before any work starts, naming the field.

The sections fine-tuning has too are defined here once (`DataSection`, `ModelSection`,
`OptimSection`, `TrainSection`, `LossSection`, `CheckpointSection`, `ScalingSection`, `LogSection`);
each stage extends them with what only it has and with its own defaults (finetune.config).

    cfg = load_pretrain_config("configs/pretrain_tiny.yaml", ["train.max_steps=20"])
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from data_pipeline.config import ConfigError, doc, load_config, require
from data_pipeline.transforms import Augmentation
from pretrain.trackers import TrackingSection, check_tracker_names


# -- sections shared with fine-tuning -------------------------------------------------------------

@dataclass(frozen=True)
class DataSection(Augmentation):
    """Data and augmentation (the Augmentation fields: timm's names, recorded in the checkpoint)."""
    url: str = doc("dataset URL written by `megaclass ingest` (contract 1, any fsspec URL)", "")
    train_split: str = doc("split to train on", "train")
    image_size: int = doc("training crop side, px", 224, ge=16)
    num_workers: int = doc("loader worker processes per rank", 4, ge=0)
    shuffle_buffer: int = doc("samples in each loader worker's shuffle buffer", 1000, ge=0)

    def validate(self) -> None:
        super().validate()
        require(bool(self.train_split), "data.train_split", "must not be empty")


@dataclass(frozen=True)
class ModelSection:
    arch: str = doc("timm model name or a preset of pretrain.models.PRESETS", "resnet50d")
    drop_rate: float = doc("dropout before the classifier (timm drop_rate)", 0.0, ge=0.0, lt=1.0)
    drop_path_rate: float = doc("stochastic depth rate (timm drop_path_rate)", 0.0, ge=0.0, lt=1.0)

    def validate(self) -> None:
        if self.arch:
            from pretrain.models import resolve_arch  # imports timm: only when a config is validated
            resolve_arch(self.arch)  # a typo fails here, not inside the Ray workers


@dataclass(frozen=True)
class OptimSection:
    name: str = doc("optimizer: a timm.optim.create_optimizer_v2 name (sgd, adamw, lamb, ...)", "sgd")
    lr: float = doc("peak learning rate, after warmup", 0.1, gt=0.0)
    weight_decay: float = doc("decoupled/L2 weight decay (timm skips norm and bias params)", 5e-5, ge=0.0)
    momentum: float = doc("momentum of SGD-like optimizers", 0.9, ge=0.0, lt=1.0)
    warmup_steps: int = doc("linear warmup length, optimizer steps", 0, ge=0)
    warmup_lr: float = doc("learning rate at step 0 of warmup", 1e-6, ge=0.0)
    min_lr: float = doc("final learning rate of the cosine schedule", 1e-6, ge=0.0)

    def validate(self) -> None:
        from timm.optim import list_optimizers  # the names create_optimizer_v2 accepts
        require(self.name.lower().removeprefix("lookahead_") in list_optimizers(), "optim.name",
                f"{self.name!r} is not a timm optimizer (e.g. adamw, sgd, lamb)")
        require(self.min_lr <= self.lr, "optim.min_lr", f"must be <= optim.lr ({self.lr}), got {self.min_lr}")


@dataclass(frozen=True)
class TrainSection:
    global_batch_size: int = doc("samples per optimizer step summed over all ranks", 256, ge=1)
    max_steps: int = doc("optimizer steps to train; 0 = from epochs", 0, ge=0)
    epochs: float = doc("passes over the train split when max_steps is 0 (fractions allowed)", 1.0, gt=0.0)
    precision: Literal["fp32", "bf16"] = doc("fp32, or bf16 autocast (weights stay fp32)", "fp32")
    channels_last: bool = doc("NHWC memory format for the model and its input", True)
    grad_clip_norm: float = doc("clip the global grad norm to this; 0 = off", 0.0, ge=0.0)
    seed: int = doc("seed for init, data order, augmentation and mixing", 0)
    num_threads: int = doc("torch intra-op threads per rank; 0 = torch default (1 avoids oversubscription "
                           "next to loader workers on small CPUs)", 0, ge=0)


@dataclass(frozen=True)
class LossSection:
    label_smoothing: float = doc("label smoothing", 0.1, ge=0.0, lt=1.0)
    mixup: float = doc("mixup Beta(alpha, alpha) alpha, 0..1; 0 = off", 0.0, ge=0.0, le=1.0)
    cutmix: float = doc("cutmix Beta(alpha, alpha) alpha, 0..1; 0 = off", 0.0, ge=0.0, le=1.0)
    mix_prob: float = doc("probability that a batch is mixed at all (when mixup or cutmix is on)", 1.0, ge=0.0, le=1.0)
    switch_prob: float = doc("probability of cutmix instead of mixup when both are on", 0.5, ge=0.0, le=1.0)


@dataclass(frozen=True)
class CheckpointSection:
    url: str = doc("run dir (any fsspec URL): config.yaml, metrics.jsonl, tensorboard/, step-N/, final/", "")
    every_steps: int = doc("write a run checkpoint every N optimizer steps; 0 = only at the end", 1000, ge=0)
    keep: int = doc("run checkpoints (step-N/) kept; older ones are deleted", 3, ge=1)
    resume: bool = doc("continue from the latest run checkpoint in checkpoint.url when there is one", True)


@dataclass(frozen=True)
class ScalingSection:
    num_workers: int = doc("training processes (ranks); Ray Train workers", 1, ge=1)
    use_gpu: bool = doc("one GPU per worker (NCCL) instead of CPU (gloo)", False)
    max_failures: int = doc("worker-group restarts from the last checkpoint before the run fails; -1 = unlimited",
                            0, ge=-1)
    cpus_per_worker: float = doc("CPUs Ray reserves per worker: data.num_workers loader processes + trainer + pin thread", 1.0, gt=0.0)
    min_workers: int = doc("0 = always num_workers; else a restart after a lost node may go on with as few as "
                           "this many workers, same global batch through more accumulation steps", 0)

    def validate(self) -> None:
        require(0 <= self.min_workers <= self.num_workers, "scaling.min_workers",
                f"must be 0 (off) or 1..scaling.num_workers ({self.num_workers}), got {self.min_workers}")


@dataclass(frozen=True)
class LogSection:
    every_steps: int = doc("rank 0 logs metrics every N optimizer steps", 50, ge=1)
    tensorboard: bool = doc("write TensorBoard events to RUN/tensorboard (remote run dirs: synced there); false = "
                            "as if 'tensorboard' were not in log.trackers", True)
    trackers: list[str] = doc("experiment trackers: tensorboard, mlflow, wandb (rank 0 logs config, metrics, artifacts)",
                              ["tensorboard"])
    tracking: TrackingSection = field(default_factory=TrackingSection)

    def validate(self) -> None:
        check_tracker_names(self.trackers)


# -- what only pretraining has ---------------------------------------------------------------------

@dataclass(frozen=True)
class PretrainDataSection(DataSection):
    eval_split: str = doc("held-out split for top-1 logging (ingest's val_split); '' or absent = no held-out evaluation", "val")
    samples_per_epoch: int = doc("global samples per epoch; 0 = every sample of the train split", 0, ge=0)


@dataclass(frozen=True)
class PretrainModelSection(ModelSection):
    head_sample_ratio: float = doc("fraction of negative classes sampled per step in the head (PartialFC); 1 = all",
                                   1.0, gt=0.0, le=1.0)

    def validate(self) -> None:
        require(bool(self.arch), "model.arch", "must name a timm model or a preset")
        super().validate()


@dataclass(frozen=True)
class PretrainOptimSection(OptimSection):
    scheduler: Literal["cosine", "constant"] = doc("LR schedule after warmup (timm.scheduler)", "cosine")


@dataclass(frozen=True)
class PretrainTrainSection(TrainSection):
    grad_accum_steps: int = doc("micro-batches accumulated per optimizer step", 1, ge=1)
    total_samples: int = doc("samples to train on when max_steps is 0; 0 = use epochs", 0, ge=0)
    compile: bool = doc("torch.compile the DDP-wrapped backbone (keeps DDP's bucketed all-reduce overlap)", False)
    ema: bool = doc("keep an EMA of the backbone (timm ModelEmaV3); published instead of the raw weights", False)
    ema_decay: float = doc("EMA decay per optimizer step", 0.9998, gt=0.0, lt=1.0)
    deterministic: bool = doc("torch deterministic algorithms (exact-resume checks; slower; on CUDA see docs/pretrain.md)", False)

    def validate(self) -> None:
        require(not (self.max_steps and self.total_samples), "train.total_samples",
                "set train.max_steps or train.total_samples, not both")


@dataclass(frozen=True)
class PretrainLogSection(LogSection):
    eval_every_steps: int = doc("held-out top-1 every N optimizer steps; 0 = at every log step", 0, ge=0)
    eval_batches: int = doc("held-out batches per evaluation; 0 = the whole split", 20, ge=0)
    eval_batch_size: int = doc("held-out batch size (rank 0 evaluates alone)", 64, ge=1)
    sample_keys: bool = doc("append the sample keys of every step to keys-rank-R.txt in the run dir", False)


@dataclass(frozen=True)
class PretrainConfig:
    data: PretrainDataSection = field(default_factory=PretrainDataSection)
    model: PretrainModelSection = field(default_factory=PretrainModelSection)
    optim: PretrainOptimSection = field(default_factory=PretrainOptimSection)
    train: PretrainTrainSection = field(default_factory=PretrainTrainSection)
    loss: LossSection = field(default_factory=LossSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    log: PretrainLogSection = field(default_factory=PretrainLogSection)

    def validate(self) -> None:
        # Sections validate themselves (defaulted ones too); this checks what spans sections.
        require(bool(self.data.url), "data.url", "must name a dataset (contract 1)")
        require(bool(self.checkpoint.url), "checkpoint.url", "must name the run dir")
        ranks_x_accum = self.scaling.num_workers * self.train.grad_accum_steps
        require(self.train.global_batch_size % ranks_x_accum == 0, "train.global_batch_size",
                f"{self.train.global_batch_size} is not divisible by scaling.num_workers * "
                f"train.grad_accum_steps = {self.scaling.num_workers} * {self.train.grad_accum_steps}")
        micro = self.train.global_batch_size // ranks_x_accum  # per rank and forward pass, kept on fewer workers
        for world_size in range(self.scaling.min_workers or self.scaling.num_workers, self.scaling.num_workers):
            require(self.train.global_batch_size % (world_size * micro) == 0, "scaling.min_workers",
                    f"on {world_size} workers, train.global_batch_size {self.train.global_batch_size} is not a whole "
                    f"number of micro-batches of {micro} per worker")


def fit_to_world_size(cfg: "PretrainConfig", world_size: int) -> "PretrainConfig":
    """The config for a run on `world_size` < scaling.num_workers ranks (scaling.min_workers set): the same
    micro-batch per rank and the same global batch, so more accumulation steps per optimizer step."""
    if not cfg.scaling.min_workers or world_size >= cfg.scaling.num_workers:
        return cfg
    micro = cfg.train.global_batch_size // (cfg.scaling.num_workers * cfg.train.grad_accum_steps)
    accum = cfg.train.global_batch_size // (world_size * micro)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum_steps=accum),
                               scaling=dataclasses.replace(cfg.scaling, num_workers=world_size))


def load_pretrain_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> PretrainConfig:
    """Defaults < YAML file < `--set` overrides; raises ConfigError naming the field."""
    return load_config(PretrainConfig, path, overrides)


__all__ = ["PretrainConfig", "ConfigError", "load_pretrain_config"]
