"""Downstream models from contract-2 checkpoints: a fresh head, every backbone weight from the checkpoint.

The checkpoint is read through `pretrain.checkpoint` only. The pretrained classifier is always
dropped and a new one built for the downstream classes, whether the class counts differ or not
(equal counts, e.g. 1000 and 1000, would otherwise silently keep the old head). Every other
parameter and buffer (BatchNorm running statistics included) is checked to equal the checkpoint's.
"""

from __future__ import annotations

import torch
from torch import nn

from pretrain.checkpoint import (CheckpointError, LoadedCheckpoint, classifier_name, create_model_from_checkpoint,
                                load_checkpoint)


def is_head_key(key: str, head_name: str) -> bool:
    return key == head_name or key.startswith(head_name + ".")


def create_finetune_model(ckpt: LoadedCheckpoint, num_classes: int, *, drop_rate: float = 0.0,
                          drop_path_rate: float = 0.0, seed: int = 0, scratch: bool = False) -> nn.Module:
    """The checkpoint's backbone with a new `num_classes` head, initialised from `seed`.

    scratch: the same architecture randomly initialised from `seed` (a baseline: same everything else).
    """
    timm_kwargs = {"drop_rate": drop_rate}
    if drop_path_rate > 0:
        timm_kwargs["drop_path_rate"] = drop_path_rate
    if scratch:
        import timm

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return timm.create_model(ckpt.arch, pretrained=False, num_classes=num_classes,
                                     **{**ckpt.model_args, **timm_kwargs})
    model = create_model_from_checkpoint(ckpt, num_classes=num_classes, **timm_kwargs)
    # Build the new head from a fixed seed so that every DDP rank (and every rerun) starts equal.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.reset_classifier(num_classes)
    mismatched = backbone_mismatches(model, ckpt)
    if mismatched:
        raise CheckpointError(f"{ckpt.url}: backbone weights not loaded from the checkpoint: {', '.join(mismatched[:5])}")
    return model


def backbone_mismatches(model: nn.Module, ckpt: LoadedCheckpoint) -> list[str]:
    """Names of non-head tensors of `model` that are absent from, or differ from, the checkpoint."""
    head = classifier_name(model)
    problems = []
    for key, value in model.state_dict().items():
        if is_head_key(key, head):
            continue
        source = ckpt.state_dict.get(key)
        if source is None or source.shape != value.shape or not torch.equal(source.to(value.dtype), value.cpu()):
            problems.append(key)
    return problems


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(model.get_classifier().parameters())


def set_backbone_frozen(model: nn.Module, frozen: bool) -> None:
    """Freeze (or unfreeze) every parameter outside the classifier."""
    head = set(id(p) for p in head_parameters(model))
    for p in model.parameters():
        p.requires_grad_(not frozen or id(p) in head)


def set_train_mode(model: nn.Module, *, backbone_frozen: bool) -> None:
    """`model.train()`, except that a frozen backbone stays in eval mode (BN statistics and dropout fixed)."""
    model.train()
    if backbone_frozen:
        model.eval()
        model.get_classifier().train()


def load_model(url: str, *, verify: bool = True) -> tuple[nn.Module, LoadedCheckpoint]:
    """A (fine-tuned or pretrained) checkpoint as an eval-mode model with its own head."""
    ckpt = load_checkpoint(url, verify=verify)
    model = create_model_from_checkpoint(ckpt)
    model.eval()
    return model, ckpt
