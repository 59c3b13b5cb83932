"""Training on a two-node Ray cluster (token auth on) from and to an S3 API server (moto's standalone server):
one DDP worker per node, the second node SIGKILLed mid-run and started again, the run resumed from its
s3:// checkpoint; then finetune, evaluate and export reading s3:// checkpoints (the ONNX file to s3://).

The servers are the session's (tests/cluster_fixtures.py), shared with tests/test_cluster_s3.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest

from cluster.cli import main

pytest_plugins = ["tests.cluster_fixtures"]  # s3_server, two_nodes, cluster_env: one of each per session
ROOT = Path(__file__).resolve().parents[1]


def fresh_s3():
    return fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)


def _metrics(run_url: str) -> list[dict]:
    import json
    return [json.loads(line) for line in fresh_s3().cat_file(run_url + "/metrics.jsonl").decode().splitlines()]


@pytest.mark.slow
def test_pretrain_one_worker_per_node_on_s3_survives_node_loss_then_finetune_evaluate_export(
        s3_server, two_nodes, cluster_env, tmp_path, capsys):
    import onnxruntime as ort

    from cluster.synthetic import split_classes, write_image_folder
    from pretrain.checkpoint import list_checkpoints, load_checkpoint
    from tests.dataset_factory import make_dataset
    data = make_dataset(s3_server.url("pretrain-ds"), {"train": [16, 16, 16, 16], "val": [8]}, num_classes=4)
    run = s3_server.url("runs", "pretrain")
    sets = {"data.url": data, "checkpoint.url": run, "model.arch": "test_resnet", "data.image_size": 32,
            "data.num_workers": 0, "data.shuffle_buffer": 16, "train.global_batch_size": 8, "train.max_steps": 12,
            "train.channels_last": False, "train.num_threads": 1, "optim.warmup_steps": 1, "log.every_steps": 1,
            "log.eval_batches": 1, "log.eval_batch_size": 4, "checkpoint.every_steps": 4, "checkpoint.keep": 2,
            "scaling.num_workers": 2, "scaling.max_failures": 2}
    command = [sys.executable, "-m", "cluster", "pretrain", *(a for k, v in sets.items() for a in ("--set", f"{k}={v}"))]
    proc = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # SIGKILL the second node (raylet and its training worker) once a step checkpoint is on s3://,
    # then start it again: Ray Train restarts the worker group and the run resumes from s3://.
    deadline = time.monotonic() + 400  # under the suite's per-test timeout, to see the output
    while True:
        fsspec.filesystem("s3").invalidate_cache()
        if list_checkpoints(run):
            break
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.2)
    assert two_nodes.kill_node(1)
    two_nodes.start_node(1)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:]
    assert f"final checkpoint: {run}/final (step 12" in out
    records = _metrics(run)
    resumes = [r["step"] for r in records if r.get("event") == "resume"]
    assert len(resumes) == 1 and resumes[0] in (4, 8)
    assert sorted({r["step"] for r in records if "event" not in r}) == list(range(1, 13))
    final = load_checkpoint(run + "/final")
    assert final.megaclass["step"] == 12 and final.megaclass["world_size"] == 2

    # finetune, evaluate and export read the s3:// checkpoint; the fine-tuned run and the ONNX file go to s3://.
    classes = split_classes(0, 2)[1]
    write_image_folder(tmp_path / "train", classes, 6)
    write_image_folder(tmp_path / "val", classes, 2, seed=1)
    ft_run = s3_server.url("runs", "finetune")
    assert main(["finetune", "--checkpoint", run + "/final", "--train", str(tmp_path / "train"), "--val",
                 str(tmp_path / "val"), "--out", ft_run, "--no-ray", "--set", "data.num_workers=0",
                 "--set", "train.global_batch_size=4", "--set", "train.max_steps=2",
                 "--set", f"data.cache_url={tmp_path / 'cache'}", "--set", "log.tensorboard=false"]) == 0
    assert load_checkpoint(ft_run + "/final").megaclass["finetuned_from"]["arch"] == "test_resnet"
    assert main(["evaluate", ft_run + "/final", str(tmp_path / "val"), "--workers", "0"]) == 0
    assert "top-1" in capsys.readouterr().out
    onnx_url = s3_server.url("exports", "model.onnx")
    assert main(["export", ft_run + "/final", "--onnx", onnx_url]) == 0
    local = tmp_path / "model.onnx"
    local.write_bytes(fresh_s3().cat_file(onnx_url))
    session = ort.InferenceSession(str(local), providers=["CPUExecutionProvider"])
    assert session.get_outputs()[0].shape[-1] == 2
