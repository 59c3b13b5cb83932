"""The registry against someone who can write it: no file outside the cache, and with --trust only
versions signed by a trusted key are used (integrity alone cannot tell a rewritten version apart)."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import fsspec
import pytest
import torch

from cluster.cli import main
from cluster.registry import Registry, RegistryError
from cluster.signing import load_private_key, load_public_key
from pretrain.checkpoint import save_checkpoint


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MEGACLASS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def ckpt(tmp_path) -> str:
    state = {"fc.weight": torch.randn(4, 512), "fc.bias": torch.zeros(4)}
    return save_checkpoint(str(tmp_path / "ckpt"), state_dict=state, arch="resnet18", num_classes=4,
                           class_names=list("abcd"), pretrained_cfg={"input_size": [3, 32, 32]}, megaclass={"step": 1})


@pytest.fixture
def keys(tmp_path) -> dict[str, str]:
    for name in ("publisher", "stranger"):
        assert main(["registry", "keygen", str(tmp_path / f"{name}.pem")]) == 0
    assert (tmp_path / "publisher.pem").stat().st_mode & 0o077 == 0
    return {name: str(tmp_path / f"{name}.pem") for name in ("publisher", "stranger")}


def _version_json(reg: Registry, name: str, version: int) -> str:
    return f"{reg._version_path(name, version)}/version.json"


def _rewrite(reg: Registry, path: str, change) -> None:
    info = json.loads(reg.fs.cat_file(path))
    change(info)
    reg.fs.pipe(path, json.dumps(info).encode())


def test_version_naming_a_path_outside_the_cache_is_refused(tmp_path, ckpt, cache_dir):
    reg = Registry(f"memory://reg-{uuid.uuid4().hex}")
    reg.publish(ckpt, "m")
    escape = "../../../../escape/owned.txt"  # from the cache's staging folder up to tmp_path
    payload = b"written outside the cache"
    reg.fs.pipe(f"{reg._version_path('m', 1)}/{escape}", payload)

    def add(info):
        info["files"][escape] = {"sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}
    _rewrite(reg, _version_json(reg, "m", 1), add)
    with pytest.raises(RegistryError, match="files"):
        reg.resolve("registry://m/1")
    assert not (tmp_path / "escape").exists()
    fsspec.filesystem("memory").rm(reg.root, recursive=True)


def test_checkpoint_sums_naming_a_path_outside_are_refused(tmp_path, ckpt):
    sums = Path(ckpt, "SHA256SUMS")
    sums.write_text(sums.read_text() + f"{'0' * 64}  train_state/../../x\n")
    with pytest.raises(RegistryError, match="line 4"):
        Registry(str(tmp_path / "reg")).publish(ckpt, "m")


def test_signed_versions_and_trust(tmp_path, ckpt, keys, capsys):
    root = str(tmp_path / "reg")
    pub, stranger_pub = keys["publisher"] + ".pub", keys["stranger"] + ".pub"
    assert main(["registry", "publish", ckpt, "--name", "m", "--registry", root, "--sign", keys["publisher"]]) == 0
    assert main(["registry", "publish", ckpt, "--name", "m", "--registry", root]) == 0  # unsigned: version 2
    capsys.readouterr()
    assert main(["registry", "resolve", "registry://m/1", "--registry", root, "--trust", pub]) == 0
    assert main(["registry", "verify", "m/1", "--registry", root, "--trust", pub]) == 0
    capsys.readouterr()

    assert main(["registry", "resolve", "registry://m/2", "--registry", root, "--trust", pub]) == 1
    assert "unsigned" in capsys.readouterr().err
    assert main(["registry", "resolve", "registry://m/1", "--registry", root, "--trust", stranger_pub]) == 1
    assert "does not verify" in capsys.readouterr().err
    assert main(["registry", "verify", "m/2", "--registry", root]) == 0  # integrity alone holds
    capsys.readouterr()

    # Whoever writes the registry rewrites a file and its hash together: integrity passes, trust does not.
    reg = Registry(root)
    folder = Path(reg._version_path("m", 1))
    (folder / "classes.parquet").unlink()
    (folder / "classes.parquet").write_bytes(b"forged")

    def forge(info):
        info["files"]["classes.parquet"] = {"sha256": hashlib.sha256(b"forged").hexdigest(), "bytes": 6}
    _rewrite(reg, _version_json(reg, "m", 1), forge)
    assert reg.verify("m", 1) == {1: []}
    assert main(["registry", "verify", "m/1", "--registry", root, "--trust", pub]) == 1
    assert "does not verify" in capsys.readouterr().out
    with pytest.raises(RegistryError, match="does not verify"):
        Registry(root, trust=[load_public_key(pub)]).resolve("registry://m/1")


def test_finetune_trust_refuses_unsigned_and_plain_folders(tmp_path, ckpt, keys, capsys):
    root = str(tmp_path / "reg")
    Registry(root).publish(ckpt, "m")
    pub = keys["publisher"] + ".pub"
    common = ["--train", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--registry", root, "--trust", pub]
    capsys.readouterr()
    for source, reason in (("registry://m/1", "unsigned"), (ckpt, "only registry versions are signed")):
        assert main(["finetune", "--checkpoint", source, *common]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and reason in err[0]


def test_bad_keys_are_one_line_errors(tmp_path, ckpt, keys, capsys):
    with pytest.raises(ValueError, match="--sign"):
        load_private_key(keys["publisher"] + ".pub")
    capsys.readouterr()
    assert main(["registry", "publish", ckpt, "--name", "m", "--registry", str(tmp_path / "r"),
                 "--sign", str(tmp_path / "missing.pem")]) == 1
    assert "--sign" in capsys.readouterr().err
    assert main(["registry", "keygen", keys["publisher"]]) == 1  # never overwrites a key


def test_evaluate_predict_export_honour_trust(tmp_path, ckpt, keys, capsys):
    root = str(tmp_path / "reg")
    Registry(root).publish(ckpt, "m")
    trust = ["--registry", root, "--trust", keys["publisher"] + ".pub"]
    capsys.readouterr()
    for argv in (["evaluate", "registry://m/1", str(tmp_path / "data")], ["predict", "registry://m/1", "x.jpg"],
                 ["export", "registry://m/1", "--onnx", str(tmp_path / "m.onnx")]):
        assert main(argv + trust) == 1, argv[0]
        assert "unsigned" in capsys.readouterr().err


@pytest.mark.parametrize("table", ['{"production": "2; rm"}', '[1]', '{"../x": 1}', 'not json'])
def test_malformed_aliases_file_is_a_registry_error(tmp_path, ckpt, table, capsys):
    root = str(tmp_path / "reg")
    Registry(root).publish(ckpt, "m")
    Path(root, "m", "aliases.json").write_text(table)
    capsys.readouterr()
    assert main(["registry", "list", "--registry", root]) == 1
    assert "aliases.json: not a JSON object" in capsys.readouterr().err
