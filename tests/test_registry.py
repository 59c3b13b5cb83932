"""The model registry (contract 3): versions, aliases, resolution, integrity, concurrency."""

from __future__ import annotations

import json
import multiprocessing
import os
import uuid
from pathlib import Path

import fsspec
import pytest
import torch
from safetensors.torch import load_file

from cluster.cli import main
from cluster.registry import AliasConflict, Registry, RegistryError, resolve_checkpoint_uri
from pretrain.checkpoint import load_checkpoint, save_checkpoint


def _write_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A contract-2 run checkpoint (with train_state/) written by pretrain.checkpoint."""
    def write_train_state(path: str) -> None:
        os.makedirs(path, exist_ok=True)
        Path(path, "optim.bin").write_bytes(os.urandom(64))

    gen = torch.Generator().manual_seed(seed)
    state = {"fc.weight": torch.randn(4, 512, generator=gen), "fc.bias": torch.zeros(4)}
    megaclass = {"step": 10 + seed, "epoch": 1, "dataset_manifest_sha256": "d" * 64,
                 "config": {"train": {"max_steps": 10}}, "metrics": {"top1": 0.5}}
    save_checkpoint(str(folder), state_dict=state, arch="resnet18", num_classes=4, class_names=list("abcd"),
                    pretrained_cfg={"input_size": [3, 32, 32]}, megaclass=megaclass,
                    write_train_state=write_train_state)
    return folder


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MEGACLASS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return _write_checkpoint(tmp_path / "run0" / "step-00000010")


@pytest.fixture
def memory_registry():
    root = f"memory://reg-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_publish_list_show_resolve_memory(ckpt, memory_registry, cache_dir):
    reg = Registry(memory_registry)
    assert reg.publish(str(ckpt), "tiny") == 1
    assert reg.publish(str(ckpt), "tiny", alias="production") == 2
    assert reg.list() == [{"name": "tiny", "versions": [1, 2], "latest": 2, "aliases": {"production": 2}}]
    info = reg.show("tiny", 1)
    assert info["run"] == "run0" and info["dataset_manifest_sha256"] == "d" * 64
    assert info["metrics"] == {"top1": 0.5} and info["config"] == {"train": {"max_steps": 10}}
    assert info["code_revision"] and info["created"]
    assert sorted(info["files"]) == ["SHA256SUMS", "classes.parquet", "config.json", "model.safetensors"]
    assert info["aliases"] == []

    path = Path(reg.resolve("registry://tiny@production"))
    assert path.is_relative_to(cache_dir) and not (path / "train_state").exists()
    # The published SHA256SUMS no longer lists train_state/, so the folder loads as a checkpoint.
    assert "train_state" not in (path / "SHA256SUMS").read_text()
    loaded = load_checkpoint(str(path))
    assert loaded.class_names == list("abcd") and loaded.megaclass["step"] == 10
    assert torch.equal(loaded.state_dict["fc.weight"], load_file(str(ckpt / "model.safetensors"))["fc.weight"])
    assert reg.resolve("registry://tiny/1") != str(path)
    assert reg.resolve("registry://tiny@latest") == str(path)
    assert reg.verify("tiny") == {1: [], 2: []}


def test_local_resolve_and_pass_through(ckpt, tmp_path, cache_dir):
    root = str(tmp_path / "reg")
    Registry(root).publish(str(ckpt), "tiny")
    path = resolve_checkpoint_uri("registry://tiny/1", registry_root=root)
    assert Path(path).is_relative_to(cache_dir) and path.endswith("tiny/000001")
    assert load_checkpoint(path).arch == "resnet18"
    assert resolve_checkpoint_uri("registry://tiny/1", registry_root=root) == path  # cached, re-verified
    assert resolve_checkpoint_uri(str(ckpt), registry_root=root) == str(ckpt)
    assert resolve_checkpoint_uri("s3://bucket/x") == "s3://bucket/x"


def test_tampered_file_refused(ckpt, tmp_path):
    reg = Registry(str(tmp_path / "reg"))
    reg.publish(str(ckpt), "tiny")
    weights = tmp_path / "reg" / "tiny" / "versions" / "000001" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="model.safetensors: sha256/size mismatch"):
        reg.resolve("registry://tiny/1")
    assert reg.verify("tiny", 1)[1][0].startswith("model.safetensors")
    assert main(["registry", "verify", "tiny/1", "--registry", str(tmp_path / "reg")]) == 1


def test_damaged_checkpoint_not_published(ckpt, tmp_path):
    (ckpt / "classes.parquet").write_bytes(b"not what SHA256SUMS says")
    (ckpt / "stray.txt").write_text("not listed, not copied")
    reg = Registry(str(tmp_path / "reg"))
    with pytest.raises(RegistryError, match="classes.parquet: sha256"):
        reg.publish(str(ckpt), "tiny")
    assert reg.versions("tiny") == []
    assert not list((tmp_path / "reg" / "tiny" / ".staging").iterdir())


def test_partial_version_invisible(ckpt, tmp_path):
    reg = Registry(str(tmp_path / "reg"))
    reg.publish(str(ckpt), "tiny")
    reg.publish(str(ckpt), "tiny")
    (tmp_path / "reg" / "tiny" / "versions" / "000002" / "version.json").unlink()
    assert reg.versions("tiny") == [1] and reg.latest("tiny") == 1
    assert reg.resolve("registry://tiny@latest").endswith("000001")
    with pytest.raises(RegistryError, match="no version.json: an incomplete publish"):
        reg.resolve("registry://tiny/2")
    assert reg.publish(str(ckpt), "tiny") == 3  # a claimed number is never reused


@pytest.mark.parametrize("name, field", [("../evil", "name"), ("a/b", "name"), ("..", "name"),
                                         ("", "name"), ("x" * 129, "name")])
def test_bad_names_refused(ckpt, tmp_path, name, field):
    reg = Registry(str(tmp_path / "reg"))
    with pytest.raises(RegistryError, match=f"^{field}: "):
        reg.publish(str(ckpt), name)
    assert not (tmp_path / "evil").exists() and not (tmp_path / "reg").exists()


def test_bad_alias_and_uri_refused(ckpt, tmp_path):
    reg = Registry(str(tmp_path / "reg"))
    reg.publish(str(ckpt), "tiny")
    with pytest.raises(RegistryError, match="^alias: "):
        reg.set_alias("tiny", "../../x", 1)
    with pytest.raises(RegistryError, match="^alias: 'latest' is computed"):
        reg.set_alias("tiny", "latest", 1)
    with pytest.raises(RegistryError, match="^uri alias: "):
        reg.resolve("registry://tiny@a/../b")
    with pytest.raises(RegistryError, match="^uri version: "):
        reg.resolve("registry://tiny/../../etc")


def test_alias_compare_and_swap(ckpt, tmp_path):
    reg = Registry(str(tmp_path / "reg"))
    for _ in range(3):
        reg.publish(str(ckpt), "tiny")
    assert reg.set_alias("tiny", "production", 1, expected=0) == {"production": 1}
    assert reg.set_alias("tiny", "production", 2, expected=1) == {"production": 2}
    with pytest.raises(AliasConflict, match="expected 1, but it is 2"):
        reg.set_alias("tiny", "production", 3, expected=1)
    with pytest.raises(AliasConflict):
        reg.set_alias("tiny", "production", 3, expected=0)
    assert reg.aliases("tiny") == {"production": 2}
    with pytest.raises(RegistryError, match="no such version"):
        reg.set_alias("tiny", "production", 9)
    root = str(tmp_path / "reg")
    assert main(["registry", "alias", "tiny", "production", "3", "--expect", "1", "--registry", root]) == 3
    assert main(["registry", "alias", "tiny", "production", "3", "--expect", "2", "--registry", root]) == 0
    assert reg.show("tiny", alias="production")["version"] == 3


def _publish_worker(args):
    root, ckpt, barrier = args
    barrier.wait()
    return Registry(root).publish(ckpt, "tiny")


def _alias_worker(args):
    root, alias, barrier = args
    barrier.wait()
    return Registry(root).set_alias("tiny", alias, 1)


def _pool_map(ctx, processes: int, fn, items: list) -> list:
    """Pool.map that lets workers exit on their own: the pool's terminate() sends SIGTERM, which a
    handler inherited through fork (Ray's, the trainer's preemption handler) may swallow, hanging join."""
    pool = ctx.Pool(processes)
    try:
        return pool.map(fn, items)
    finally:
        pool.close()
        pool.join()


def test_concurrent_publishers_get_distinct_versions(tmp_path):
    root = str(tmp_path / "reg")
    ckpts = [str(_write_checkpoint(tmp_path / f"c{i}", seed=i)) for i in range(8)]
    ctx = multiprocessing.get_context("fork")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(8)
        versions = _pool_map(ctx, 8, _publish_worker, [(root, c, barrier) for c in ckpts])
        assert sorted(versions) == list(range(1, 9))
        reg = Registry(root)
        assert reg.versions("tiny") == list(range(1, 9))
        assert reg.verify("tiny") == {v: [] for v in range(1, 9)}
        # Each version holds the weights of the publisher that got that number: none overwritten.
        for ckpt, version in zip(ckpts, versions):
            assert reg.show("tiny", version)["source_url"] == ckpt
            published = Path(reg.resolve(f"registry://tiny/{version}")) / "model.safetensors"
            assert published.read_bytes() == (Path(ckpt) / "model.safetensors").read_bytes()
        # Concurrent alias writers: the lock serialises them, no update is lost.
        barrier = manager.Barrier(6)
        _pool_map(ctx, 6, _alias_worker, [(root, f"a{i}", barrier) for i in range(6)])
        assert reg.aliases("tiny") == {f"a{i}": 1 for i in range(6)}


def test_cli_publish_list_show_resolve(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEGACLASS_REGISTRY", str(tmp_path / "reg"))
    assert main(["registry", "publish", str(ckpt), "--name", "tiny", "--alias", "candidate", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"name": "tiny", "version": 1, "uri": "registry://tiny/1"}
    assert main(["registry", "list"]) == 0
    assert capsys.readouterr().out.strip() == "tiny: versions 1; latest 1; candidate=1"
    assert main(["registry", "show", "tiny@candidate"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tiny/1  (candidate, latest)") and "metric top1" in out
    assert main(["registry", "resolve", "registry://tiny@candidate"]) == 0
    assert Path(capsys.readouterr().out.strip(), "model.safetensors").is_file()
    assert main(["registry", "verify", "tiny"]) == 0
    assert capsys.readouterr().out.strip() == "tiny/1: OK"
    assert main(["registry", "resolve", "registry://nope@x"]) == 1
    assert "registry://nope@x: no such alias" in capsys.readouterr().err
