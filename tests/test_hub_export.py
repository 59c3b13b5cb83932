"""`megaclass registry export --hf DIR`: a Hub model folder that plain timm loads, with its lineage."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import timm
import torch

from cluster.cli import main
from cluster.registry import Registry
from pretrain.checkpoint import save_checkpoint

PRETRAINED_CFG = {"input_size": (3, 32, 32), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                  "interpolation": "bilinear", "crop_pct": 0.875}
LABELS = ["cat", "dog", "a `fenced` | label", "owl"]


@pytest.fixture
def published(tmp_path, monkeypatch):
    """A tiny timm model published as registry://tiny/1 with alias production; returns (registry, model)."""
    monkeypatch.setenv("MEGACLASS_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=len(LABELS)).eval()
    megaclass = {"step": 40, "epoch": 2, "dataset_manifest_sha256": "ab" * 32, "run": "r-web-7",
                 "config": {"model": {"arch": "test_resnet"}, "train": {"max_steps": 40}},
                 "metrics": {"val_top1": 0.625, "val_loss": 1.25}}
    ckpt = save_checkpoint(str(tmp_path / "run" / "final"), state_dict=model.state_dict(), arch="test_resnet",
                           num_classes=len(LABELS), class_names=LABELS, pretrained_cfg=PRETRAINED_CFG,
                           megaclass=megaclass)
    registry = str(tmp_path / "registry")
    assert Registry(registry).publish(ckpt, "tiny", alias="production") == 1
    return registry, model


def test_export_loads_in_timm_and_carries_lineage(published, tmp_path, capsys):
    registry, model = published
    out = tmp_path / "hub" / "tiny"
    assert main(["registry", "export", "registry://tiny@production", "--hf", str(out), "--registry", registry]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "SHA256SUMS", "classes.parquet", "config.json",
                                                     "model.safetensors"]
    x = torch.randn(2, 3, 32, 32)
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert torch.equal(loaded(x), model(x))
    assert loaded.pretrained_cfg["label_names"] == LABELS

    info = Registry(registry).show("tiny", 1)
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\n")
    for expected in ("registry://tiny/1", "production", "r-web-7", "ab" * 32, "| val_top1 | 0.625 |",
                     "max_steps: 40", info["files"]["model.safetensors"]["sha256"], info["created"]):
        assert expected in card, expected
    assert "a 'fenced' | label" in card and "`fenced`" not in card  # a label cannot close the code block
    sums = dict(reversed(line.split("  ")) for line in (out / "SHA256SUMS").read_text().splitlines())
    assert sums == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir() if p.name != "SHA256SUMS"}
    assert sums["model.safetensors"] == info["files"]["model.safetensors"]["sha256"]  # the published bytes
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_export_refuses_before_any_work(published, tmp_path, capsys, monkeypatch):
    registry, _ = published
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert main(["registry", "export", "registry://tiny@production", "--hf", str(taken), "--registry", registry]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--hf" in err[0] and "not an empty folder" in err[0]
    assert sorted(p.name for p in taken.iterdir()) == ["keep.txt"]

    assert main(["registry", "export", "registry://tiny@staging", "--hf", str(tmp_path / "a"), "--registry", registry]) == 1
    assert "staging" in capsys.readouterr().err and not (tmp_path / "a").exists()

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    assert main(["registry", "export", "registry://tiny/1", "--hf", str(tmp_path / "b"), "--registry", registry,
                 "--push", "someone/tiny"]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_push_uploads_the_exported_folder(published, tmp_path, monkeypatch, capsys):
    """The upload itself needs the Hub; here HfApi is replaced by a recorder of its calls."""
    import huggingface_hub

    registry, _ = published
    calls = []

    class RecordingApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, folder_path, repo_id, **kwargs):
            calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
            return type("Commit", (), {"commit_url": f"https://hub.invalid/{repo_id}/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    out = tmp_path / "pushed"
    assert main(["registry", "export", "registry://tiny/1", "--hf", str(out), "--registry", registry,
                 "--push", "someone/tiny", "--private", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["pushed"] == "https://hub.invalid/someone/tiny/commit/1"
    assert calls[0] == ("create_repo", "someone/tiny", {"repo_type": "model", "private": True, "exist_ok": True})
    assert calls[1] == ("upload_folder", "someone/tiny", sorted(p.name for p in out.iterdir()))
    assert 'timm.create_model("hf-hub:someone/tiny", pretrained=True)' in (out / "README.md").read_text()
