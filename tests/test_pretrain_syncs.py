"""The GPU path, checked on CPU. A training step reads nothing back from its tensors: on a GPU each such
read (`.item()`, `float()`, `bool()`, ...) is a host sync that stalls the device queue, so the reads made
from megaclass's own code are counted during one optimizer step with clipping, mixup, EMA and gradient
accumulation. And train.deterministic on a CUDA device sets what CUDA needs instead of raising."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from pretrain.config import load_pretrain_config
from pretrain.dist import DistInfo
from pretrain.run import _set_determinism, build_run
from pretrain.train import train_step
from tests.dataset_factory import make_dataset

PRETRAIN = str(Path(__file__).resolve().parents[1] / "pretrain")
READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


def test_train_step_reads_no_tensor_back(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "ds", [24], num_classes=5, image_size=32)
    cfg = load_pretrain_config(None, [f"{k}={v}" for k, v in {
        "data.url": data, "checkpoint.url": tmp_path / "run", "model.arch": "test_resnet", "data.image_size": 32,
        "data.num_workers": 0, "train.global_batch_size": 8, "train.grad_accum_steps": 2, "train.channels_last": True,
        "train.grad_clip_norm": 0.5, "train.ema": True, "loss.mixup": 0.5, "loss.cutmix": 0.5, "loss.mix_prob": 0.5,
        "optim.name": "sgd", "train.num_threads": 1}.items()])
    run = build_run(cfg, DistInfo())
    batches = iter(run.loader(0))
    micro = [next(batches), next(batches)]
    reads: list[str] = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name):
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(PRETRAIN):
                reads.append(f"{_name} in {caller.co_name} ({Path(caller.co_filename).name})")
            return _original(self, *args)
        monkeypatch.setattr(torch.Tensor, name, counted)
    loss = train_step(run, micro)
    monkeypatch.undo()
    assert reads == []
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and torch.isfinite(loss)
    assert run.progress.step == 1


def test_deterministic_on_cuda_sets_cublas_workspace_and_warns_instead_of_raising(monkeypatch):
    cuda = DistInfo(device=torch.device("cuda", 0))  # only the settings are made: no CUDA call happens
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    benchmark = torch.backends.cudnn.benchmark
    try:
        _set_determinism(load_pretrain_config(None, ["data.url=x", "checkpoint.url=y", "train.deterministic=true"]), cuda)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert not torch.backends.cudnn.benchmark
        _set_determinism(load_pretrain_config(None, ["data.url=x", "checkpoint.url=y"]), cuda)
        assert torch.backends.cudnn.benchmark  # fixed shapes: cuDNN picks its fastest kernels once
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = benchmark
