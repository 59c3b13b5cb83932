"""FinetuneConfig: the typed config of `megaclass finetune` (defaults < YAML < `--set k=v`).

The sections both stages have are pretrain.config's (one definition, the same names, types and
ranges); fine-tuning extends them with what only it has and with defaults for small data. The
`finetune` section holds the source checkpoint and the mode (full fine-tune, linear probe, linear
probe then fine-tune).

    cfg = load_config(FinetuneConfig, "ft.yaml", ["finetune.mode=linear", "train.epochs=5"])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from data_pipeline.config import doc, require
from pretrain.config import (CheckpointSection, DataSection, LogSection, LossSection, ModelSection, OptimSection,
                             ScalingSection, TrainSection)


@dataclass(frozen=True)
class FinetuneDataSection(DataSection):
    """Three augmentation defaults differ from timm's ImageNet ones, chosen on few-shot data
    (BENCHMARKS.md, finetune): no flip (digits, text and laterality change meaning when flipped), a
    milder crop range, and evaluation on the whole image (small images have little border to spare)."""
    hflip: float = doc("horizontal flip probability (timm hflip); 0.5 is timm's ImageNet default", 0.0)
    scale: tuple[float, float] = doc("RandomResizedCrop area fraction range [min, max] (timm scale)", (0.25, 1.0))
    crop_pct: float = doc("evaluation: resize the shorter side to image_size / crop_pct, then center crop "
                          "(timm crop_pct; 1 = the whole image)", 1.0)
    url: str = doc("downstream train data: a dataset URL (megaclass ingest) or an image folder ROOT/<class>/<image>", "")
    image_size: int = doc("train/eval crop size in px; 0 = the checkpoint's pretrained_cfg input_size", 0, ge=0)
    num_workers: int = doc("loader worker processes per rank", 2, ge=0)
    val_url: str = doc("validation data, same forms; empty = the 'val' split of data.url", "")
    cache_url: str = doc("where image folders are ingested on the fly; empty = $MEGACLASS_CACHE or ~/.cache/megaclass", "")


@dataclass(frozen=True)
class FinetuneModelSection(ModelSection):
    arch: str = doc("timm architecture; empty = the checkpoint's (a different name is an error)", "")


@dataclass(frozen=True)
class FinetuneOptimSection(OptimSection):
    name: str = doc("optimizer: a timm.optim.create_optimizer_v2 name (sgd, adamw, lamb, ...)", "adamw")
    lr: float = doc("peak learning rate of the full fine-tune (per global batch)", 1e-3, gt=0.0)
    weight_decay: float = doc("decoupled weight decay (not applied to biases and norms)", 0.05, ge=0.0)
    warmup_steps: int = doc("linear warmup length, optimizer steps; -1 = auto: 5% of the steps below 2,000 "
                            "training images, 20 above (at most a tenth of the run)", -1, ge=-1)
    layer_decay: float = doc("layer-wise lr decay factor per block from the head; 1 = off; -1 = auto: off "
                             "below 2,000 training images, 0.75 above", -1.0, ge=-1.0, le=1.0)

    def validate(self) -> None:
        super().validate()
        require(self.layer_decay == -1 or self.layer_decay > 0, "optim.layer_decay",
                "must be in (0, 1] (1 turns it off) or -1 (auto)")


@dataclass(frozen=True)
class FinetuneTrainSection(TrainSection):
    global_batch_size: int = doc("samples per optimizer step summed over all ranks; lowered (with one notice) "
                                 "to the number of training images when larger", 64, ge=1)
    epochs: float = doc("passes over the train split when max_steps is 0 (fractions allowed)", 10.0, gt=0.0)
    eval_every_steps: int = doc("validate every N steps (and at the end of each phase); 0 = auto, bounded by "
                                "train.max_evals and train.eval_budget", 0, ge=0)
    max_evals: int = doc("auto cadence: validations per phase at most", 10, ge=1)
    eval_budget: float = doc("auto cadence: validation may cost at most this fraction of the training compute",
                             0.25, gt=0.0)
    patience: int = doc("stop after this many validations in a row without a val top-1 higher than all "
                        "before; 0 = never", 5, ge=0)
    select_tolerance: float = doc("classification: the selected (best/, final/) step is the latest whose val "
                                  "top-1 is within this many standard errors of the highest so far (binomial "
                                  "error on the val set); 0 = the latest of the highest. Detection keeps the "
                                  "highest mAP", 1.0, ge=0.0)


@dataclass(frozen=True)
class FinetuneCheckpointSection(CheckpointSection):
    url: str = doc("run dir (any fsspec URL): config.yaml, metrics.jsonl, step-N/, best/, final/", "")
    every_steps: int = doc("write a resumable step checkpoint every N steps; 0 = only at the end", 0, ge=0)
    keep: int = doc("step checkpoints kept (oldest removed first)", 2, ge=1)


@dataclass(frozen=True)
class FinetuneLogSection(LogSection):
    every_steps: int = doc("rank 0 logs train loss/lr every N steps", 10, ge=1)


@dataclass(frozen=True)
class SourceSection:
    """The `finetune` section every fine-tuning task has: which checkpoint, how, and the scratch baseline."""
    checkpoint_url: str = doc("source checkpoint dir (contract 2); registry URIs are resolved by the CLI", "")
    source_uri: str = doc("the checkpoint as the user named it (e.g. registry://NAME@ALIAS), kept for lineage; "
                          "set by the CLI", "")
    mode: str = doc("how the source weights train (the task's section says which modes it has)", "full")
    scratch: bool = doc("random init of the checkpoint's architecture (which then gives architecture and "
                        "preprocessing only; same data and budget): the baseline that shows what pretraining "
                        "is worth (--scratch)", False)


@dataclass(frozen=True)
class FinetuneSection(SourceSection):
    mode: Literal["full", "linear", "lp-ft"] = doc("full fine-tune | linear probe (frozen backbone) | linear probe then full", "full")
    lp_steps: int = doc("lp-ft: linear-probe steps before the full fine-tune; 0 = lp_epochs", 0, ge=0)
    lp_epochs: int = doc("lp-ft: linear-probe epochs when lp_steps is 0", 1, ge=1)
    lp_lr: float = doc("learning rate of the linear probe (mode linear and phase 1 of lp-ft); 0 = optim.lr x 10",
                       0.0, ge=0.0)


@dataclass(frozen=True)
class FinetuneSections:
    """The sections of every fine-tuning task's config; a task replaces model, optim and finetune with its own."""
    data: FinetuneDataSection = field(default_factory=FinetuneDataSection)
    model: FinetuneModelSection = field(default_factory=FinetuneModelSection)
    optim: FinetuneOptimSection = field(default_factory=FinetuneOptimSection)
    train: FinetuneTrainSection = field(default_factory=FinetuneTrainSection)
    checkpoint: FinetuneCheckpointSection = field(default_factory=FinetuneCheckpointSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    log: FinetuneLogSection = field(default_factory=FinetuneLogSection)
    finetune: SourceSection = field(default_factory=SourceSection)

    def check_runnable(self) -> None:
        """The fields a run needs that may be left empty in a YAML template."""
        require(bool(self.finetune.checkpoint_url), "finetune.checkpoint_url", "required (--checkpoint)")
        require(bool(self.data.url), "data.url", "required (--train)")
        require(bool(self.checkpoint.url), "checkpoint.url", "required: the run dir (--out or --set checkpoint.url=DIR)")


@dataclass(frozen=True)
class FinetuneConfig(FinetuneSections):
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    loss: LossSection = field(default_factory=LossSection)

    def validate(self) -> None:
        # Sections validate themselves; this checks what spans sections, before any work starts.
        if self.loss.mixup > 0 or self.loss.cutmix > 0:
            require(self.train.global_batch_size % 2 == 0, "train.global_batch_size",
                    "must be even when loss.mixup or loss.cutmix is on (timm Mixup pairs samples)")
