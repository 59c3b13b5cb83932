"""A run dir written by an attacker: resuming from its train_state/ must refuse, naming the file, and
never run code. Two ways in: DCP's index (.metadata) is a pickle, and DCP unpickles "bytes" entries
freely. Both are tried directly and through `megaclass pretrain` / `megaclass finetune` resume."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
from timm.optim import create_optimizer_v2
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

from cluster.cli import main
from finetune.train_state import read_state, state_writer
from pretrain.checkpoint import CheckpointError, load_state, save_checkpoint, save_state
from pretrain.train_state import read_progress
from tests.dataset_factory import make_dataset

PRETRAINED_CFG = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear",
                  "crop_pct": 1.0}


def _global(module: str, name: str) -> bytes:
    return b"".join(b"\x8c" + bytes([len(s)]) + s for s in (module.encode(), name.encode())) + b"\x93"


def evil_metadata(marker: Path) -> bytes:
    """Protocol 4 resolves dotted names: this names os.system "inside" a DCP module."""
    cmd = f"touch {marker}".encode()
    return (b"\x80\x04" + _global("torch.distributed.checkpoint.filesystem", "os.system")
            + b"\x8c" + bytes([len(cmd)]) + cmd + b"\x85R.")


class _RunsCommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_metadata_attack(marker: Path):
    def write(path: str) -> None:
        save_state(path, {"optim/0/exp_avg": torch.zeros(2)}, {"step": 2})
        Path(path, ".metadata").write_bytes(evil_metadata(marker))
    return write


def write_bytes_attack(marker: Path):
    def write(path: str) -> None:  # every entry a legal DCP entry, but "bytes": unpickled on load
        dcp.save({"progress": _RunsCommand(marker), "optim/0/exp_avg": _RunsCommand(marker)},
                 storage_writer=FsspecWriter(path), no_dist=True)
        Path(path, "state.json").write_text('{"step": 2}')
    return write


ATTACKS = {"metadata": write_metadata_attack, "bytes": write_bytes_attack}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_read_progress_and_read_state_refuse(tmp_path, attack):
    marker = tmp_path / "owned"
    ATTACKS[attack](marker)(str(tmp_path / "ckpt" / "train_state"))
    with pytest.raises(CheckpointError, match=r"train_state/\.metadata"):
        read_progress(str(tmp_path / "ckpt" / "train_state"))
    with pytest.raises(CheckpointError, match=r"train_state/\.metadata"):
        read_state(str(tmp_path / "ckpt"), ("step",))
    assert not marker.exists()


def test_data_file_outside_the_folder_is_refused(tmp_path):
    url = str(tmp_path / "train_state")
    save_state(url, {"a": torch.ones(3)}, {})
    meta = Path(url, ".metadata")
    meta.write_bytes(meta.read_bytes().replace(b"__0_0.distcp", b"../../passwd"))  # same length: still a valid pickle
    with pytest.raises(CheckpointError, match="not a plain DCP file"):
        load_state(url)


def test_finetune_state_round_trip_is_exact(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    counters = {"step": 7, "phase": 1, "best_top1": 0.5, "best_step": 6, "bad_evals": 1}
    expected = optimizer.state_dict()
    state_writer(counters, expected)(str(tmp_path / "ckpt" / "train_state"))
    assert not list((tmp_path / "ckpt" / "train_state").glob("*.pt"))
    state = read_state(str(tmp_path / "ckpt"), tuple(counters))
    assert {k: state[k] for k in counters} == counters
    restored = create_optimizer_v2(torch.nn.Linear(3, 2), opt="adamw", lr=0.1)
    restored.load_state_dict(state["optimizer"])
    got = restored.state_dict()
    assert got["param_groups"] == expected["param_groups"]
    for index, slots in expected["state"].items():
        for key, value in slots.items():
            assert torch.equal(got["state"][index][key], value), key


def _hostile_run(tmp_path: Path, attack: str, num_classes: int) -> tuple[Path, Path]:
    marker = tmp_path / "owned"
    model = timm.create_model("test_resnet", pretrained=False, num_classes=num_classes)
    save_checkpoint(str(tmp_path / "run" / "step-00000002"), state_dict=model.state_dict(), arch="test_resnet",
                    num_classes=num_classes, class_names=[f"class{i:05d}" for i in range(num_classes)],
                    pretrained_cfg=PRETRAINED_CFG, megaclass={"step": 2}, write_train_state=ATTACKS[attack](marker))
    return tmp_path / "run", marker


@pytest.fixture
def no_ray(monkeypatch):
    import cluster.runtime
    monkeypatch.setattr(cluster.runtime, "ray_session", lambda *a, **k: pytest.fail("Ray was started"))


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_megaclass_pretrain_resume_refuses(tmp_path, capsys, no_ray, attack):
    run, marker = _hostile_run(tmp_path, attack, num_classes=3)
    data = make_dataset(tmp_path / "ds", {"train": [4], "val": [2]}, num_classes=3)
    capsys.readouterr()  # only what the command prints counts
    code = main(["pretrain", "--set", f"data.url={data}", "--set", f"checkpoint.url={run}",
                 "--set", "model.arch=test_resnet", "--set", "data.image_size=32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert f"{run}/step-00000002/train_state/.metadata" in err[0]
    assert not marker.exists()


@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize("ray", [True, False])
def test_megaclass_finetune_resume_refuses(tmp_path, capsys, no_ray, attack, ray):
    run, marker = _hostile_run(tmp_path, attack, num_classes=3)
    source = tmp_path / "src"
    model = timm.create_model("test_resnet", pretrained=False, num_classes=5)
    save_checkpoint(str(source), state_dict=model.state_dict(), arch="test_resnet", num_classes=5,
                    class_names=[f"up{i}" for i in range(5)], pretrained_cfg=PRETRAINED_CFG, megaclass={"step": 1})
    data = make_dataset(tmp_path / "ds", {"train": [8], "val": [4]}, num_classes=3)
    capsys.readouterr()
    code = main(["finetune", "--checkpoint", str(source), "--train", data, "--out", str(run),
                 "--set", "train.global_batch_size=4", "--set", "data.num_workers=0"] + ([] if ray else ["--no-ray"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert f"{run}/step-00000002/train_state/.metadata" in err[0]
    assert not marker.exists()


def test_finetune_state_json_with_wrong_types_is_refused(tmp_path):
    state_writer({"step": 3}, torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1).state_dict())(
        str(tmp_path / "ckpt" / "train_state"))
    path = tmp_path / "ckpt" / "train_state" / "state.json"
    path.write_text(path.read_text().replace('"step": 3', '"step": "3; rm -rf /"'))
    with pytest.raises(CheckpointError, match=r"train_state/state\.json: not a fine-tuning train state"):
        read_state(str(tmp_path / "ckpt"), ("step",))
