"""Contract 2: a checkpoint timm loads as it is; loading refuses anything not exactly as written."""

from __future__ import annotations

import os

import pytest
import timm
import torch

from pretrain.checkpoint import (SUMS_FILE, CheckpointError, begin_checkpoint, checkpoint_files,
                                 create_model_from_checkpoint, latest_checkpoint, list_checkpoints,
                                 load_checkpoint, prune_checkpoints, save_checkpoint, step_dir_name,
                                 verify_checkpoint)
from pretrain.models import create_backbone

PRETRAINED_CFG = {"input_size": (3, 32, 32), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                  "interpolation": "bilinear", "crop_pct": 0.875}


def _save(url, model, arch="test_resnet", model_args=None, train_state=None):
    return save_checkpoint(str(url), state_dict=model.state_dict(), arch=arch, num_classes=5,
                           class_names=[f"c{i}" for i in range(5)], pretrained_cfg=PRETRAINED_CFG,
                           megaclass={"step": 7}, model_args=model_args, write_train_state=train_state)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=5).eval()
    return _save(tmp_path / "ckpt", model), model


def test_timm_local_dir_loads_identical_logits(saved):
    url, model = saved
    x = torch.randn(2, 3, 32, 32)
    loaded = timm.create_model(f"local-dir:{url}", pretrained=True).eval()
    assert torch.equal(loaded(x), model(x))
    ckpt = load_checkpoint(url)
    assert ckpt.class_names == [f"c{i}" for i in range(5)] and ckpt.megaclass == {"format_version": 1, "step": 7}
    assert ckpt.config["label_names"] == ckpt.class_names and ckpt.pretrained_cfg["input_size"] == [3, 32, 32]
    assert torch.equal(create_model_from_checkpoint(ckpt).eval()(x), model(x))
    assert not any(n.startswith(".staging") for n in os.listdir(os.path.dirname(url)))


def test_preset_with_model_args_loads_in_plain_timm(tmp_path):
    backbone, preset = create_backbone("EfficientNetB0_small")
    full = timm.create_model(preset.arch, num_classes=5, **preset.model_args).eval()
    url = _save(tmp_path / "eff", full, arch=preset.arch, model_args=preset.model_args)
    loaded = timm.create_model(f"local-dir:{url}", pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(loaded(x), full(x))
    assert isinstance(loaded.bn1.act, torch.nn.SiLU)


def test_new_num_classes_keeps_backbone(saved):
    url, model = saved
    fresh = create_model_from_checkpoint(load_checkpoint(url), num_classes=3)
    assert fresh.fc.out_features == 3
    assert torch.equal(fresh.conv1[0].weight, model.conv1[0].weight)


@pytest.mark.parametrize("damage, message", [
    ("truncate", "model.safetensors: sha256 mismatch"),
    ("alter", "config.json: sha256 mismatch"),
    ("foreign", "extra.bin: foreign file"),
    ("missing", "classes.parquet: missing"),
    ("no_sums", "SHA256SUMS: missing"),
])
def test_damaged_checkpoint_is_refused_naming_the_file(saved, damage, message):
    url, _ = saved
    if damage == "truncate":
        path = os.path.join(url, "model.safetensors")
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif damage == "alter":
        with open(os.path.join(url, "config.json"), "a") as f:
            f.write(" ")
    elif damage == "foreign":
        open(os.path.join(url, "extra.bin"), "wb").write(b"\0")
    elif damage == "missing":
        os.remove(os.path.join(url, "classes.parquet"))
    else:
        os.remove(os.path.join(url, SUMS_FILE))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(url)


def test_foreign_config_and_unknown_arch_are_refused(tmp_path, saved):
    url, _ = saved
    import hashlib
    import json
    cfg_path = os.path.join(url, "config.json")
    config = json.load(open(cfg_path))
    for mutate, message in ((lambda c: c.pop("megaclass"), "foreign config"),
                            (lambda c: c.update(architecture="no_such_net"), "unknown architecture")):
        mutated = json.loads(json.dumps(config))
        mutate(mutated)
        data = json.dumps(mutated).encode()
        open(cfg_path, "wb").write(data)
        sums = open(os.path.join(url, SUMS_FILE)).read().splitlines()
        sums = [f"{hashlib.sha256(data).hexdigest()}  config.json" if line.endswith("config.json") else line for line in sums]
        open(os.path.join(url, SUMS_FILE), "w").write("\n".join(sums) + "\n")
        with pytest.raises(CheckpointError, match=message):
            verify_checkpoint(url)


def test_run_dir_listing_pruning_and_incomplete_dirs(tmp_path):
    model = timm.create_model("test_resnet", pretrained=False, num_classes=5)
    run = tmp_path / "run"
    for step in (5, 10, 15):
        _save(run / step_dir_name(step), model, train_state=lambda d: os.makedirs(d) or open(f"{d}/x", "wb").write(b"1"))
    begin_checkpoint(str(run / step_dir_name(20)))  # a crash mid-write leaves only the staging dir
    os.makedirs(run / step_dir_name(25))              # or, on an object store, a dir without SHA256SUMS
    assert [os.path.basename(u) for u in list_checkpoints(str(run))] == ["step-00000005", "step-00000010", "step-00000015"]
    assert "train_state/x" in checkpoint_files(latest_checkpoint(str(run)))
    assert [os.path.basename(u) for u in prune_checkpoints(str(run), keep=2)] == ["step-00000005"]
    assert latest_checkpoint(str(run)).endswith("step-00000015") and not (run / "step-00000005").exists()


def test_resave_same_step_replaces_atomically(saved):
    url, model = saved
    with torch.no_grad():
        model.fc.bias.add_(1.0)
    _save(url, model)
    assert torch.equal(load_checkpoint(url).state_dict["fc.bias"], model.fc.bias)


def test_object_store_rewrite_never_leaves_no_valid_checkpoint(monkeypatch):
    """Rewriting memory://.../final (an object store: no rename): at every copy of the commit, and after
    a crash in the middle of it, the URL still loads a complete checkpoint, old or new."""
    import fsspec
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=5).eval()
    url = f"memory://rewrite-{os.getpid()}/run/final"
    _save(url, model, train_state=lambda d: open(f"{d}/x", "wb").write(b"1"))
    old_bias = model.fc.bias.detach().clone()
    with torch.no_grad():
        model.fc.bias.add_(1.0)
    fs = fsspec.filesystem("memory")
    real_copy, seen, crash_after = fs.copy, [], [None]

    def copy_checking(src, dst, **kwargs):
        bias = load_checkpoint(url).state_dict["fc.bias"]  # raises if no valid checkpoint is readable
        seen.append(torch.equal(bias, old_bias))
        if crash_after[0] is not None and len(seen) > crash_after[0]:
            raise OSError("connection lost mid-commit")
        return real_copy(src, dst, **kwargs)

    monkeypatch.setattr(type(fs), "copy", lambda self, src, dst, **kw: copy_checking(src, dst, **kw))
    _save(url, model)
    assert len(seen) >= 4 and not any(seen)  # during the commit, readers got the complete new one (staged)
    assert torch.equal(load_checkpoint(url).state_dict["fc.bias"], model.fc.bias)
    assert not fs.exists(url.replace("/final", "/.staging-final"))

    # A crash in the middle of a replacement: the staged checkpoint is what loads, and the next
    # begin_checkpoint of the URL finishes the commit before anything else.
    with torch.no_grad():
        model.fc.bias.add_(1.0)
    seen.clear()
    crash_after[0] = 2
    with pytest.raises(OSError, match="mid-commit"):
        _save(url, model)
    assert not fs.exists(url[len("memory://"):] + "/" + SUMS_FILE)
    assert torch.equal(load_checkpoint(url).state_dict["fc.bias"], model.fc.bias)
    crash_after[0] = None
    begin_checkpoint(url)
    assert torch.equal(load_checkpoint(url).state_dict["fc.bias"], model.fc.bias)
    assert fs.exists(url[len("memory://"):] + "/" + SUMS_FILE)
