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
from cluster.localcluster import session_pids
from data_pipeline.config import replace
from data_pipeline.ingest import IngestConfig, finalize, plan_shards, write_shard
from http_server import LoopbackServer
from tests.cluster_fixtures import cluster_env, s3_server, two_nodes  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]
NUM_ROWS, SHARD_SIZE = 20, 2
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
    """20 images served with a delay (one task per 2 rows), and the plain (no Ray) dataset they make."""
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


def running_shard_task(pids: list[int]) -> bool:
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::_write_shard_task"):
                return True
        except OSError:
            continue  # ended while we looked
    return False


@pytest.mark.slow
def test_ingest_on_two_nodes_to_s3_survives_node_loss_and_driver_crash(slow_source, s3_server, two_nodes,
                                                                         cluster_env, capsys):
    source, reference = slow_source
    out = s3_server.url("ingest-ds")
    committed = lambda: len(fresh_s3().glob(out + "/index/part-*.parquet"))  # noqa: E731
    command = [sys.executable, "-m", "cluster", "ingest", source, out, *FLAGS]
    proc = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # 1. SIGKILL the second node while it runs a shard task, after a few shards are in.
    deadline = time.monotonic() + 120
    while not (committed() >= 3 and running_shard_task(two_nodes.node_pids(1))):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
        time.sleep(0.05)
    assert two_nodes.kill_node(1)
    at_kill = committed()
    # 2. The head alone goes on (the lost node's tasks are retried there); then the driver is SIGKILLed.
    while committed() < at_kill + 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
        time.sleep(0.05)
    assert two_nodes.alive_nodes() == 1
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert committed() < NUM_ROWS // SHARD_SIZE and not fresh_s3().exists(out + "/manifest.json")

    # 3. The node returns; the same command resumes, on both nodes, and ends byte-identical to a plain run.
    two_nodes.start_node(1)
    assert main(["ingest", source, out, *FLAGS]) == 0
    printed = capsys.readouterr().out
    by_node = printed.split("shard tasks by Ray node: ", 1)[1].splitlines()[0].split(", ")
    assert len(by_node) == 2, printed  # both nodes wrote shards
    expected = {os.path.relpath(p, reference): Path(p).read_bytes() for p in map(str, Path(reference).rglob("*"))
                if Path(p).is_file()}
    assert tree_bytes(out) == expected
    assert main(["ingest", "--verify", out]) == 0
