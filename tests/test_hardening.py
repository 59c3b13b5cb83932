"""Hostile and careless input, caught before any work: non-finite numbers, typos in options, names
with a trailing newline, a registry lock that never frees."""

from __future__ import annotations

import json
import time

import pytest

from cluster.cli import main
from data_pipeline.config import ConfigError, load_config
from pretrain.config import PretrainConfig


@pytest.mark.parametrize("value", ["inf", ".inf", "-inf", "nan", ".nan", "1e400"])
def test_non_finite_numbers_are_refused(value):
    for key in ("optim.lr", "train.epochs", "loss.mixup"):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ": expected a finite number"):
            load_config(PretrainConfig, None, ["data.url=/d", "checkpoint.url=/r", f"{key}={value}"])


def test_huge_integer_is_a_config_error_not_a_crash():
    with pytest.raises(ConfigError, match=r"train\.max_steps: expected an integer"):
        load_config(PretrainConfig, None, ["data.url=/d", "checkpoint.url=/r", "train.max_steps='1e400'"])


def test_arch_typo_exits_2_before_ray(tmp_path, capsys, monkeypatch):
    import cluster.runtime
    monkeypatch.setattr(cluster.runtime, "ray_session", lambda *a, **k: pytest.fail("Ray was started"))
    code = main(["pretrain", "--set", f"data.url={tmp_path}/none", "--set", f"checkpoint.url={tmp_path}/run",
                 "--set", "model.arch=resnet50dd"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "model.arch: 'resnet50dd'" in err[0]


def test_finetune_optimizer_typo_exits_2_before_ray(tmp_path, capsys):
    code = main(["finetune", "--checkpoint", str(tmp_path / "ckpt"), "--train", str(tmp_path / "data"),
                 "--out", str(tmp_path / "run"), "--set", "optim.name=adamww"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "optim.name: 'adamww'" in err[0]


@pytest.mark.parametrize("bad", ["model\n", "model\nx", "../x", ".hidden"])
def test_registry_names_must_match_whole(bad):
    from cluster.registry import RegistryError, parse_ref, validate_name
    with pytest.raises(RegistryError):
        validate_name(bad, "name")
    with pytest.raises(RegistryError):
        parse_ref(f"registry://ok@{bad}")


def test_run_name_with_trailing_newline_is_refused():
    from cluster.jobs import validate_run_name
    with pytest.raises(ConfigError, match="--name"):
        validate_run_name("run\n")


def test_lock_timeout_is_a_registry_error(tmp_path):
    from fsspec.implementations.local import LocalFileSystem

    from cluster.registry import RegistryError
    from cluster.storage import FileLock
    lock = tmp_path / "aliases.json.lock"
    lock.write_text(json.dumps({"created": time.time()}))  # held by a live writer
    with pytest.raises(RegistryError, match="lock held"):
        with FileLock(LocalFileSystem(), str(lock), timeout_s=0.2, stale_s=60):
            pass


def test_finetune_phase_plan_is_checked_before_ray(tmp_path, capsys, monkeypatch):
    import timm

    import cluster.runtime
    from pretrain.checkpoint import save_checkpoint
    from tests.dataset_factory import make_dataset
    monkeypatch.setattr(cluster.runtime, "ray_session", lambda *a, **k: pytest.fail("Ray was started"))
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    source = save_checkpoint(str(tmp_path / "src"), state_dict=model.state_dict(), arch="test_resnet", num_classes=3,
                             class_names=["a", "b", "c"], megaclass={"step": 1},
                             pretrained_cfg={"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3})
    data = make_dataset(tmp_path / "ds", {"train": [8], "val": [4]}, num_classes=3)
    capsys.readouterr()
    code = main(["finetune", "--checkpoint", source, "--train", data, "--out", str(tmp_path / "run"),
                 "--mode", "lp-ft", "--set", "train.global_batch_size=4", "--set", "train.max_steps=6",
                 "--set", "finetune.lp_steps=50"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "finetune.lp_steps" in err[0]


@pytest.mark.parametrize("argv", [["plan", "--per-gpu-images-per-s", "nan"], ["ingest", "a", "b", "--timeout-s", "1e400"],
                                  ["predict", "m", "x.jpg", "--min-score", "inf"]])
def test_numeric_flags_refuse_non_finite_values(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and "is not a finite number" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["pretrain", "--data", "/nowhere", "--out", "/nowhere/run"],
                                     ["finetune", "--checkpoint", "/nowhere/ckpt", "--train", "/nowhere", "--out", "/r"],
                                     ["finetune", "--task", "detection", "--checkpoint", "/nowhere/ckpt", "--train",
                                      "/nowhere/coco.json", "--out", "/r"]])
def test_gpus_this_machine_lacks_are_refused_before_ray(command, capsys, monkeypatch):
    import torch

    import cluster.runtime
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(cluster.runtime, "ray_session", lambda *a, **k: pytest.fail("Ray was started"))
    code = main(command + ["--set", "scaling.use_gpu=true", "--set", "scaling.num_workers=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "scaling.use_gpu: 2 worker(s)" in err[0] and "has 1" in err[0]
