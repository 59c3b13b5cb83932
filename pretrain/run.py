"""Everything a pretraining run holds, built from the config: model, head, optimizer, data, checkpoints.

`build_run` turns a PretrainConfig into a `Run` (resuming from the newest run checkpoint when there
is one); `Run.epoch_steps` yields the micro-batches of each optimizer step from the reader;
`save_run_checkpoint` writes step-N/ (with train_state/) and, at the end, final/. The loop itself is
in pretrain.train.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import posixpath
import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

import fsspec
import torch
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn

from data_pipeline import dataset as ds
from data_pipeline.config import ConfigError, to_dict, to_yaml
from data_pipeline.reader import Loader, create_loader, dataset_info
from data_pipeline.transforms import IMAGENET_MEAN, IMAGENET_STD, create_random_erasing
from pretrain import checkpoint as ckpt
from pretrain.config import PretrainConfig, fit_to_world_size
from pretrain.dist import DistInfo, all_reduce_max, barrier, broadcast_object, sync_buffers
from pretrain.head import ShardedClassifierHead
from pretrain.models import Preset, classifier_prefix, create_backbone
from pretrain.rundir import CONFIG_FILE, FINAL_DIR
from pretrain.train_state import Progress, load_train_state, read_progress, save_train_state

log = logging.getLogger(__name__)


@dataclass
class Run:
    cfg: PretrainConfig
    dist: DistInfo
    backbone: nn.Module            # the bare timm model (what is saved)
    model: nn.Module               # backbone, DDP-wrapped when world_size > 1 (what is called)
    head: ShardedClassifierHead
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: ModelEmaV3 | None
    mixup: Mixup | None
    erasing: Any  # timm RandomErasing on the normalized batch (data.re_prob), or None
    preset: Preset
    class_names: list[str]
    manifest_sha256: str
    eval_samples: int
    batch_size_per_rank: int
    steps_per_epoch: int
    total_steps: int
    progress: Progress
    resumed_from: str | None = None  # the run checkpoint this process resumed from
    pending_upload: "Upload | None" = field(default=None, repr=False)  # a checkpoint still being uploaded

    def __post_init__(self) -> None:
        # (x / 255 - mean) / std as one fused x * scale + shift, the constants made once on the device
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self._norm_scale = (1.0 / (255.0 * std)).view(-1, 1, 1).to(self.dist.device)
        self._norm_shift = (-mean / std).view(-1, 1, 1).to(self.dist.device)

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """Loader uint8 [B, 3, H, W] -> normalised float32 on the device: one pass over float memory.
        The channels_last reorder happens on the uint8 tensor (a quarter of the bytes); addcmul keeps it."""
        images = images_uint8.to(self.dist.device, non_blocking=True)
        if self.cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return torch.addcmul(self._norm_shift, images, self._norm_scale)

    def sync_buffers(self) -> None:
        """Average BatchNorm statistics (of the backbone and its EMA) over ranks: DDP no longer broadcasts
        them every forward, and evaluation and checkpoints must see one model."""
        sync_buffers([self.backbone] + ([self.ema] if self.ema is not None else []), self.dist)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def autocast(self):
        return torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.precision == "bf16")

    def loader(self, epoch: int, skip_batches: int = 0) -> Loader:
        return create_train_loader(self.cfg, self.dist, self.batch_size_per_rank, epoch, skip_batches)

    def eval_loader(self) -> Loader | None:
        """Equal, unshuffled batches per rank of the held-out split (the sharded head needs every rank)."""
        per_rank = min(self.cfg.log.eval_batch_size, self.eval_samples // self.dist.world_size)
        if not self.cfg.data.eval_split or per_rank < 1:
            return None
        return create_loader(
            self.cfg.data.url, self.cfg.data.eval_split, batch_size_per_rank=per_rank, rank=self.dist.rank,
            world_size=self.dist.world_size, num_workers=self.cfg.data.num_workers, shuffle=False,
            transform=self.cfg.data.eval_transform(self.cfg.data.image_size), seed=self.cfg.train.seed,
            pin_memory=self.dist.device.type == "cuda")

    def epoch_steps(self, timer) -> Iterator[list]:
        """Micro-batch lists of the remaining optimizer steps of the current epoch, then advance the epoch."""
        accum, progress = self.cfg.train.grad_accum_steps, self.progress
        batches = iter(self.loader(progress.epoch, skip_batches=progress.steps_in_epoch * accum))
        while progress.steps_in_epoch < self.steps_per_epoch and progress.step < self.total_steps:
            with torch.random.fork_rng(devices=[]):  # DataLoader seeding draws from the global RNG;
                micro = [next(batches) for _ in range(accum)]  # keep it off the training stream (exact resume)
            timer.data_ready()
            if self.cfg.log.sample_keys:
                self._log_keys(progress.step + 1, micro)
            yield micro
            timer.mark()
        if progress.steps_in_epoch >= self.steps_per_epoch:
            progress.epoch, progress.steps_in_epoch = progress.epoch + 1, 0

    def keys_url(self) -> str:
        return posixpath.join(self.cfg.checkpoint.url.rstrip("/"), f"keys-rank-{self.dist.rank}.txt")

    def _log_keys(self, step: int, micro: list) -> None:
        with fsspec.open(self.keys_url(), "a") as f:
            f.writelines(f"{step}\t{' '.join(batch.keys)}\n" for batch in micro)


def create_train_loader(cfg: PretrainConfig, dist: DistInfo, batch_size_per_rank: int, epoch: int,
                        skip_batches: int = 0) -> Loader:
    """This rank's loader of the training split for one epoch (skip_batches: resume inside the epoch)."""
    return create_loader(
        cfg.data.url, cfg.data.train_split, batch_size_per_rank=batch_size_per_rank, rank=dist.rank,
        world_size=dist.world_size, num_workers=cfg.data.num_workers, seed=cfg.train.seed, epoch=epoch,
        transform=cfg.data.train_transform(cfg.data.image_size),
        shuffle_buffer=cfg.data.shuffle_buffer, samples_per_epoch=cfg.data.samples_per_epoch or None,
        skip_batches=skip_batches, pin_memory=dist.device.type == "cuda")


def _total_steps(cfg: PretrainConfig, steps_per_epoch: int) -> int:
    if cfg.train.max_steps:
        return cfg.train.max_steps
    if cfg.train.total_samples:
        return math.ceil(cfg.train.total_samples / cfg.train.global_batch_size)
    return max(1, math.ceil(cfg.train.epochs * steps_per_epoch))


def check_data(cfg: PretrainConfig) -> dict[str, Any]:
    try:
        info = dataset_info(cfg.data.url)
    except (FileNotFoundError, ds.DatasetError) as exc:
        raise ConfigError(f"data.url: {cfg.data.url} is not a readable dataset ({exc})") from None
    if cfg.data.train_split not in info["splits"]:
        raise ConfigError(f"data.train_split: split {cfg.data.train_split!r} not in {cfg.data.url} "
                          f"(has {sorted(info['splits'])})")
    if cfg.data.eval_split and cfg.data.eval_split not in info["splits"]:
        # ingest writes a held-out split only when asked (val_fraction > 0), so this is not an error
        log.warning("data.eval_split: split %r not in %s (has %s); held-out evaluation is off",
                    cfg.data.eval_split, cfg.data.url, sorted(info["splits"]))
    return info


def check_resume(cfg: PretrainConfig) -> str | None:
    """The run checkpoint a run will resume from, verified and its train_state index checked (so a
    damaged or hostile one is refused here, naming the file, not inside the workers); None if none."""
    latest = ckpt.latest_checkpoint(cfg.checkpoint.url) if cfg.checkpoint.resume else None
    if latest is not None:
        ckpt.verify_checkpoint(latest)
        read_progress(posixpath.join(latest, ckpt.TRAIN_STATE_DIR))
    return latest


def build_run(cfg: PretrainConfig, dist: DistInfo) -> Run:
    """Build model, head, optimizer, schedule and data plan; resume from the newest run checkpoint."""
    if dist.world_size < cfg.scaling.num_workers and cfg.scaling.min_workers:
        cfg = fit_to_world_size(cfg, dist.world_size)
        log.warning("running on %d of %d workers (scaling.min_workers): %d accumulation steps per optimizer step "
                    "keep the global batch at %d", dist.world_size, cfg.scaling.num_workers,
                    cfg.train.grad_accum_steps, cfg.train.global_batch_size)
    ranks_x_accum = dist.world_size * cfg.train.grad_accum_steps
    if cfg.train.global_batch_size % ranks_x_accum:
        raise ConfigError(f"train.global_batch_size: {cfg.train.global_batch_size} is not divisible by "
                          f"world size {dist.world_size} * train.grad_accum_steps {cfg.train.grad_accum_steps}")
    info = check_data(cfg)
    _set_determinism(cfg, dist)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    torch.manual_seed(cfg.train.seed)  # same backbone init on every rank
    backbone, preset = create_backbone(cfg.model.arch, drop_rate=cfg.model.drop_rate,
                                       drop_path_rate=cfg.model.drop_path_rate)
    backbone.to(dist.device)
    if cfg.train.channels_last:
        backbone.to(memory_format=torch.channels_last)
    num_features = getattr(backbone, "head_hidden_size", None) or backbone.num_features
    class_names = ds.class_names(cfg.data.url)
    head = ShardedClassifierHead(num_features, len(class_names), dist, sample_ratio=cfg.model.head_sample_ratio,
                                 init_seed=cfg.train.seed)
    # LAMB's built-in clipping (max_grad_norm) would use this rank's norm, which includes only its head
    # rows: ranks would scale the replicated backbone differently and drift apart. train.grad_clip_norm
    # (pretrain.head.clip_grad_norm_, over every rank's rows) is the one clipping path.
    extra = {"max_grad_norm": None} if cfg.optim.name == "lamb" else {}
    optimizer = create_optimizer_v2(nn.ModuleDict({"backbone": backbone, "head": head}), opt=cfg.optim.name,
                                    lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, momentum=cfg.optim.momentum,
                                    **extra)
    ema = ModelEmaV3(backbone, decay=cfg.train.ema_decay) if cfg.train.ema else None
    batch_size_per_rank = cfg.train.global_batch_size // ranks_x_accum
    steps_per_epoch = len(create_train_loader(cfg, dist, batch_size_per_rank, 0)) // cfg.train.grad_accum_steps
    if steps_per_epoch < 1:
        raise ConfigError(f"train.global_batch_size: {cfg.train.global_batch_size} is larger than an epoch")
    total_steps = _total_steps(cfg, steps_per_epoch)
    progress, resumed_from, rng_restored = _resume(cfg, dist, backbone, head, optimizer, ema)
    scheduler = _create_scheduler(cfg, optimizer, total_steps)
    scheduler.step_update(num_updates=progress.step)
    mixup = None
    if cfg.loss.mixup or cfg.loss.cutmix:
        mixup = Mixup(mixup_alpha=cfg.loss.mixup, cutmix_alpha=cfg.loss.cutmix, prob=cfg.loss.mix_prob,
                      switch_prob=cfg.loss.switch_prob, mode="batch", num_classes=len(class_names))
    if not rng_restored:  # per-rank stream for dropout / drop-path; a resume restores the saved one
        torch.manual_seed(cfg.train.seed * 1000 + dist.rank + 7919 * progress.step)
    model: nn.Module = backbone
    if dist.world_size > 1:
        device_ids = [dist.device.index] if dist.device.type == "cuda" else None
        # No broadcast of BatchNorm statistics before every forward (rank 0's are still copied once, at
        # construction): each rank keeps its own and Run.sync_buffers averages them before evaluating and
        # checkpointing. torch 2.14 renamed the switch; older releases know only broadcast_buffers.
        ddp_class = nn.parallel.DistributedDataParallel
        no_forward_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                           inspect.signature(ddp_class).parameters else {"broadcast_buffers": False})
        model = ddp_class(backbone, device_ids=device_ids, gradient_as_bucket_view=True, **no_forward_sync)
    if cfg.train.compile:
        # The DDP-wrapped model is compiled (not the backbone inside it), so dynamo's DDP optimizer splits
        # the graph at bucket boundaries and gradient all-reduces still overlap the backward.
        # run.backbone stays the plain module: state-dict keys stay timm's.
        model = torch.compile(model)
    run = Run(cfg=cfg, dist=dist, backbone=backbone, model=model, head=head, optimizer=optimizer, scheduler=scheduler,
              ema=ema, mixup=mixup, erasing=create_random_erasing(cfg.data.re_prob, dist.device), preset=preset,
              class_names=class_names, manifest_sha256=info["manifest_sha256"],
              eval_samples=info["splits"].get(cfg.data.eval_split, {}).get("num_samples", 0),
              batch_size_per_rank=batch_size_per_rank, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
              progress=progress, resumed_from=resumed_from)
    _record_config_and_keys(run)
    return run


def _set_determinism(cfg: PretrainConfig, dist: DistInfo) -> None:
    """train.deterministic: deterministic kernels. On CUDA, cuBLAS needs a fixed workspace (set here, before
    the first cuBLAS call) and some kernels have no deterministic version (adaptive average pooling
    backward): those warn instead of raising, so "exact resume" on a GPU means same data, same RNG, same
    step and learning rate, with weights equal only up to those kernels' float-summation order.
    Otherwise cuDNN benchmarks its algorithms once per input shape (fixed shapes here: a gain)."""
    on_cuda = dist.device.type == "cuda"
    if cfg.train.deterministic:
        if on_cuda:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=on_cuda)
        torch.backends.cudnn.benchmark = False
    elif on_cuda:
        torch.backends.cudnn.benchmark = True


def _create_scheduler(cfg: PretrainConfig, optimizer, total_steps: int):
    """timm's scheduler stepped per optimizer update (one 'epoch' = one update)."""
    sched, extra = ("cosine", {}) if cfg.optim.scheduler == "cosine" else ("step", {"decay_epochs": 10 * total_steps,
                                                                                    "decay_rate": 1.0})
    scheduler, _ = create_scheduler_v2(optimizer, sched=sched, num_epochs=total_steps, warmup_epochs=cfg.optim.warmup_steps,
                                       warmup_lr=cfg.optim.warmup_lr, min_lr=cfg.optim.min_lr, step_on_epochs=False,
                                       updates_per_epoch=1, **extra)
    return scheduler


def _resume(cfg: PretrainConfig, dist: DistInfo, backbone: nn.Module, head: ShardedClassifierHead,
            optimizer: torch.optim.Optimizer, ema: ModelEmaV3 | None) -> tuple[Progress, str | None, bool]:
    """Load the newest run checkpoint (if any) into the given modules and optimizer.

    Returns the progress to continue from, the checkpoint resumed from (None for a fresh run), and
    whether the RNG state was restored too (only at the world size it was saved with)."""
    # Rank 0 picks and verifies the checkpoint once (reading every file) and tells the others: every
    # rank resumes from the same one, and a damaged one fails on every rank with the same error.
    latest, error = None, None
    if dist.is_main and cfg.checkpoint.resume:
        latest = ckpt.latest_checkpoint(cfg.checkpoint.url)
        try:
            if latest is not None:
                ckpt.verify_checkpoint(latest)
        except ckpt.CheckpointError as exc:
            error = str(exc)
    latest, error = broadcast_object((latest, error), dist)
    if error is not None:
        raise ckpt.CheckpointError(error)
    if latest is None:
        return Progress(world_size=dist.world_size), None, False
    saved = load_train_state(posixpath.join(ckpt.readable_url(latest), ckpt.TRAIN_STATE_DIR), backbone=backbone,
                             head=head, optimizer=optimizer, ema=ema, dist=dist)
    log.info("resumed from %s at step %d (saved at world size %d, now %d)", latest, saved.step,
             saved.world_size, dist.world_size)
    progress = Progress(saved.step, saved.epoch, saved.steps_in_epoch, dist.world_size)
    return progress, latest, saved.world_size == dist.world_size


def _record_config_and_keys(run: Run) -> None:
    """Collective: rank 0 writes the resolved config.yaml; the sample-key logs lose the steps redone now."""
    if run.dist.is_main:
        ds.atomic_write_bytes(posixpath.join(run.cfg.checkpoint.url.rstrip("/"), CONFIG_FILE),
                              to_yaml(run.cfg).encode())
        if run.cfg.log.sample_keys:
            _truncate_keys(run)
    barrier(run.dist)
    if run.cfg.log.sample_keys and not run.dist.is_main:
        _truncate_keys(run)


def _truncate_keys(run: Run) -> None:
    """Drop key lines of steps after the resumed one (the dead run's steps that are redone now)."""
    fs, path = fsspec.core.url_to_fs(run.keys_url())
    if fs.exists(path):
        lines = fs.cat_file(path).decode().splitlines(keepends=True)
        kept = [line for line in lines if int(line.split("\t", 1)[0]) <= run.progress.step]
        ds.atomic_write_bytes(run.keys_url(), "".join(kept).encode())


def model_state(run: Run, head_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The whole model in timm naming: the (EMA) backbone + the gathered head as timm's classifier."""
    source = run.ema.module if run.ema is not None else run.backbone
    state = {k: v.detach().cpu() for k, v in source.state_dict().items()}
    prefix = classifier_prefix(run.preset.arch, run.preset.model_args)
    state.update({f"{prefix}.{name}": value.cpu() for name, value in head_state.items()})
    return state


def save_run_checkpoint(run: Run, metrics: dict[str, Any], final: bool = False, wait: bool = False) -> str:
    """Collective: step-N/ with train_state/ (then prune to checkpoint.keep); at the end also final/.

    On object storage a step checkpoint (not final/, not wait=True) is written to local disk and
    uploaded by a background thread per rank while training goes on; it completes (SHA256SUMS) at the
    start of the next checkpoint, so until then it is ignored like any incomplete one. Locally it is
    written in place (a rename makes it appear).
    """
    cfg, dist, step = run.cfg, run.dist, run.progress.step
    finish_upload(run)
    run_url = cfg.checkpoint.url.rstrip("/")
    step_url = posixpath.join(run_url, ckpt.step_dir_name(step))
    background = not (final or wait) and not ckpt.is_local(fsspec.core.url_to_fs(step_url)[0])  # object storage
    run.sync_buffers()
    if dist.is_main:
        ckpt.begin_checkpoint(step_url)
        if background:  # uploaded in place below: an older checkpoint of this step (a redone step) goes first
            ckpt.discard_checkpoint(step_url)
    barrier(dist)
    local_step = posixpath.join(tempfile.mkdtemp(prefix="megaclass-checkpoint-"), ckpt.step_dir_name(step)) \
        if background else None
    staging = ckpt.staging_url(local_step or step_url)
    state_sums = save_train_state(posixpath.join(staging, ckpt.TRAIN_STATE_DIR), backbone=run.backbone,
                                  head=run.head, optimizer=run.optimizer, ema=run.ema, progress=run.progress,
                                  dist=dist)
    head_state = run.head.full_state(dst=0)  # only rank 0 writes the model
    if dist.is_main:
        kwargs = dict(state_dict=model_state(run, head_state), arch=run.preset.arch, num_classes=run.num_classes,
                      class_names=run.class_names, model_args=run.preset.model_args,
                      pretrained_cfg={"input_size": (3, cfg.data.image_size, cfg.data.image_size),
                                      "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                                      "interpolation": cfg.data.interpolation, "crop_pct": cfg.data.crop_pct},
                      megaclass={"step": step, "epoch": run.progress.epoch, "dataset_url": cfg.data.url,
                                 "dataset_manifest_sha256": run.manifest_sha256, "world_size": dist.world_size,
                                 "model_preset": cfg.model.arch, "config": to_dict(cfg), "metrics": metrics,
                                 "augmentation": cfg.data.as_dict()})
        ckpt.save_checkpoint(local_step or step_url, staging=staging, known_sums=state_sums, **kwargs)
        if not background:
            ckpt.prune_checkpoints(run_url, cfg.checkpoint.keep)
        if final:
            ckpt.save_checkpoint(posixpath.join(run_url, FINAL_DIR), **kwargs)
    if background:  # rank 0 uploads its complete local checkpoint, the others their train_state/ shard
        sums, source = state_sums, staging
        if dist.is_main:
            with open(posixpath.join(local_step, ckpt.SUMS_FILE), "rb") as f:
                sums, source = {**ckpt.parse_sums(f.read(), local_step), **state_sums}, local_step
        run.pending_upload = Upload.start(source, step_url, sums)
    else:
        barrier(dist)
    return posixpath.join(run_url, FINAL_DIR) if final else step_url


@dataclass
class Upload:
    """One rank's background upload of a run checkpoint's files (all but SHA256SUMS) to object storage."""

    url: str
    thread: threading.Thread
    errors: list[BaseException]
    sums: dict[str, str]  # rank 0: every rank's train_state/ file hashes

    @classmethod
    def start(cls, local_dir: str, url: str, sums: dict[str, str]) -> "Upload":
        errors: list[BaseException] = []

        def upload() -> None:
            try:
                fs, path = fsspec.core.url_to_fs(url)
                for root, _, names in os.walk(local_dir):
                    for name in names:
                        rel = os.path.relpath(os.path.join(root, name), local_dir)
                        if rel != ckpt.SUMS_FILE:  # rank 0 writes the complete one once every rank is done
                            fs.put_file(os.path.join(root, name), posixpath.join(path, rel))
            except Exception as exc:  # re-raised on the training thread by finish_upload
                errors.append(exc)
            finally:
                shutil.rmtree(os.path.dirname(local_dir), ignore_errors=True)

        thread = threading.Thread(target=upload, name=f"upload {url}", daemon=True)
        thread.start()
        return cls(url, thread, errors, sums)


def finish_upload(run: Run) -> None:
    """Collective: wait for this rank's background upload; rank 0 then completes the checkpoint
    (SHA256SUMS: its own files' sums from its local copy, every rank's train_state/ sums) and prunes."""
    pending, run.pending_upload = run.pending_upload, None
    if pending is None:
        return
    pending.thread.join()
    if all_reduce_max(float(bool(pending.errors)), run.dist):  # every rank fails together
        raise RuntimeError(f"{pending.url}: uploading the checkpoint failed on a rank") from \
            (pending.errors[0] if pending.errors else None)
    if run.dist.is_main:
        fs, path = fsspec.core.url_to_fs(pending.url)
        present = {posixpath.relpath(p, path.rstrip("/")) for p in fs.find(path)}
        missing = sorted(set(pending.sums) - present)
        if missing:
            raise ckpt.CheckpointError(f"{posixpath.join(pending.url, missing[0])}: not uploaded")
        with fs.open(posixpath.join(path, ckpt.SUMS_FILE), "wb") as f:  # last: the checkpoint is complete
            f.write(ckpt.format_sums(pending.sums))
        ckpt.prune_checkpoints(run.cfg.checkpoint.url.rstrip("/"), run.cfg.checkpoint.keep)


class Preemption(contextlib.AbstractContextManager):
    """Turns SIGTERM into a flag the loop checks after each step (then it checkpoints and returns).

    Signal handlers can only be installed from the main thread; elsewhere (Ray Train runs the
    training function in a worker thread) the runtime's own shutdown applies and this is a no-op.
    """

    def __init__(self) -> None:
        self.requested = False
        self.installed = False  # False under Ray Train on every rank: the loop then skips the flag's all_reduce
        self._previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self.installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
