"""The pipeline against real servers: an S3 API (moto's standalone server through s3fs) and a Ray cluster
of two nodes (token auth on), with the second node SIGKILLed mid-ingest and mid-training.

Every command runs as a user runs it, with RAY_ADDRESS and s3:// URLs. The servers are started once per
session (tests/cluster_fixtures.py); the scenarios are combined so that the whole file stays short.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cluster.cli import main
from cluster.localcluster import running_task
from data_pipeline.config import replace
from data_pipeline.ingest import IngestConfig, finalize, plan_shards, write_shard
from tests.http_server import LoopbackServer

pytest_plugins = ["tests.cluster_fixtures"]  # s3_server, two_nodes, cluster_env: one of each per session
ROOT = Path(__file__).resolve().parents[1]
NUM_ROWS, SHARD_SIZE = 24, 2
FLAGS = ["--allow-network", "127.0.0.0/8", "--shard-size", str(SHARD_SIZE), "--threads", "1", "--image-size", "32",
         "--timeout-s", "5", "--no-progress"]
CFG = replace(IngestConfig(), ["fetch.allow_networks=[127.0.0.0/8]", f"output.shard_size={SHARD_SIZE}",
                               "fetch.threads=1", "image.image_size=32", "fetch.timeout_s=5", "runtime.progress=false"])


def fresh_s3():
    """An s3fs instance without listing caches: other processes write the bucket meanwhile."""
    return fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)


def tree_bytes(url: str) -> dict[str, bytes]:
    fs, root = fsspec.core.url_to_fs(url, skip_instance_cache=True, use_listings_cache=False)
    return {os.path.relpath(p, root): fs.cat_file(p) for p in sorted(fs.find(root))}


@pytest.fixture(scope="module")
def slow_source(tmp_path_factory):
    """24 images served with a delay (one task per 2 rows), and the plain (no Ray) dataset they make."""
    tmp = tmp_path_factory.mktemp("src")
    with LoopbackServer() as server:
        urls = []
        for i in range(NUM_ROWS):
            buf = io.BytesIO()
            Image.new("RGB", (40 + i, 36), (i * 12 % 255, 90, 40)).save(buf, "JPEG", quality=85)
            urls.append(server.add(f"/img{i}.jpg", buf.getvalue(), delay_s=0.3))
        urls[3] = server.url("/missing.jpg")
        pq.write_table(pa.table({"url": urls, "label": [f"c{i % 4}" for i in range(NUM_ROWS)]}), str(tmp / "src.parquet"))
        plan = plan_shards(str(tmp / "src.parquet"), str(tmp / "reference"), CFG)
        with ThreadPoolExecutor(plan.num_tasks) as pool:
            results = list(pool.map(lambda i: write_shard(plan.task(i), CFG), range(plan.num_tasks)))
        finalize(plan, results, CFG)
        yield str(tmp / "src.parquet"), str(tmp / "reference")


@pytest.mark.slow
def test_ingest_on_two_nodes_to_s3_survives_node_loss_and_driver_crash(slow_source, s3_server, two_nodes,
                                                                         cluster_env, capsys):
    source, reference = slow_source
    out = s3_server.url("ingest-ds")
    committed = lambda: len(fresh_s3().glob(out + "/index/part-*.parquet"))  # noqa: E731
    command = [sys.executable, "-m", "cluster", "ingest", source, out, *FLAGS]
    proc = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # 1. SIGKILL the second node (raylet, workers, agents) while it runs a shard task: the tasks ran on it.
    deadline = time.monotonic() + 600
    while not running_task(two_nodes.node_pids(1), "_write_shard_task"):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
        time.sleep(0.02)
    assert two_nodes.kill_node(1)
    at_kill = committed()
    # 2. The head alone goes on (the lost node's task is retried there); then the driver is SIGKILLed.
    while committed() < at_kill + 1:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
        time.sleep(0.05)
    two_nodes.wait_for_nodes(1)  # the head notices the loss within a few health checks
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the ingest ended before the driver could be killed"
    assert committed() < NUM_ROWS // SHARD_SIZE and not fresh_s3().exists(out + "/manifest.json")

    # 3. The node returns; the same command resumes and ends byte-identical to a plain run.
    # A fresh driver process, as a user would run it: Ray reads its auth mode once per process, and this
    # pytest process may already have used Ray without a token.
    two_nodes.start_node(1)
    resumed = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    assert resumed.returncode == 0, resumed.stdout.decode()[-4000:]
    assert "shard tasks by Ray node: " in resumed.stdout.decode()
    expected = {os.path.relpath(p, reference): Path(p).read_bytes() for p in map(str, Path(reference).rglob("*"))
                if Path(p).is_file()}
    written = {rel: data for rel, data in tree_bytes(out).items() if not rel.startswith("report/")}  # the HTML report
    assert written == expected
    assert main(["ingest", "--verify", out]) == 0


def _tiny_checkpoint(url: str, seed: int) -> str:
    import torch

    from pretrain.checkpoint import save_checkpoint
    gen = torch.Generator().manual_seed(seed)
    state = {"fc.weight": torch.randn(4, 512, generator=gen), "fc.bias": torch.zeros(4)}
    return save_checkpoint(url, state_dict=state, arch="resnet18", num_classes=4, class_names=list("abcd"),
                           pretrained_cfg={"input_size": [3, 32, 32]}, megaclass={"step": seed},
                           write_train_state=lambda d: Path(d, "optim.bin").write_bytes(os.urandom(64)))


def _publish(args):
    root, ckpt, barrier = args
    from cluster.registry import Registry
    barrier.wait()
    return Registry(root).publish(ckpt, "tiny")


@pytest.mark.slow
def test_registry_on_s3_concurrent_publishes_tamper_and_gc(s3_server, s3_env, tmp_path, capsys, monkeypatch):
    import multiprocessing

    from cluster.registry import Registry
    monkeypatch.setenv("MEGACLASS_CACHE", str(tmp_path / "cache"))
    root = s3_server.url("registry")
    ckpts = [_tiny_checkpoint(s3_server.url("publish", f"run{i}", "final"), seed=i) for i in range(5)]
    ctx = multiprocessing.get_context("fork")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(5)
        pool = ctx.Pool(5)
        try:
            versions = pool.map(_publish, [(root, c, barrier) for c in ckpts])
        finally:
            pool.close()
            pool.join()
    # Five publishers at once, one version each: the conditional put (If-None-Match) kept them apart.
    assert sorted(versions) == [1, 2, 3, 4, 5]
    reg = Registry(root)
    assert reg.versions("tiny") == [1, 2, 3, 4, 5] and reg.verify("tiny") == {v: [] for v in range(1, 6)}
    for ckpt, version in zip(ckpts, versions):
        assert tree_bytes(ckpt)["model.safetensors"] == \
            Path(reg.resolve(f"registry://tiny/{version}"), "model.safetensors").read_bytes()

    # A tampered object is refused by verify and by resolve (fresh cache), named.
    fs = fresh_s3()
    weights = f"{root}/tiny/versions/000003/model.safetensors"
    fs.pipe_file(weights, fs.cat_file(weights)[:-8] + b"tampered")
    fsspec.filesystem("s3").invalidate_cache()  # as a new process would see the bucket
    assert main(["registry", "verify", "tiny", "--registry", root]) == 1
    assert "tiny/3: FAILED: model.safetensors: sha256/size mismatch" in capsys.readouterr().out
    monkeypatch.setenv("MEGACLASS_CACHE", str(tmp_path / "cache2"))
    assert main(["registry", "resolve", "registry://tiny/3", "--registry", root]) == 1
    assert "fails verification, refusing to use it: model.safetensors" in capsys.readouterr().err

    # What dead publishers leave behind (a staging folder, a claimed number without version.json)
    # is collected once old enough; versions are never touched and a claimed number is never reused.
    fs.pipe_file(f"{root}/tiny/.staging/dead/model.safetensors", b"x" * 100)
    fs.pipe_file(f"{root}/tiny/versions/000006/.claim", b"{}")
    fs.pipe_file(f"{root}/tiny/versions/000006/config.json", b"{}")
    fsspec.filesystem("s3").invalidate_cache()
    assert main(["registry", "gc", "--older-than", "24h", "--registry", root]) == 0
    assert "removed 0 folder(s), 0 B; 2 changed in the last 86400 s kept" in capsys.readouterr().out
    assert main(["registry", "gc", "--older-than", "0s", "--registry", root]) == 0
    assert capsys.readouterr().out.splitlines() == [f"removed {root}/tiny/.staging/dead",
                                                    f"removed {root}/tiny/versions/000006",
                                                    "removed 2 folder(s), 102 B; 0 changed in the last 0 s kept"]
    fs = fresh_s3()
    assert not fs.exists(f"{root}/tiny/.staging/dead") and fs.find(f"{root}/tiny/versions/000006") == \
        [f"{root}/tiny/versions/000006/.claim"[len("s3://"):]]
    assert Registry(root).versions("tiny") == [1, 2, 3, 4, 5]
    assert Registry(root).publish(ckpts[0], "tiny") == 7
    with pytest.raises(SystemExit) as exited:
        main(["registry", "gc", "--older-than", "1x", "--registry", root])
    assert exited.value.code == 2 and "--older-than: '1x' is not a duration" in capsys.readouterr().err

