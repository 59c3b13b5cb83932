"""Run checkpoints on object storage (an in-memory fsspec store here) are uploaded in the background:
training goes on while a checkpoint's files travel, the checkpoint completes (SHA256SUMS) at the next
one, and a run resumes from it."""
from __future__ import annotations

import threading

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from pretrain.checkpoint import list_checkpoints, verify_checkpoint
from pretrain.config import load_pretrain_config
from pretrain.train import train
from tests.dataset_factory import make_dataset


def _cfg(data, run_url, max_steps):
    return load_pretrain_config(None, [f"{k}={v}" for k, v in {
        "data.url": data, "checkpoint.url": run_url, "model.arch": "test_resnet", "data.image_size": 32,
        "data.num_workers": 0, "train.global_batch_size": 8, "train.channels_last": False, "train.max_steps": max_steps,
        "checkpoint.every_steps": 1, "checkpoint.keep": 2, "log.every_steps": 1, "log.tensorboard": False,
        "data.eval_split": "", "optim.name": "sgd", "train.num_threads": 1}.items()])


def test_checkpoints_upload_in_background_then_complete_and_resume(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "ds", [40], num_classes=4, image_size=32)
    run_url = "memory://upload-test/run"
    released, seen = threading.Event(), {}
    put_file = MemoryFileSystem.put_file

    def slow_put_file(self, lpath, rpath, *args, **kwargs):
        if "step-00000001" in rpath:  # hold step 1's upload until training has gone past it
            assert released.wait(60), "step 1's upload was never released"
        return put_file(self, lpath, rpath, *args, **kwargs)

    def report(metrics):
        if metrics["step"] == 1:  # step 1 was reported while its files are still uploading
            fs = fsspec.filesystem("memory")
            seen["complete_at_report"] = fs.exists(f"{run_url}/step-00000001/SHA256SUMS")
            seen["listed_at_report"] = list_checkpoints(run_url)
            released.set()

    monkeypatch.setattr(MemoryFileSystem, "put_file", slow_put_file)
    try:
        assert train(_cfg(data, run_url, 3), report=report)["step"] == 3
        assert seen == {"complete_at_report": False, "listed_at_report": []}
        # step 2 completed at step 3's checkpoint; step 1 was pruned (keep 2); step 3 was written at once
        assert [u.rsplit("/", 1)[-1] for u in list_checkpoints(run_url)] == ["step-00000002", "step-00000003"]
        verify_checkpoint(f"{run_url}/step-00000002")
        assert train(_cfg(data, run_url, 5))["step"] == 5  # resumes from step 3 on the store
        verify_checkpoint(f"{run_url}/final")
    finally:
        fsspec.filesystem("memory").rm("memory://upload-test", recursive=True)


def test_a_failed_upload_fails_the_run_at_the_next_checkpoint(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "ds", [40], num_classes=4, image_size=32)
    put_file = MemoryFileSystem.put_file

    def failing_put_file(self, lpath, rpath, *args, **kwargs):
        if "step-00000001" in rpath:
            raise OSError("connection reset")
        return put_file(self, lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "put_file", failing_put_file)
    try:
        with pytest.raises(RuntimeError, match="step-00000001: uploading the checkpoint failed"):
            train(_cfg(data, "memory://upload-fail/run", 3))
        assert list_checkpoints("memory://upload-fail/run") == []
    finally:
        fsspec.filesystem("memory").rm("memory://upload-fail", recursive=True)
