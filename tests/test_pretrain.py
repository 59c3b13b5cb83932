"""Pretraining end to end on CPU with a tiny timm model at 32 px: exact resume, SIGTERM, torchrun with
2 ranks on 5 unequal shards, resume on another world size, and 2 Ray Train workers surviving a SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from data_pipeline import ALLOCATOR_ENV
from pretrain.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint
from pretrain.config import load_pretrain_config
from pretrain.rundir import read_metrics
from tests.conftest import free_port
from pretrain.train import train
from tests.dataset_factory import make_dataset

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, **ALLOCATOR_ENV, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain") / "ds"
    return make_dataset(root, {"train": [37, 21, 50, 9, 43], "val": [16]}, num_classes=6, image_size=32)


def overrides(dataset, run, **extra):
    base = {"data.url": dataset, "checkpoint.url": str(run), "model.arch": "test_resnet", "data.image_size": 32,
            "data.num_workers": 0, "data.shuffle_buffer": 32, "train.global_batch_size": 8, "train.channels_last": False,
            "optim.name": "adamw", "optim.lr": 0.01, "optim.warmup_steps": 2, "log.every_steps": 2,
            "log.eval_batches": 1, "log.eval_batch_size": 8, "train.num_threads": 1, "scaling.num_workers": 1}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def keys(run, rank=0):
    return Path(run, f"keys-rank-{rank}.txt").read_text().splitlines()


def test_exact_resume_after_sigterm(dataset, tmp_path):
    common = dict(**{"train.max_steps": 6, "checkpoint.every_steps": 3, "train.deterministic": True,
                     "log.sample_keys": True, "loss.mixup": 0.5, "loss.cutmix": 0.5, "loss.label_smoothing": 0.1,
                     "train.grad_clip_norm": 1.0, "model.drop_path_rate": 0.1, "train.grad_accum_steps": 2})
    straight = tmp_path / "straight"
    train(load_pretrain_config(None, overrides(dataset, straight, **common)))

    interrupted = tmp_path / "interrupted"
    cfg = load_pretrain_config(None, overrides(dataset, interrupted, **common))
    # Preemption arrives right after the step-3 checkpoint: step 4 finishes, is checkpointed, and train returns.
    first = train(cfg, report=lambda m: m["step"] == 3 and os.kill(os.getpid(), signal.SIGTERM))
    assert first["preempted"] and first["step"] == 4
    assert latest_checkpoint(str(interrupted)).endswith("step-00000004")
    second = train(cfg)
    assert not second["preempted"] and second["step"] == 6

    assert keys(interrupted) == keys(straight) and len(keys(straight)) == 6 * 2
    a, b = (load_file(f"{run}/final/model.safetensors") for run in (straight, interrupted))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = read_metrics(str(interrupted))
    assert [r["step"] for r in records if "event" not in r] == [2, 4, 6]
    assert [(r["step"], r["checkpoint"].rsplit("/", 1)[-1]) for r in records if r.get("event") == "resume"] \
        == [(4, "step-00000004")]
    assert (interrupted / "curves.png").stat().st_size > 0 and any((interrupted / "tensorboard").iterdir())


def test_corrupted_latest_checkpoint_is_refused(dataset, tmp_path):
    run = tmp_path / "run"
    cfg = load_pretrain_config(None, overrides(dataset, run, **{"train.max_steps": 2, "checkpoint.every_steps": 2}))
    train(cfg)
    latest = latest_checkpoint(str(run))
    shard = next(Path(latest, "train_state").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="distcp: sha256 mismatch"):
        train(load_pretrain_config(None, overrides(dataset, run, **{"train.max_steps": 4})))


def _torchrun(args, nproc):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
           "-m", "pretrain.train", *sum((["--set", a] for a in args), [])]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=500)


@pytest.mark.slow
def test_torchrun_two_ranks_unequal_shards_then_resume_on_one(dataset, tmp_path):
    run = tmp_path / "run"
    # 160 samples / (2 ranks x 4) = 20 batches per rank; 5 unequal shards over 2 ranks x 2 loader workers.
    args = overrides(dataset, run, **{"scaling.num_workers": 2, "data.num_workers": 2, "train.epochs": 1,
                                      "log.sample_keys": True, "checkpoint.every_steps": 10})
    done = _torchrun(args, nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    steps_0, steps_1 = keys(run, 0), keys(run, 1)
    assert len(steps_0) == len(steps_1) == 20
    seen_0, seen_1 = ({k for line in lines for k in line.split("\t")[1].split()} for lines in (steps_0, steps_1))
    # Ranks read disjoint shards; the reader cycles a short slot's data to keep counts equal, so a few repeat.
    assert not seen_0 & seen_1 and len(seen_0 | seen_1) >= 140
    two_rank = load_checkpoint(latest_checkpoint(str(run)))
    assert two_rank.megaclass["world_size"] == 2 and two_rank.megaclass["step"] == 20

    # Same run dir, one rank: the head saved in two shards is resharded into one and training goes on.
    result = train(load_pretrain_config(None, overrides(dataset, run, **{"train.max_steps": 24,
                                                                       "checkpoint.every_steps": 100})))
    assert result["step"] == 24
    final = load_checkpoint(f"{run}/final")
    assert final.megaclass["world_size"] == 1 and final.megaclass["step"] == 24
    records = read_metrics(str(run))
    assert [r["step"] for r in records][:10] == list(range(2, 21, 2))  # two-rank part kept, then continued
    model = timm.create_model(f"local-dir:{run}/final", pretrained=True).eval()
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 6)


def test_bf16_channels_last_ema_and_sampled_head(dataset, tmp_path):
    run = tmp_path / "run"
    result = train(load_pretrain_config(None, overrides(dataset, run, **{
        "train.max_steps": 3, "train.precision": "bf16", "train.channels_last": True, "train.ema": True,
        "train.ema_decay": 0.5, "model.head_sample_ratio": 0.5, "optim.name": "sgd", "optim.lr": 0.1,
        "checkpoint.every_steps": 0})))
    logged = [r for r in read_metrics(str(run)) if "eval_top1" in r][-1]
    assert result["step"] == logged["step"] == 3 and result["eval_top1"] == logged["eval_top1"]
    assert result["eval_samples"] > 0 and (result["eval_top1"] * result["eval_samples"]).is_integer()  # a count
    published = load_checkpoint(f"{run}/final")
    assert published.megaclass["config"]["train"]["precision"] == "bf16"
    assert all(v.dtype == torch.float32 for k, v in published.state_dict.items() if v.is_floating_point())
    # The EMA backbone is published, the raw one is kept in train_state for resuming.
    raw = load_checkpoint(latest_checkpoint(str(run)))
    assert raw.state_dict.keys() == published.state_dict.keys()
    # The raw and the EMA backbone from train_state: decay 0.5 over 3 steps keeps them apart.
    from timm.optim import create_optimizer_v2
    from timm.utils import ModelEmaV3

    from pretrain.dist import DistInfo
    from pretrain.head import ShardedClassifierHead
    from pretrain.train_state import load_train_state
    backbone = timm.create_model("test_resnet", num_classes=0)
    head = ShardedClassifierHead(backbone.num_features, 6, DistInfo(), sample_ratio=0.5)
    ema = ModelEmaV3(backbone)
    optimizer = create_optimizer_v2(torch.nn.ModuleDict({"b": backbone, "h": head}), opt="sgd", lr=0.1, momentum=0.9)
    load_train_state(f"{latest_checkpoint(str(run))}/train_state", backbone=backbone, head=head, optimizer=optimizer,
                     ema=ema, dist=DistInfo())
    published_backbone = {k: v for k, v in published.state_dict.items() if not k.startswith("fc.")}
    assert all(torch.equal(v, published_backbone[k]) for k, v in ema.module.state_dict().items())
    assert any(not torch.equal(v, published_backbone[k]) for k, v in backbone.state_dict().items()
               if v.is_floating_point())
    assert [os.path.basename(u) for u in list_checkpoints(str(run))] == ["step-00000003"]


def test_cli_no_ray_trains_and_config_errors_exit_2(dataset, tmp_path, capsys):
    from cluster.cli import main
    run = tmp_path / "run"
    args = ["pretrain", "--no-ray", *sum((["--set", a] for a in overrides(dataset, run, **{"train.max_steps": 2})), [])]
    assert main(args) == 0
    assert "final checkpoint" in capsys.readouterr().out and (run / "final" / "SHA256SUMS").exists()
    assert main(["pretrain", "--set", f"data.url={dataset}", "--set", f"checkpoint.url={run}",
                 "--set", "train.precision=fp16"]) == 2
    assert "train.precision" in capsys.readouterr().err
    assert main(["pretrain", "--set", f"data.url={tmp_path}/nothing", "--set", f"checkpoint.url={run}"]) == 2
    assert "data.url" in capsys.readouterr().err
