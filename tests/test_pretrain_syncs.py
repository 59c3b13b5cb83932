"""A training step reads nothing back from its tensors: on a GPU each such read (`.item()`, `float()`,
`bool()`, ...) is a host sync that stalls the device queue. On CPU the reads are counted instead, for
the calls made from megaclass's own code during one optimizer step with clipping, mixup, EMA and
gradient accumulation."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from pretrain.config import load_pretrain_config
from pretrain.dist import DistInfo
from pretrain.run import build_run
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
