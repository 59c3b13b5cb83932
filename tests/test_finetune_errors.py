"""Bad input to finetune/evaluate/predict/export: one clear line and a non-zero exit, or a recorded skip.

Each case goes through the real CLI (`cluster.cli.main`) and checks that stderr is a single line
naming the problem and that no torch traceback escapes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cluster.cli import main as cli_main
from cluster.synthetic import split_classes, write_image_folder
from tests.test_finetune import make_checkpoint, make_downstream


def _resum(ckpt: Path) -> None:
    """Rewrite SHA256SUMS after an edit, so only the edit itself is what the loader can object to."""
    lines = []
    for path in sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != "SHA256SUMS"):
        lines.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.relative_to(ckpt)}\n")
    (ckpt / "SHA256SUMS").write_text("".join(lines))


def _finetune(ckpt, train, run, *extra) -> list[str]:
    return ["finetune", "--checkpoint", str(ckpt), "--train", str(train), "--out", str(run), "--no-ray",
            "--set", "data.num_workers=0", "--set", "train.global_batch_size=4", "--set", "train.max_steps=1",
            "--set", f"data.cache_url={Path(run).parent / 'cache'}", "--set", "log.tensorboard=false", *extra]


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and err.startswith("megaclass ")
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def data(tmp_path) -> str:
    return make_downstream(tmp_path / "ds")


def _break_missing(ckpt: Path) -> None:
    import shutil
    shutil.rmtree(ckpt)


def _break_truncated(ckpt: Path) -> None:
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def _break_altered(ckpt: Path) -> None:
    weights = bytearray((ckpt / "model.safetensors").read_bytes())
    weights[-10] ^= 0xFF
    (ckpt / "model.safetensors").write_bytes(bytes(weights))


def _break_foreign(ckpt: Path) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    del config["megaclass"]
    (ckpt / "config.json").write_text(json.dumps(config))
    _resum(ckpt)


def _break_unknown_arch(ckpt: Path) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    config["architecture"] = "no_such_net_v9"
    (ckpt / "config.json").write_text(json.dumps(config))
    _resum(ckpt)


def _break_plain_folder(ckpt: Path) -> None:
    for path in ckpt.iterdir():
        path.unlink()
    (ckpt / "weights.bin").write_bytes(b"\0" * 64)


@pytest.mark.parametrize("damage, needle", [
    (_break_missing, "no such checkpoint"),
    (_break_truncated, "model.safetensors: sha256 mismatch"),
    (_break_altered, "model.safetensors: sha256 mismatch"),
    (_break_foreign, "foreign config"),
    (_break_unknown_arch, "unknown architecture 'no_such_net_v9'"),
    (_break_plain_folder, "SHA256SUMS: missing"),
])
def test_bad_checkpoint_is_one_line(tmp_path, data, capsys, damage, needle):
    ckpt = Path(make_checkpoint(tmp_path / "ckpt"))
    damage(ckpt)
    assert cli_main(_finetune(ckpt, data, tmp_path / "run")) == 1
    _one_line_error(capsys, "megaclass finetune: error:", needle)
    assert not (tmp_path / "run" / "final").exists()
    # the model-consuming commands say the same
    assert cli_main(["evaluate", str(ckpt), data, "--workers", "0"]) == 1
    _one_line_error(capsys, "megaclass evaluate: error:", needle)
    assert cli_main(["export", str(ckpt), "--onnx", str(tmp_path / "m.onnx")]) == 1
    _one_line_error(capsys, "megaclass export: error:", needle)
    assert cli_main(["predict", str(ckpt), str(tmp_path / "x.jpg")]) == 1
    _one_line_error(capsys, "megaclass predict: error:", needle)


def test_unknown_registry_model(tmp_path, data, capsys):
    code = cli_main(_finetune("registry://nobody@production", data, tmp_path / "run", "--registry",
                              str(tmp_path / "registry")))
    assert code == 1
    _one_line_error(capsys, "nobody")


def test_val_classes_not_in_train(tmp_path, capsys):
    up, extra = split_classes(3, 1, seed=3)
    write_image_folder(tmp_path / "train", up[:2], 4)
    write_image_folder(tmp_path / "val", [up[0], extra[0]], 2)
    ckpt = make_checkpoint(tmp_path / "ckpt")
    assert cli_main(_finetune(ckpt, tmp_path / "train", tmp_path / "run", "--val", str(tmp_path / "val"))) == 1
    _one_line_error(capsys, "1 class(es) not among the 2 known ones", extra[0].name)


def test_empty_class_folder(tmp_path, capsys):
    classes = split_classes(2, 0)[0]
    write_image_folder(tmp_path / "train", classes, 4)
    (tmp_path / "train" / "lonely").mkdir()
    ckpt = make_checkpoint(tmp_path / "ckpt")
    assert cli_main(_finetune(ckpt, tmp_path / "train", tmp_path / "run")) == 1
    _one_line_error(capsys, "empty class folder(s): lonely")


def test_class_of_only_non_images(tmp_path, capsys):
    classes = split_classes(2, 0)[0]
    write_image_folder(tmp_path / "train", classes, 4)
    (tmp_path / "train" / "texts").mkdir()
    (tmp_path / "train" / "texts" / "a.jpg").write_text("not a jpeg at all")
    ckpt = make_checkpoint(tmp_path / "ckpt")
    assert cli_main(_finetune(ckpt, tmp_path / "train", tmp_path / "run", "--val", str(tmp_path / "train"))) == 1
    _one_line_error(capsys, "no usable images for class(es): texts")


def test_missing_data_and_config_mistakes(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    assert cli_main(_finetune(ckpt, tmp_path / "nowhere", tmp_path / "run")) == 1
    _one_line_error(capsys, "nowhere")
    assert cli_main(_finetune(ckpt, tmp_path / "nowhere", tmp_path / "run", "--set", "finetune.mode=half")) == 2
    _one_line_error(capsys, "finetune.mode")
    data = make_downstream(tmp_path / "ds")
    assert cli_main(_finetune(ckpt, data, tmp_path / "run", "--set", "model.arch=resnet50")) == 2
    _one_line_error(capsys, "model.arch", "test_resnet")
    train_only = make_downstream(tmp_path / "ds2")
    manifest = json.loads((Path(train_only) / "manifest.json").read_text())
    manifest["splits"].pop("val")
    (Path(train_only) / "manifest.json").write_text(json.dumps(manifest))
    assert cli_main(_finetune(ckpt, train_only, tmp_path / "run2")) == 2
    _one_line_error(capsys, "data.val_url", "no 'val' split")
