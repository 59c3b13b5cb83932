"""The pretraining config: one frozen tree, defaults < YAML < `--set section.field=value`.

The keys DESIGN.md lists (data.url, data.image_size, data.num_workers, model.arch,
train.global_batch_size, train.max_steps, train.precision, train.seed, loss.label_smoothing,
loss.mixup, loss.cutmix, checkpoint.url, checkpoint.every_steps, checkpoint.keep,
scaling.num_workers, scaling.use_gpu, scaling.max_failures) keep their names and meaning.
`validate()` runs on every load, so a bad value fails before any work starts, naming the field.

    cfg = load_pretrain_config("configs/pretrain_tiny.yaml", ["train.max_steps=20"])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from data_pipeline.config import ConfigError, doc, load_config, require
from data_pipeline.transforms import Augmentation


@dataclass(frozen=True)
class DataSection(Augmentation):
    """Data and augmentation (the Augmentation fields: timm's names, recorded in the checkpoint)."""
    url: str = doc("dataset URL written by `megaclass ingest` (contract 1, any fsspec URL)", "")
    train_split: str = doc("split to train on", "train")
    eval_split: str = doc("held-out split for top-1 logging (ingest's val_split); '' or absent = no held-out evaluation", "val")
    image_size: int = doc("training crop side, px", 224)
    num_workers: int = doc("loader worker processes per rank", 4)
    shuffle_buffer: int = doc("samples in each loader worker's shuffle buffer", 1000)
    samples_per_epoch: int = doc("global samples per epoch; 0 = every sample of the train split", 0)

    def validate(self) -> None:
        require(self.image_size >= 16, "data.image_size", f"must be >= 16 px, got {self.image_size}")
        super().validate()
        require(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        require(self.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0")
        require(self.samples_per_epoch >= 0, "data.samples_per_epoch", "must be >= 0")
        require(bool(self.train_split), "data.train_split", "must not be empty")


@dataclass(frozen=True)
class ModelSection:
    arch: str = doc("timm model name or a preset of pretrain.models.PRESETS", "resnet50d")
    drop_rate: float = doc("dropout before the classifier (timm drop_rate)", 0.0)
    drop_path_rate: float = doc("stochastic depth rate (timm drop_path_rate)", 0.0)
    head_sample_ratio: float = doc("fraction of negative classes sampled per step in the head (PartialFC); 1 = all", 1.0)

    def validate(self) -> None:
        require(bool(self.arch), "model.arch", "must name a timm model or a preset")
        from pretrain.models import resolve_arch  # imports timm: only when a config is validated
        resolve_arch(self.arch)  # a typo fails here, not inside the Ray workers
        require(0.0 <= self.drop_rate < 1.0, "model.drop_rate", "must be in [0, 1)")
        require(0.0 <= self.drop_path_rate < 1.0, "model.drop_path_rate", "must be in [0, 1)")
        require(0.0 < self.head_sample_ratio <= 1.0, "model.head_sample_ratio", "must be in (0, 1]")


@dataclass(frozen=True)
class OptimSection:
    name: Literal["sgd", "adamw", "lamb"] = doc("optimizer (timm.optim.create_optimizer_v2)", "sgd")
    lr: float = doc("peak learning rate, after warmup", 0.1)
    weight_decay: float = doc("decoupled/L2 weight decay (timm skips norm and bias params)", 5e-5)
    momentum: float = doc("SGD momentum", 0.9)
    scheduler: Literal["cosine", "constant"] = doc("LR schedule after warmup (timm.scheduler)", "cosine")
    warmup_steps: int = doc("linear warmup length, optimizer steps", 0)
    warmup_lr: float = doc("learning rate at step 0 of warmup", 1e-6)
    min_lr: float = doc("final learning rate of the cosine schedule", 1e-6)

    def validate(self) -> None:
        require(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        require(0.0 <= self.momentum < 1.0, "optim.momentum", "must be in [0, 1)")
        require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        require(self.min_lr >= 0 and self.warmup_lr >= 0, "optim.min_lr", "learning rates must be >= 0")


@dataclass(frozen=True)
class TrainSection:
    global_batch_size: int = doc("samples per optimizer step summed over all ranks", 256)
    grad_accum_steps: int = doc("micro-batches accumulated per optimizer step", 1)
    max_steps: int = doc("optimizer steps to train; 0 = from epochs or total_samples", 0)
    epochs: float = doc("epochs to train when max_steps and total_samples are 0", 1.0)
    total_samples: int = doc("samples to train on when max_steps is 0; 0 = use epochs", 0)
    precision: Literal["fp32", "bf16"] = doc("fp32, or bf16 autocast (weights stay fp32)", "fp32")
    channels_last: bool = doc("NHWC memory format for the backbone and its input", True)
    compile: bool = doc("torch.compile the backbone", False)
    ema: bool = doc("keep an EMA of the backbone (timm ModelEmaV3); published instead of the raw weights", False)
    ema_decay: float = doc("EMA decay per optimizer step", 0.9998)
    grad_clip_norm: float = doc("clip the global grad norm to this; 0 = off", 0.0)
    seed: int = doc("seed for init, data order, augmentation and mixing", 0)
    deterministic: bool = doc("torch deterministic algorithms (for exact-resume checks; slower)", False)
    num_threads: int = doc("torch intra-op threads per rank; 0 = torch default", 0)

    def validate(self) -> None:
        require(self.global_batch_size >= 1, "train.global_batch_size", "must be >= 1")
        require(self.grad_accum_steps >= 1, "train.grad_accum_steps", "must be >= 1")
        require(self.max_steps >= 0, "train.max_steps", "must be >= 0")
        require(self.epochs > 0, "train.epochs", "must be > 0")
        require(self.total_samples >= 0, "train.total_samples", "must be >= 0")
        require(not (self.max_steps and self.total_samples), "train.total_samples",
                "set train.max_steps or train.total_samples, not both")
        require(0.0 < self.ema_decay < 1.0, "train.ema_decay", "must be in (0, 1)")
        require(self.grad_clip_norm >= 0, "train.grad_clip_norm", "must be >= 0")
        require(self.num_threads >= 0, "train.num_threads", "must be >= 0")


@dataclass(frozen=True)
class LossSection:
    label_smoothing: float = doc("label smoothing, 0..1", 0.1)
    mixup: float = doc("mixup Beta(alpha, alpha) alpha, 0..1; 0 = off", 0.0)
    cutmix: float = doc("cutmix Beta(alpha, alpha) alpha, 0..1; 0 = off", 0.0)
    mix_prob: float = doc("probability that a batch is mixed at all (when mixup or cutmix is on)", 1.0)
    switch_prob: float = doc("probability of cutmix instead of mixup when both are on", 0.5)

    def validate(self) -> None:
        for name in ("label_smoothing", "mixup", "cutmix", "mix_prob", "switch_prob"):
            value = getattr(self, name)
            require(0.0 <= value <= 1.0, f"loss.{name}", f"must be in [0, 1], got {value}")
        require(self.label_smoothing < 1.0, "loss.label_smoothing", "must be < 1")


@dataclass(frozen=True)
class CheckpointSection:
    url: str = doc("run dir (any fsspec URL): config.yaml, metrics.jsonl, tensorboard/, step-N/, final/", "")
    every_steps: int = doc("write a run checkpoint every N optimizer steps; 0 = only at the end", 1000)
    keep: int = doc("run checkpoints (step-N/) kept; older ones are deleted", 3)
    resume: bool = doc("continue from the latest run checkpoint in checkpoint.url when there is one", True)

    def validate(self) -> None:
        require(bool(self.url), "checkpoint.url", "must name the run dir")
        require(self.every_steps >= 0, "checkpoint.every_steps", "must be >= 0")
        require(self.keep >= 1, "checkpoint.keep", "must be >= 1")


@dataclass(frozen=True)
class ScalingSection:
    num_workers: int = doc("training processes (ranks); Ray Train workers", 1)
    use_gpu: bool = doc("one GPU per worker (NCCL) instead of CPU (gloo)", False)
    max_failures: int = doc("worker-group restarts from the last checkpoint before the run fails", 0)
    cpus_per_worker: float = doc("CPUs Ray reserves per worker (loader workers + trainer)", 1.0)

    def validate(self) -> None:
        require(self.num_workers >= 1, "scaling.num_workers", "must be >= 1")
        require(self.max_failures >= -1, "scaling.max_failures", "must be >= 0 (or -1 = unlimited)")
        require(self.cpus_per_worker > 0, "scaling.cpus_per_worker", "must be > 0")


@dataclass(frozen=True)
class LogSection:
    every_steps: int = doc("rank 0 logs metrics every N optimizer steps", 50)
    eval_every_steps: int = doc("held-out top-1 every N optimizer steps; 0 = at every log step", 0)
    eval_batches: int = doc("held-out batches per evaluation; 0 = the whole split", 20)
    eval_batch_size: int = doc("held-out batch size (rank 0 evaluates alone)", 64)
    sample_keys: bool = doc("append the sample keys of every step to keys-rank-R.txt in the run dir", False)
    tensorboard: bool = doc("write TensorBoard events to RUN/tensorboard", True)

    def validate(self) -> None:
        require(self.every_steps >= 1, "log.every_steps", "must be >= 1")
        require(self.eval_every_steps >= 0, "log.eval_every_steps", "must be >= 0")
        require(self.eval_batches >= 0, "log.eval_batches", "must be >= 0")
        require(self.eval_batch_size >= 1, "log.eval_batch_size", "must be >= 1")


@dataclass(frozen=True)
class PretrainConfig:
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    loss: LossSection = field(default_factory=LossSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    log: LogSection = field(default_factory=LogSection)

    def validate(self) -> None:
        # Sections validate themselves (defaulted ones too); this checks what spans sections.
        require(bool(self.data.url), "data.url", "must name a dataset (contract 1)")
        ranks_x_accum = self.scaling.num_workers * self.train.grad_accum_steps
        require(self.train.global_batch_size % ranks_x_accum == 0, "train.global_batch_size",
                f"{self.train.global_batch_size} is not divisible by scaling.num_workers * "
                f"train.grad_accum_steps = {self.scaling.num_workers} * {self.train.grad_accum_steps}")

    @property
    def batch_size_per_rank(self) -> int:
        """Micro-batch size of one rank (one forward/backward)."""
        return self.train.global_batch_size // (self.scaling.num_workers * self.train.grad_accum_steps)


def load_pretrain_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> PretrainConfig:
    """Defaults < YAML file < `--set` overrides; raises ConfigError naming the field."""
    return load_config(PretrainConfig, path, overrides)


__all__ = ["PretrainConfig", "ConfigError", "load_pretrain_config"]
