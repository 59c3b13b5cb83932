"""The Ray runner, the local process runner and the CLI: task per shard, worker SIGKILL retried,
driver SIGKILL resumed (and its local workers gone with it).

Every run must end byte-identical to the plain (no Ray) run of the same plan: shards, index
parts, classes.parquet, manifest.json and _info.json.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from cluster.cli import main as cli_main
from cluster.ingest_runner import run_ingest, uses_ray
from data_pipeline.config import ConfigError, replace
from data_pipeline.ingest import IngestConfig, IngestError, finalize, plan_shards, write_shard
from tests.conftest import solid_jpeg

ROOT = Path(__file__).resolve().parents[1]
NUM_ROWS = 24
FLAGS = ["--allow-network", "127.0.0.0/8", "--shard-size", "4", "--threads", "1", "--image-size", "32",
         "--timeout-s", "5"]
CFG = replace(IngestConfig(), ["fetch.allow_networks=[127.0.0.0/8]", "output.shard_size=4", "fetch.threads=1",
                               "image.image_size=32", "fetch.timeout_s=5", "runtime.progress=false"])


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def slow_source(tmp_path_factory, http_server):
    """24 images served with a delay, so a run lasts long enough to be killed in the middle."""
    tmp = tmp_path_factory.mktemp("src")
    server = http_server
    urls = []
    for i in range(NUM_ROWS):
        jpg = solid_jpeg(48 + i, 40, (i * 10 % 255, 100, 50), quality=85)
        urls.append(server.add(f"/img{i}.jpg", jpg, delay_s=0.25))
    urls[5] = server.url("/missing.jpg")
    pq.write_table(pa.table({"url": urls, "label": [f"class{i % 5}" for i in range(NUM_ROWS)]}),
                   str(tmp / "src.parquet"))
    reference = str(tmp / "reference")
    plan = plan_shards(str(tmp / "src.parquet"), reference, CFG)
    finalize(plan, [write_shard(plan.task(i), CFG) for i in range(plan.num_tasks)], CFG)
    yield str(tmp / "src.parquet"), Path(reference)


def dataset_files(root: Path) -> dict[str, bytes]:
    """The dataset's files; report/ (written by the runner after the dataset) names its location, so it differs."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] != "report"}


def assert_identical(a: Path, b: Path) -> None:
    files_a, files_b = dataset_files(a), dataset_files(b)
    assert sorted(files_a) == sorted(files_b)
    assert len([n for n in files_a if n.startswith("shards/")]) >= 5
    for name in files_a:
        assert files_a[name] == files_b[name], name


def pids_where(match) -> list[int]:
    """Live processes whose /proc entry satisfies `match` (one that ends while we look is skipped)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if match(entry):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def task_worker_pids() -> list[int]:
    """Ray workers currently running a shard task (Ray sets their process title)."""
    return pids_where(lambda entry: (entry / "cmdline").read_bytes().startswith(b"ray::_write_shard_task"))


def child_pids(parent: int) -> list[int]:
    """Processes whose parent is `parent` ("pid (comm) state ppid ...": split after the last ')')."""
    return pids_where(lambda entry: int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent)


def kill_first(find, timeout_s: float) -> tuple[threading.Thread, list[int]]:
    """A started thread that SIGKILLs the first pid `find()` returns, once, and the list of what it killed."""
    killed: list[int] = []

    def watch():
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not killed:
            pids = find()
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.05)

    thread = threading.Thread(target=watch)
    thread.start()
    return thread, killed


def test_executor_choice(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not uses_ray(CFG)  # one machine, no cluster given: local processes, no Ray to start
    assert uses_ray(replace(CFG, ["runtime.ray_address=ray://head:10001"]))
    assert uses_ray(replace(CFG, ["runtime.executor=ray"]))
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    assert uses_ray(CFG) and not uses_ray(replace(CFG, ["runtime.executor=local"]))
    with pytest.raises(ConfigError, match="runtime.executor: must be one of auto, ray, local"):
        replace(CFG, ["runtime.executor=threads"])


def test_local_run_equals_plain_run_and_survives_worker_sigkill(slow_source, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    source, reference = slow_source
    # once planned (index/ exists) the workers are busy with shard tasks: kill one of them
    killer, killed = kill_first(lambda: child_pids(os.getpid()) if (tmp_path / "out" / "index").is_dir() else [], 60)
    manifest = run_ingest(source, str(tmp_path / "out"), replace(CFG, ["runtime.executor=local"]))
    killer.join()
    assert killed, "no local worker was running to kill"
    assert not ray.is_initialized()
    assert manifest["totals"]["train"]["rows"] == NUM_ROWS and manifest["totals"]["train"]["ok"] == NUM_ROWS - 1
    assert_identical(reference, tmp_path / "out")


def test_local_task_failing_every_time_stops_the_run_naming_its_shard(slow_source, tmp_path):
    source, _ = slow_source
    out = tmp_path / "out"
    out.mkdir()
    (out / "shards").write_text("a file where the shard folder belongs")  # every shard write: OSError
    cfg = replace(CFG, ["runtime.executor=local", "runtime.max_task_retries=1"])
    with pytest.raises(IngestError, match=r"shard task \d+ \(.*train-\d+.tar\) failed 2 times; last: \w*Error"):
        run_ingest(source, str(out), cfg)


def test_ray_run_equals_plain_run_and_survives_worker_sigkill(local_ray, slow_source, tmp_path):
    source, reference = slow_source
    killer, killed = kill_first(task_worker_pids, 180)  # Ray start-up on a busy 2-core machine can take minutes
    manifest = run_ingest(source, str(tmp_path / "out"), CFG)
    killer.join()
    assert killed, "no shard task was running to kill"
    assert manifest["totals"]["train"]["rows"] == NUM_ROWS and manifest["totals"]["train"]["ok"] == NUM_ROWS - 1
    assert_identical(reference, tmp_path / "out")
    assert "http_404" in (tmp_path / "out" / "report" / "index.html").read_text()


@pytest.mark.slow
def test_cli_resumes_after_driver_sigkill_byte_identical(slow_source, tmp_path, capsys):
    source, reference = slow_source
    out = tmp_path / "out"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "cluster", "ingest", source, str(out), *FLAGS, "--no-progress"]
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((out / "index").glob("part-*.parquet")):
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.05)
    workers = child_pids(proc.pid)
    assert workers, "the local executor's workers should be children of the command"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in workers):
        time.sleep(0.05)
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers), "workers outlived the killed driver"
    committed = len(list((out / "index").glob("part-*.parquet")))
    assert 1 <= committed < NUM_ROWS // 4 and not (out / "manifest.json").exists()

    rerun = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "split" in rerun.stdout and f"{NUM_ROWS} rows" in rerun.stdout
    assert f"report: {out}/report/index.html" in rerun.stdout and (out / "report" / "report.json").exists()
    assert_identical(reference, out)
    # --verify through the same CLI entry point, in this process (no Ray, no new interpreter needed)
    capsys.readouterr()
    assert cli_main(["ingest", "--verify", str(out)]) == 0 and "OK" in capsys.readouterr().out

    shard = out / "shards" / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:-1024])
    assert cli_main(["ingest", "--verify", str(out)]) == 1 and "train-000001.tar" in capsys.readouterr().out
