"""FinetuneConfig: the typed config of `megaclass finetune` (defaults < YAML < `--set k=v`).

Section names match pretrain's where they mean the same thing (data, model, optim, train, loss,
checkpoint, scaling, log); the `finetune` section holds what only fine-tuning has: the source
checkpoint and the mode (full fine-tune, linear probe, linear probe then fine-tune).

    cfg = load_config(FinetuneConfig, "ft.yaml", ["finetune.mode=linear", "train.epochs=5"])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from data_pipeline.config import doc, require
from data_pipeline.transforms import Augmentation

MODES = ("full", "linear", "lp-ft")


@dataclass(frozen=True)
class DataSection(Augmentation):
    """Data and augmentation (the Augmentation fields: timm's names, recorded in the checkpoint).

    Three defaults differ from timm's ImageNet ones, chosen on few-shot data (BENCHMARKS.md, finetune):
    no flip (digits, text and laterality change meaning when flipped), a milder crop range, and
    evaluation on the whole image (small downstream images have little border to spare)."""
    hflip: float = doc("horizontal flip probability (timm hflip); 0.5 is timm's ImageNet default", 0.0)
    scale: tuple[float, float] = doc("RandomResizedCrop area fraction range [min, max] (timm scale)", (0.25, 1.0))
    crop_pct: float = doc("evaluation: resize the shorter side to image_size / crop_pct, then center crop "
                          "(timm crop_pct; 1 = the whole image)", 1.0)
    url: str = doc("downstream train data: a dataset URL (megaclass ingest) or an image folder ROOT/<class>/<image>", "")
    val_url: str = doc("validation data, same forms; empty = the 'val' split of data.url", "")
    train_split: str = doc("split of data.url to train on", "train")
    cache_url: str = doc("where image folders are ingested on the fly; empty = $MEGACLASS_CACHE or ~/.cache/megaclass", "")
    image_size: int = doc("train/eval crop size in px; 0 = the checkpoint's pretrained_cfg input_size", 0)
    num_workers: int = doc("loader worker processes per rank", 2)
    shuffle_buffer: int = doc("samples in the loader's shuffle buffer", 1000)

    def validate(self) -> None:
        require(self.image_size >= 0, "data.image_size", "must be >= 0 (0 = from the checkpoint)")
        super().validate()
        require(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        require(self.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1")


@dataclass(frozen=True)
class ModelSection:
    arch: str = doc("timm architecture; empty = the checkpoint's (a different name is an error)", "")
    drop_rate: float = doc("dropout before the new classifier (0..1)", 0.0)
    drop_path_rate: float = doc("stochastic depth rate for architectures that have it (0..1)", 0.0)

    def validate(self) -> None:
        require(0.0 <= self.drop_rate < 1.0, "model.drop_rate", "must be in [0, 1)")
        require(0.0 <= self.drop_path_rate < 1.0, "model.drop_path_rate", "must be in [0, 1)")


@dataclass(frozen=True)
class OptimSection:
    name: str = doc("timm optimizer name (adamw, sgd, lamb, ...), as pretrain's optim.name", "adamw")
    lr: float = doc("peak learning rate of the full fine-tune (per global batch)", 1e-3)
    weight_decay: float = doc("decoupled weight decay (not applied to biases and norms)", 0.05)
    momentum: float = doc("momentum for sgd-like optimizers", 0.9)
    layer_decay: float = doc("layer-wise lr decay factor per block from the head (0..1]; 1 = off; -1 = auto: "
                             "off below 2,000 training images, 0.75 above", -1.0)
    warmup_steps: int = doc("linear warmup steps from warmup_lr to lr; -1 = auto: 5% of the steps below 2,000 "
                            "training images, 20 above (at most a tenth of the run)", -1)
    warmup_lr: float = doc("learning rate at step 0 of warmup", 1e-6)
    min_lr: float = doc("learning rate at the end of the cosine schedule", 1e-6)

    def validate(self) -> None:
        from timm.optim import list_optimizers  # the names create_optimizer_v2 accepts
        require(self.name.lower().removeprefix("lookahead_") in list_optimizers(), "optim.name",
                f"{self.name!r} is not a timm optimizer (e.g. adamw, sgd, lamb)")
        require(self.lr > 0, "optim.lr", "must be > 0")
        require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        require(self.layer_decay == -1 or 0.0 < self.layer_decay <= 1.0, "optim.layer_decay",
                "must be in (0, 1] (1 turns it off) or -1 (auto)")
        require(self.warmup_steps >= -1, "optim.warmup_steps", "must be >= 0, or -1 (auto)")
        require(0 <= self.min_lr <= self.lr, "optim.min_lr", "must be in [0, optim.lr]")


@dataclass(frozen=True)
class TrainSection:
    epochs: int = doc("passes over the train split (used when max_steps is 0)", 10)
    max_steps: int = doc("optimizer steps in total (all phases); 0 = epochs x steps per epoch", 0)
    global_batch_size: int = doc("images per optimizer step over all ranks; lowered (with a notice) to the "
                                 "number of training images when larger", 64)
    precision: Literal["fp32", "bf16"] = doc("fp32, or bf16 autocast", "fp32")
    channels_last: bool = doc("NHWC memory format (faster convolutions on CPU and GPU)", True)
    seed: int = doc("seed of the head init, the data order and augmentation", 0)
    eval_every_steps: int = doc("validate every N steps (and at the end of each phase); 0 = auto, bounded by "
                                "train.max_evals and train.eval_budget", 0)
    max_evals: int = doc("auto cadence: validations per phase at most", 10)
    eval_budget: float = doc("auto cadence: validation may cost at most this fraction of the training compute", 0.25)
    patience: int = doc("stop after this many validations without a better val top-1; 0 = never", 5)
    grad_clip_norm: float = doc("clip the global grad norm to this; 0 = off (as pretrain's train.grad_clip_norm)", 0.0)
    num_threads: int = doc("torch intra-op threads per rank; 0 = torch default (1 avoids oversubscription "
                           "next to loader workers on small CPUs)", 0)

    def validate(self) -> None:
        require(self.epochs >= 1, "train.epochs", "must be >= 1")
        require(self.max_steps >= 0, "train.max_steps", "must be >= 0 (0 = from epochs)")
        require(self.global_batch_size >= 1, "train.global_batch_size", "must be >= 1")
        require(self.eval_every_steps >= 0, "train.eval_every_steps", "must be >= 0")
        require(self.max_evals >= 1, "train.max_evals", "must be >= 1")
        require(self.eval_budget > 0, "train.eval_budget", "must be > 0")
        require(self.patience >= 0, "train.patience", "must be >= 0")
        require(self.grad_clip_norm >= 0, "train.grad_clip_norm", "must be >= 0")
        require(self.num_threads >= 0, "train.num_threads", "must be >= 0")


@dataclass(frozen=True)
class LossSection:
    label_smoothing: float = doc("label smoothing (0..1)", 0.1)
    mixup: float = doc("mixup alpha (0 = off)", 0.0)
    cutmix: float = doc("cutmix alpha (0 = off)", 0.0)
    mix_prob: float = doc("probability that a batch is mixed when mixup/cutmix is on (0..1)", 1.0)

    def validate(self) -> None:
        require(0.0 <= self.label_smoothing < 1.0, "loss.label_smoothing", "must be in [0, 1)")
        require(self.mixup >= 0.0, "loss.mixup", "must be >= 0")
        require(self.cutmix >= 0.0, "loss.cutmix", "must be >= 0")
        require(0.0 <= self.mix_prob <= 1.0, "loss.mix_prob", "must be in [0, 1]")


@dataclass(frozen=True)
class CheckpointSection:
    url: str = doc("run dir (any fsspec URL): config.yaml, metrics.jsonl, step-*/, best/, final/", "")
    every_steps: int = doc("write a resumable step checkpoint every N steps; 0 = only at the end", 0)
    keep: int = doc("step checkpoints kept (oldest removed first)", 2)

    def validate(self) -> None:
        require(self.every_steps >= 0, "checkpoint.every_steps", "must be >= 0")
        require(self.keep >= 1, "checkpoint.keep", "must be >= 1")


@dataclass(frozen=True)
class ScalingSection:
    num_workers: int = doc("Ray Train workers (one DDP rank each)", 1)
    use_gpu: bool = doc("one GPU per worker", False)
    max_failures: int = doc("Ray Train restarts after a worker failure (resumes from the last step checkpoint)", 0)
    cpus_per_worker: float = doc("CPUs Ray reserves per worker (loader workers + trainer)", 1.0)

    def validate(self) -> None:
        require(self.num_workers >= 1, "scaling.num_workers", "must be >= 1")
        require(self.max_failures >= -1, "scaling.max_failures", "must be >= -1 (-1 = unlimited)")
        require(self.cpus_per_worker > 0, "scaling.cpus_per_worker", "must be > 0")


@dataclass(frozen=True)
class LogSection:
    every_steps: int = doc("log train loss/lr every N steps", 10)
    tensorboard: bool = doc("write tensorboard/ event files (local run dirs only)", True)

    def validate(self) -> None:
        require(self.every_steps >= 1, "log.every_steps", "must be >= 1")


@dataclass(frozen=True)
class FinetuneSection:
    checkpoint_url: str = doc("source checkpoint dir (contract 2); registry URIs are resolved by the CLI", "")
    source_uri: str = doc("the checkpoint as the user named it (e.g. registry://NAME@ALIAS), kept for lineage; "
                          "set by the CLI", "")
    mode: Literal["full", "linear", "lp-ft"] = doc("full fine-tune | linear probe (frozen backbone) | linear probe then full", "full")
    scratch: bool = doc("random init of the checkpoint's architecture (same preprocessing, data and budget): "
                        "the baseline that shows what pretraining is worth (--scratch)", False)
    lp_steps: int = doc("lp-ft: linear-probe steps before the full fine-tune; 0 = lp_epochs", 0)
    lp_epochs: int = doc("lp-ft: linear-probe epochs when lp_steps is 0", 1)
    lp_lr: float = doc("learning rate of the linear probe (mode linear and phase 1 of lp-ft); 0 = optim.lr x 10", 0.0)

    def validate(self) -> None:
        require(self.mode in MODES, "finetune.mode", f"must be one of {list(MODES)}")
        require(self.lp_steps >= 0, "finetune.lp_steps", "must be >= 0")
        require(self.lp_epochs >= 1, "finetune.lp_epochs", "must be >= 1")
        require(self.lp_lr >= 0, "finetune.lp_lr", "must be >= 0 (0 = optim.lr x 10)")


@dataclass(frozen=True)
class FinetuneConfig:
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    loss: LossSection = field(default_factory=LossSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    log: LogSection = field(default_factory=LogSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)

    def validate(self) -> None:
        # Sections validate themselves; this checks what spans sections, before any work starts.
        if self.loss.mixup > 0 or self.loss.cutmix > 0:
            require(self.train.global_batch_size % 2 == 0, "train.global_batch_size",
                    "must be even when loss.mixup or loss.cutmix is on (timm Mixup pairs samples)")

    def check_runnable(self) -> None:
        """The fields a run needs that may be left empty in a YAML template."""
        require(bool(self.finetune.checkpoint_url), "finetune.checkpoint_url", "required (--checkpoint)")
        require(bool(self.data.url), "data.url", "required (--train)")
        require(bool(self.checkpoint.url), "checkpoint.url", "required: the run dir (--set checkpoint.url=DIR)")
