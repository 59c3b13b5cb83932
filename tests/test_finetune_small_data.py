"""Fine-tuning on tiny data: a batch larger than the data, loader workers that live across epochs
with exact resume, the validation cadence, --scratch, and every augmentation option reaching the
train transform, the checkpoint and the exported preprocessing."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from PIL import Image

from data_pipeline.config import ConfigError, load_config
from data_pipeline.transforms import create_random_erasing
from finetune.config import FinetuneConfig
from finetune.evaluate import checkpoint_eval_transform
from finetune.model import backbone_mismatches, create_finetune_model
from finetune.plan import eval_cadence, fit_batch_to_data, loader_workers, resolve_optim
from pretrain.checkpoint import load_checkpoint
from tests.dataset_factory import make_dataset
from tests.test_finetune import make_checkpoint, make_config


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    return make_checkpoint(tmp_path_factory.mktemp("src") / "ckpt", num_classes=5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    """3 classes x 2 images = 6 training images, 6 for validation."""
    return make_dataset(tmp_path_factory.mktemp("tiny") / "data", {"train": [6], "val": [6]}, num_classes=3,
                        image_size=32)


def _cfg(*overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, None, list(overrides))


# -- the plan -------------------------------------------------------------------------------------

def test_batch_larger_than_data_becomes_the_data():
    cfg, notice = fit_batch_to_data(_cfg("train.global_batch_size=64"), 15, world_size=1)
    assert cfg.train.global_batch_size == 15 and "64" in notice and "15" in notice and "\n" not in notice
    cfg, _ = fit_batch_to_data(_cfg("train.global_batch_size=64"), 15, world_size=2)
    assert cfg.train.global_batch_size == 14  # divisible by the ranks
    cfg, _ = fit_batch_to_data(_cfg("train.global_batch_size=64", "loss.mixup=0.2"), 15, world_size=2)
    assert cfg.train.global_batch_size == 12  # even per rank for mixup
    same, notice = fit_batch_to_data(_cfg("train.global_batch_size=8"), 15, world_size=1)
    assert same.train.global_batch_size == 8 and notice == ""


def test_validation_cadence_is_bounded():
    # 150 steps of 15 images, 880 validation images: validation limited to ~1/4 of the training compute
    every = eval_cadence(_cfg("train.global_batch_size=15"), phase_steps=150, num_val_samples=880)
    assert every == 79 and 880 * (150 // every) <= 0.25 * 3 * 150 * 15
    assert eval_cadence(_cfg("train.global_batch_size=64"), phase_steps=1000, num_val_samples=100) == 100  # max_evals
    assert eval_cadence(_cfg("train.eval_every_steps=7"), phase_steps=1000, num_val_samples=10**6) == 7


def test_small_data_defaults_and_loader_workers():
    small = resolve_optim(_cfg("train.max_steps=100"), 15)
    assert small.optim.layer_decay == 1.0 and small.optim.warmup_steps == 5
    large = resolve_optim(_cfg("train.max_steps=1000"), 50_000)
    assert large.optim.layer_decay == 0.75 and large.optim.warmup_steps == 20
    assert resolve_optim(_cfg("optim.layer_decay=0.9", "optim.warmup_steps=3"), 15).optim.layer_decay == 0.9
    # each worker's share must fill a batch, or a batch repeats images
    assert loader_workers(_cfg("data.num_workers=4", "train.global_batch_size=15"), 15, 1) == 1
    assert loader_workers(_cfg("data.num_workers=4", "train.global_batch_size=16"), 1000, 1) == 4


def test_tiny_run_with_the_default_batch(tmp_path, source, tiny, caplog):
    from finetune.train import check_inputs, finetune

    cfg = make_config(source, tiny, tmp_path / "run", "train.global_batch_size=64", "train.max_steps=2",
                      "train.num_threads=1")
    with caplog.at_level(logging.WARNING, logger="finetune.train"):
        fitted, _ = check_inputs(cfg)
    assert fitted.train.global_batch_size == 6
    notices = [r for r in caplog.records if "global_batch_size" in r.getMessage()]
    assert len(notices) == 1
    summary = finetune(cfg)  # the launcher's path and the in-process path agree
    final = load_checkpoint(summary["final_url"])
    assert summary["steps"] == 2 and final.megaclass["config"]["train"]["global_batch_size"] == 6


# -- persistent loader workers and exact resume ---------------------------------------------------------

def test_one_loader_per_phase_and_exact_resume(tmp_path, source, monkeypatch):
    import finetune.train as train_module

    data = make_dataset(tmp_path / "data", {"train": [12, 12], "val": [6]}, num_classes=3, image_size=32)
    overrides = ("train.global_batch_size=8", "train.max_steps=6", "data.num_workers=2", "train.eval_every_steps=3",
                 "checkpoint.every_steps=2", "checkpoint.keep=1", "train.num_threads=1")
    train_loaders = []
    real = train_module.create_loader

    def counting(*args, **kwargs):
        if kwargs.get("drop_last", True):
            train_loaders.append(kwargs["num_epochs"])
        return real(*args, **kwargs)
    monkeypatch.setattr(train_module, "create_loader", counting)
    whole = train_module.finetune(make_config(source, data, tmp_path / "whole", *overrides))
    assert train_loaders == [2]  # 3 steps per epoch: both epochs from one loader (one set of workers)

    def crash(metrics):
        if metrics["step"] == 3:
            raise RuntimeError("worker lost")
    with pytest.raises(RuntimeError, match="worker lost"):
        train_module.finetune(make_config(source, data, tmp_path / "resumed", *overrides), report=crash)
    resumed = train_module.finetune(make_config(source, data, tmp_path / "resumed", *overrides))
    assert train_loaders[-1] == 2  # resumed at step 2, mid-epoch 0: skips 2 batches, then epochs 0 and 1
    assert resumed["steps"] == whole["steps"] == 6
    a = load_checkpoint(str(tmp_path / "whole" / "step-00000006"))
    b = load_checkpoint(str(tmp_path / "resumed" / "step-00000006"))
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)  # bit-identical


# -- --scratch --------------------------------------------------------------------------------------------

def test_scratch_is_a_random_init_of_the_same_architecture(source):
    ckpt = load_checkpoint(source)
    scratch = create_finetune_model(ckpt, 3, seed=1, scratch=True)
    again = create_finetune_model(ckpt, 3, seed=1, scratch=True)
    assert type(scratch) is type(create_finetune_model(ckpt, 3))
    assert len(backbone_mismatches(scratch, ckpt)) > 10  # no pretrained weight survived
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in scratch.state_dict().items())


# -- augmentation options ---------------------------------------------------------------------------

def _image() -> Image.Image:
    rng = random.Random(0)
    img = Image.new("RGB", (48, 40))
    img.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(48 * 40)])
    return img


def _apply(*overrides: str, seed: int = 5) -> torch.Tensor:
    return _cfg(*overrides).data.train_transform(32)(_image(), rng=random.Random(seed))


def test_each_train_augmentation_option_reaches_the_transform():
    base = ("data.hflip=0", "data.scale=1,1", "data.ratio=1.2,1.2")  # deterministic crop, no flip
    plain = _apply(*base)
    assert torch.equal(_apply(*base, "data.hflip=1"), plain.flip(-1))
    assert torch.equal(_apply(*base, "data.vflip=1"), plain.flip(-2))
    assert not torch.equal(_apply("data.hflip=0", "data.scale=0.1,0.1", "data.ratio=1.2,1.2"), plain)  # scale
    assert not torch.equal(_apply("data.hflip=0", "data.scale=1,1", "data.ratio=0.8,0.8"), plain)      # ratio
    assert not torch.equal(_apply(*base, "data.interpolation=nearest"), plain)
    jitter = _apply(*base, "data.color_jitter=0.4")
    assert not torch.equal(jitter, plain) and torch.equal(jitter, _apply(*base, "data.color_jitter=0.4"))  # seeded
    for policy in ("rand-m9-mstd0.5-inc1", "trivialaugment"):
        outs = {tuple(_apply(*base, f"data.auto_augment={policy}", seed=s).flatten().tolist()) for s in range(6)}
        assert len(outs) > 1  # the policy acts, differently per draw
    batch = torch.zeros(8, 3, 32, 32)
    random.seed(0)
    assert create_random_erasing(_cfg("data.re_prob=0").data.re_prob) is None
    erased = create_random_erasing(_cfg("data.re_prob=1").data.re_prob)(batch.clone())
    assert (erased != 0).flatten(1).any(dim=1).all()  # every image got a patch
    wide = _cfg("data.crop_pct=1.0").data.eval_transform(32)(_image())
    assert not torch.equal(wide, _cfg("data.crop_pct=0.5").data.eval_transform(32)(_image()))


@pytest.mark.parametrize("bad", ["data.hflip=1.5", "data.scale=0.5,0.2", "data.ratio=0,1", "data.interpolation=cubic",
                                 "data.auto_augment=sharpen-all", "data.crop_pct=0", "data.re_prob=-0.1"])
def test_bad_augmentation_values_name_the_field(bad):
    with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
        _cfg(bad)


def test_checkpoint_records_the_evaluation_preprocessing(tmp_path, source, tiny):
    from finetune.train import finetune

    summary = finetune(make_config(source, tiny, tmp_path / "run", "train.max_steps=1", "data.crop_pct=0.5",
                                   "data.interpolation=bicubic", "data.hflip=0", "data.auto_augment=trivialaugment"))
    final = load_checkpoint(summary["final_url"])
    assert final.pretrained_cfg["crop_pct"] == 0.5 and final.pretrained_cfg["interpolation"] == "bicubic"
    assert final.megaclass["augmentation"]["hflip"] == 0 and final.megaclass["augmentation"]["auto_augment"] == "trivialaugment"
    transform = checkpoint_eval_transform(final.pretrained_cfg)
    assert transform.crop_pct == 0.5 and transform.interpolation == "bicubic" and transform.image_size == 32


def test_scratch_flag_sets_the_config():
    import argparse

    from cluster.commands.finetune import add_arguments, build_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert build_config(parser.parse_args(["--scratch"])).finetune.scratch is True
    assert build_config(parser.parse_args(["--set", "finetune.scratch=true"])).finetune.scratch is True
    assert build_config(parser.parse_args([])).finetune.scratch is False
