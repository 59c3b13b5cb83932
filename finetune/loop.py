"""The parts of a fine-tuning run that classification and detection do the same way.

finetune.train (classification) and finetune.detection.train (detection) each keep their own loop,
train step, validation and checkpoint contents, and call these for the rest: start the ranks, let
rank 0 ingest first, wrap the model in DDP, take an optimizer step, check, resume from and write
step checkpoints, describe the checkpoint's lineage, and the `main(argv)` of both modules
(`python -m finetune.train` / `python -m finetune.detection.train`, alone or under torchrun).
"""

from __future__ import annotations

import argparse
import logging
from typing import Callable, TypeVar

import torch
from torch import nn

from data_pipeline.config import ConfigError, load_config, to_dict
from data_pipeline.dataset import manifest_sha256
from finetune.train_state import read_state
from pretrain.checkpoint import LoadedCheckpoint, latest_checkpoint, load_checkpoint, save_checkpoint, verify_checkpoint
from pretrain.dist import DistInfo, barrier, init_distributed
from pretrain.rundir import RunDir

log = logging.getLogger(__name__)
T = TypeVar("T")


def start_ranks(cfg, dist: DistInfo | None) -> DistInfo:
    """Threads, the process group (unless `dist` is given), and a global batch the ranks split evenly."""
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    ranks = dist or init_distributed(use_gpu=cfg.scaling.use_gpu)
    if cfg.train.global_batch_size % ranks.world_size:
        raise ConfigError(f"train.global_batch_size: {cfg.train.global_batch_size} is not divisible by "
                          f"{ranks.world_size} ranks")
    return ranks


def check_arch(arch: str, checkpoint_arch: str) -> None:
    """model.arch may only repeat the checkpoint's architecture (it is there to catch a wrong checkpoint)."""
    if arch and arch != checkpoint_arch:
        raise ConfigError(f"model.arch: {arch!r} differs from the checkpoint's {checkpoint_arch!r}")


def rank0_first(prepare: Callable[[], T], ranks: DistInfo) -> T:
    """`prepare()` on rank 0, then on the others: rank 0 ingests into the cache, the others find it there."""
    if ranks.is_main:
        result = prepare()
    barrier(ranks)
    if not ranks.is_main:
        result = prepare()
    return result


def wrap_ddp(model: nn.Module, ranks: DistInfo) -> nn.Module:
    """The model DDP-wrapped on more than one rank (gradients averaged in backward), else itself."""
    if ranks.world_size == 1:
        return model
    device_ids = [ranks.device.index] if ranks.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def optimizer_step(model: nn.Module, optimizer, loss: torch.Tensor, grad_clip_norm: float) -> None:
    """Backward, clip the trainable parameters' gradient norm (when > 0), step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip_norm > 0:
        nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip_norm)
    optimizer.step()


def check_resumable(run_url: str, counters: tuple[str, ...]) -> None:
    """Refuse (CheckpointError) the step checkpoint the workers would resume from when it is unsafe."""
    latest = latest_checkpoint(run_url)
    if latest is not None:
        verify_checkpoint(latest)
        read_state(latest, counters)


def resume_state(run_url: str, model: nn.Module, counters: tuple[str, ...]) -> dict | None:
    """The train state (`counters` and "optimizer") of the newest step checkpoint of `run_url`, its
    weights loaded into `model`; None when the run has none."""
    latest = latest_checkpoint(run_url)
    if latest is None:
        return None
    state = read_state(latest, counters)
    model.load_state_dict(load_checkpoint(latest).state_dict)
    log.info("resuming from %s (step %d)", latest, state["step"])
    return state


def save_step(run: RunDir, ranks: DistInfo, step: int, keep: int, save: Callable[[str], object]) -> None:
    """Rank 0 writes step checkpoint `step` with `save(url)` and keeps the newest `keep`; all ranks wait."""
    if ranks.is_main:
        save(run.step_url(step))
        run.prune(keep)
    barrier(ranks)


def checkpoint_block(cfg, source: LoadedCheckpoint, *, train_url: str, step: int, steps_per_epoch: int,
                     metrics: dict) -> dict:
    """The `megaclass` block of a fine-tuned checkpoint that every task writes: what, from what, on what."""
    ft = cfg.finetune
    return {"kind": "finetune", "step": step, "epoch": step // steps_per_epoch,
            "dataset_manifest_sha256": manifest_sha256(train_url), "config": to_dict(cfg), "metrics": metrics,
            "finetuned_from": {"url": ft.checkpoint_url, "uri": ft.source_uri or ft.checkpoint_url,
                               "arch": source.arch, "step": source.megaclass.get("step"), "scratch": ft.scratch}}


def save_model(url: str, state_dict: dict, source: LoadedCheckpoint, class_names: list[str], *,
               pretrained_cfg: dict, megaclass: dict, write_train_state=None) -> str:
    """A contract-2 checkpoint of fine-tuned weights on the source checkpoint's architecture."""
    state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    return save_checkpoint(url, state_dict=state, arch=source.arch, num_classes=len(class_names),
                           class_names=class_names, pretrained_cfg=pretrained_cfg, megaclass=megaclass,
                           write_train_state=write_train_state, model_args=source.model_args)


def run_main(argv: list[str] | None, description: str, config_type: type, train: Callable[..., dict],
             result_line: Callable[[dict], str]) -> int:
    """`main(argv)` of a fine-tuning module: --config / --set, logging, the run, one line of result."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = train(load_config(config_type, args.config, args.overrides))
    print(result_line(summary))
    return 0
