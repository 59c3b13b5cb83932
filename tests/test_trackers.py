"""Experiment trackers: MLflow's local store read back through its client and W&B's offline run files,
compared with metrics.jsonl; a resumed run continues the same tracker run; trackers load only when named."""

from __future__ import annotations

import ast
import json
import os
import signal
import struct
import sys
from pathlib import Path

import pytest

from data_pipeline.config import ConfigError
from pretrain.config import load_pretrain_config
from pretrain.train import train
from pretrain.rundir import create_run_dir
from pretrain.trackers import STATE_FILE
from tests.dataset_factory import make_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def tracker_env(tmp_path, monkeypatch):
    """No tracker server or account from the environment; W&B's own folders inside the test."""
    for name in ("MLFLOW_TRACKING_URI", "WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("trackers") / "ds", {"train": [24, 24], "val": [8]}, num_classes=4,
                        image_size=32)


def pretrain_config(dataset, run, *extra):
    base = {"data.url": dataset, "checkpoint.url": str(run), "model.arch": "test_resnet", "data.image_size": 32,
            "data.num_workers": 0, "data.shuffle_buffer": 16, "train.global_batch_size": 8,
            "train.channels_last": False, "optim.warmup_steps": 1, "log.every_steps": 1, "log.eval_batches": 1,
            "log.eval_batch_size": 8, "train.num_threads": 1, "scaling.num_workers": 1, "train.max_steps": 4,
            "checkpoint.every_steps": 2, "log.trackers": "[tensorboard, mlflow, wandb]"}
    return load_pretrain_config(None, [f"{k}={v}" for k, v in base.items()] + list(extra))


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wandb_records(path: Path):
    """Records of a W&B run file (.wandb): a LevelDB-style log of 32 KiB blocks holding protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending = path.read_bytes(), 7, b""  # 7: ":W&B", magic, version
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, or LAST of a record split across blocks
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


@pytest.mark.slow
def test_pretrain_resume_continues_the_same_tracker_runs(dataset, tmp_path):
    from mlflow import MlflowClient

    run = tmp_path / "run"
    cfg = pretrain_config(dataset, run)
    first = train(cfg, report=lambda m: m["step"] == 2 and os.kill(os.getpid(), signal.SIGTERM))
    assert first["preempted"] and first["step"] == 3
    state = json.loads((run / STATE_FILE).read_text())
    second = train(cfg)
    assert second["step"] == 4 and json.loads((run / STATE_FILE).read_text()) == state  # same tracker runs

    records = [r for r in jsonl(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]

    client = MlflowClient(state["mlflow"]["tracking_uri"])
    assert state["mlflow"]["tracking_uri"] == f"sqlite:///{run / 'mlflow.db'}"
    mlrun = client.get_run(state["mlflow"]["run_id"])
    assert mlrun.info.status == "FINISHED" and len(client.search_runs([mlrun.info.experiment_id])) == 1
    assert mlrun.data.params["model.arch"] == "test_resnet" and mlrun.data.params["train.max_steps"] == "4"
    for key in ("loss", "lr", "eval_top1"):
        history = sorted(client.get_metric_history(mlrun.info.run_id, key), key=lambda m: (m.step, m.timestamp))
        by_step = {m.step: m.value for m in history}  # a redone step keeps its last value, as metrics.jsonl does
        expected = {r["step"]: r[key] for r in jsonl(run / "metrics.jsonl") if key in r}
        assert by_step == pytest.approx(expected), key
    assert {a.path for a in client.list_artifacts(mlrun.info.run_id)} >= {"curves.png", "config.yaml"}

    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{state['wandb']['id']}.wandb" for f in files)
    logged = {}
    configs = []
    for f in files:
        for record in wandb_records(f):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                logged[record.history.step.num] = items
            elif kind == "run":
                configs.append({u.key or "/".join(u.nested_key): u.value_json for u in record.run.config.update})
    assert {s: v["loss"] for s, v in logged.items() if "loss" in v} == pytest.approx({r["step"]: r["loss"] for r in records})
    assert json.loads(configs[0]["model"])["arch"] == "test_resnet"

    # Fine-tuning from that run logs to the same store when pointed at it, as a second run of the experiment.
    from data_pipeline.config import load_config
    from finetune.config import FinetuneConfig
    from finetune.train import finetune

    ft_run = tmp_path / "ft"
    finetune(load_config(FinetuneConfig, None, [
        f"finetune.checkpoint_url={run / 'final'}", f"data.url={dataset}", f"checkpoint.url={ft_run}",
        "data.num_workers=0", "train.global_batch_size=8", "train.max_steps=2", "train.eval_every_steps=2",
        "optim.warmup_steps=1", "log.every_steps=1", "train.patience=0", f"data.cache_url={tmp_path / 'cache'}",
        "log.trackers=[mlflow]", f"log.tracking.mlflow_tracking_uri={state['mlflow']['tracking_uri']}",
        "log.tracking.run_name=ft-test"]))
    ft_state = json.loads((ft_run / STATE_FILE).read_text())
    assert set(ft_state) == {"mlflow"} and ft_state["mlflow"]["run_id"] != state["mlflow"]["run_id"]
    ft = client.get_run(ft_state["mlflow"]["run_id"])
    assert ft.info.run_name == "ft-test" and ft.info.experiment_id == mlrun.info.experiment_id
    assert ft.data.params["finetune.mode"] == "full" and ft.info.status == "FINISHED"
    ft_records = jsonl(ft_run / "metrics.jsonl")
    assert {m.step: m.value for m in client.get_metric_history(ft.info.run_id, "eval_top1")} == \
        pytest.approx({r["step"]: r["eval_top1"] for r in ft_records if "eval_top1" in r})
    assert not (ft_run / "tensorboard").exists()  # not named in log.trackers

    # Evaluating the run's model attaches the result to the same tracker run.
    from cluster.cli import main

    assert main(["evaluate", str(ft_run / "final"), dataset, "--out", str(tmp_path / "eval"), "--workers", "0"]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    ft = client.get_run(ft_state["mlflow"]["run_id"])
    assert ft.data.metrics["evaluate/top1"] == pytest.approx(report["top1"]) and ft.info.status == "FINISHED"
    assert {"report.json", "confusion.png"} <= {a.path for a in client.list_artifacts(ft.info.run_id)}


def test_unknown_tracker_is_a_config_error(dataset, tmp_path):
    with pytest.raises(ConfigError, match=r"log\.trackers: unknown tracker 'comet'"):
        pretrain_config(dataset, tmp_path / "run", "log.trackers=[mlflow, comet]")
    with pytest.raises(ConfigError, match=r"log\.tracking\.wandb_mode"):
        pretrain_config(dataset, tmp_path / "run", "log.tracking.wandb_mode=cloud")


def test_tracker_packages_load_only_when_named(tmp_path, monkeypatch):
    """No module of ours imports a tracker at import time, and a run without them never asks for one.

    (timm.utils itself imports wandb when it is installed; that is timm's doing, not a megaclass import.)"""
    optional = {"mlflow", "wandb", "huggingface_hub", "selenium"}
    for path in [*ROOT.glob("data_pipeline/**/*.py"), *ROOT.glob("pretrain/**/*.py"), *ROOT.glob("finetune/**/*.py"),
                 *ROOT.glob("cluster/**/*.py")]:
        for node in ast.parse(path.read_text()).body:  # module level only; imports inside functions are lazy
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not {n.split(".")[0] for n in names} & optional, f"{path}: imports {names} at module level"

    for name in ("mlflow", "wandb"):
        monkeypatch.setitem(sys.modules, name, None)  # any import of them now raises ImportError
    run = create_run_dir(pretrain_config(str(tmp_path / "ds"), tmp_path / "run", "log.trackers=[tensorboard]"), is_main=True)
    run.log(1, {"loss": 1.0})
    run.finish()
    assert (tmp_path / "run" / "tensorboard").is_dir() and not (tmp_path / "run" / STATE_FILE).exists()
