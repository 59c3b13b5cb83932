"""A multi-node Ray cluster and an S3 API server on this machine, as real as they get without a second host.

`megaclass simulate --storage s3 --nodes 2` and the test suite run the pipeline against these:

    with S3Server() as s3, LocalRayCluster(num_nodes=2, env=s3.env) as cluster:
        env = {**s3.env, **cluster.env}      # AWS_ENDPOINT_URL..., RAY_ADDRESS, RAY_AUTH_TOKEN
        cluster.kill_node(1)                 # SIGKILL the second node's raylet and workers
        cluster.start_node(1)                # and bring it back

S3Server is moto's standalone server (`python -m moto.server`) on 127.0.0.1; s3fs reaches it through
AWS_ENDPOINT_URL, exactly as it reaches MinIO or any other S3 API. LocalRayCluster runs `ray start --head`
and `ray start --address` (one CPU each by default, token authentication on, every port free-picked),
each node in its own process session, so that a node is stopped, or killed, by signalling exactly the
processes of its session: the raylet, its workers and its agents, and nothing else on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

BIN_DIR = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_pids(sid: int) -> list[int]:
    """Processes of process session `sid` (this process excluded)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended while we looked
        if int(fields[3]) == sid and int(entry.name) != os.getpid():
            pids.append(int(entry.name))
    return pids


def signal_session(sid: int, sig: int, wait_s: float) -> bool:
    """Send `sig` to every process of session `sid`; True when none is left within `wait_s`."""
    for pid in session_pids(sid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass  # already gone
    deadline = time.monotonic() + wait_s
    while session_pids(sid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def stop_session(sid: int, grace_s: float = 3.0) -> None:
    if not signal_session(sid, signal.SIGTERM, grace_s):
        signal_session(sid, signal.SIGKILL, 5.0)


class S3Server:
    """moto's S3 API server on 127.0.0.1 with a bucket; `env` points boto/s3fs clients at it."""

    def __init__(self, bucket: str = "megaclass", workdir: str | None = None):
        self.bucket = bucket
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="mcs3-"))
        self.port = 0
        self._proc: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        # Static credentials: moto accepts any; AWS_EC2_METADATA_DISABLED keeps botocore off the network.
        return {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ACCESS_KEY_ID": "megaclass",
                "AWS_SECRET_ACCESS_KEY": "megaclass-secret", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def url(self, *parts: str) -> str:
        return "s3://" + "/".join([self.bucket, *(p.strip("/") for p in parts)])

    def start(self, timeout_s: float = 60.0) -> "S3Server":
        try:
            import moto.server  # noqa: F401  (checked here for one clear message)
        except ImportError:
            raise RuntimeError("the S3 API server needs moto (s3), flask, flask-cors and s3fs: pip install 'megaclass[dev]'") from None
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a free port can be taken between the probe and the bind
            self.port = free_port()
            log = open(self.workdir / "moto.log", "ab")
            self._proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            log.close()
            if self._wait_up(timeout_s):
                break
            self.stop()
        else:
            raise RuntimeError(f"the S3 API server did not start; see {self.workdir / 'moto.log'}")
        request = urllib.request.Request(f"{self.endpoint_url}/{self.bucket}", method="PUT")
        urllib.request.urlopen(request, timeout=10).close()  # moto accepts an unsigned bucket creation
        return self

    def _wait_up(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                urllib.request.urlopen(self.endpoint_url, timeout=5).close()
                return True
            except OSError:  # refused, reset, or a first response slower than the probe's timeout
                time.sleep(0.1)
        return False

    def stop(self) -> None:
        if self._proc is not None:  # in-memory test server: nothing to flush, so no grace period
            signal_session(self._proc.pid, signal.SIGKILL, 10.0)
            self._proc.wait(timeout=10)
            self._proc = None

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


class LocalRayCluster:
    """`ray start --head` plus `num_nodes - 1` `ray start --address` nodes on 127.0.0.1, token auth on.

    `env` is what a client needs: RAY_ADDRESS (host:port of the GCS), RAY_AUTH_TOKEN, RAY_AUTH_MODE.
    `extra_env` reaches every node's processes (e.g. the S3 endpoint and credentials).
    Node failure is noticed by the head within about `health_check_s` seconds (Ray's default is ~30 s).
    """

    def __init__(self, num_nodes: int = 2, *, cpus_per_node: int = 1, extra_env: dict[str, str] | None = None,
                 workdir: str | None = None, health_check_s: float = 3.0, object_store_bytes: int = 100_000_000):
        if num_nodes < 1:
            raise ValueError(f"num_nodes: {num_nodes} (must be >= 1)")
        self.num_nodes = num_nodes
        self.cpus_per_node = cpus_per_node
        # Ray's socket paths must fit in 107 bytes: keep the temp dir short.
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="mcr-", dir="/tmp"))
        self.token = secrets.token_hex(32)
        self.gcs_port = 0
        self.dashboard_port = 0
        self.object_store_bytes = object_store_bytes
        period_ms = max(200, int(health_check_s * 1000 / 3))
        self.node_env = {
            **os.environ, **(extra_env or {}),
            "HOME": str(self.workdir / "home"), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_health_check_period_ms": str(period_ms), "RAY_health_check_timeout_ms": str(period_ms),
            "RAY_health_check_failure_threshold": "3",
            # HOME is the cluster's own (its token stays out of the user's ~/.ray), but the caches stay the
            # user's: matplotlib would otherwise rebuild its font list in every run's plotting worker.
            "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache"),
        }
        self.node_env.pop("RAY_ADDRESS", None)
        self._sessions: dict[int, int] = {}  # node index -> session id of its `ray start`

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def env(self) -> dict[str, str]:
        return {"RAY_ADDRESS": self.address, "RAY_AUTH_TOKEN": self.token, "RAY_AUTH_MODE": "token"}

    def _node_args(self) -> list[str]:
        return ["--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus_per_node}", "--num-gpus=0",
                f"--object-store-memory={self.object_store_bytes}", f"--node-manager-port={free_port()}",
                f"--object-manager-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                f"--metrics-export-port={free_port()}", "--disable-usage-stats"]

    def _ray_start(self, index: int, args: list[str], attempts: int = 3) -> None:
        """`ray start` in a session of its own. Ray gives a node 30 s to register with the GCS, which an
        overloaded machine can miss while the node's raylet goes on and registers a little later: a
        worker node counts as started once the head sees it alive. Otherwise the node's leftovers are
        stopped and it is started once more."""
        (self.workdir / "home").mkdir(parents=True, exist_ok=True)
        for attempt in range(1, attempts + 1):
            with open(self.workdir / f"node-{index}.log", "ab") as log:
                proc = subprocess.Popen([str(BIN_DIR / "ray"), "start", *args, *self._node_args()], env=self.node_env,
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            self._sessions[index] = proc.pid
            if proc.wait(timeout=180) == 0:
                return
            if index > 0 and self.node_pids(index):
                try:  # every node we run, this one included
                    self.wait_for_nodes(len(self._sessions), timeout_s=60.0)
                    return
                except RuntimeError:
                    pass
            stop_session(self._sessions.pop(index))
        raise RuntimeError(f"ray start of node {index} failed {attempts} times: {self.log_tail(index)}")

    def log_tail(self, index: int) -> str:
        path = self.workdir / f"node-{index}.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def start(self) -> "LocalRayCluster":
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self._ray_start(0, ["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                            f"--dashboard-port={self.dashboard_port}", "--include-dashboard=true",
                            f"--ray-client-server-port={free_port()}", f"--temp-dir={self.workdir / 'ray'}"])
        for index in range(1, self.num_nodes):
            self.start_node(index, wait=False)
        self.wait_for_nodes(self.num_nodes)
        return self

    def start_node(self, index: int, wait: bool = True) -> None:
        """Start (or start again) worker node `index` (1..num_nodes-1)."""
        if not 1 <= index < self.num_nodes:
            raise ValueError(f"node {index}: worker nodes are 1..{self.num_nodes - 1}")
        self._ray_start(index, [f"--address={self.address}"])
        if wait:  # the nodes we run: a node killed just now counts once the head has noticed its death
            self.wait_for_nodes(len(self._sessions))

    def restore(self) -> None:
        """Start again every worker node that is not running, and wait until all `num_nodes` are alive."""
        for index in range(1, self.num_nodes):
            if index in self._sessions and self.node_pids(index):
                continue
            if index in self._sessions:  # its processes are gone: whatever is left of the session goes too
                stop_session(self._sessions.pop(index))
            self._ray_start(index, [f"--address={self.address}"])
        self.wait_for_nodes(self.num_nodes)

    def node_pids(self, index: int) -> list[int]:
        sid = self._sessions.get(index)
        return session_pids(sid) if sid is not None else []

    def kill_node(self, index: int) -> list[int]:
        """SIGKILL every process of node `index` (raylet, workers, agents) at once; returns their pids."""
        if index == 0:
            raise ValueError("node 0 is the head; killing it ends the cluster")
        pids = self.node_pids(index)
        signal_session(self._sessions.pop(index), signal.SIGKILL, 10.0)
        return pids

    def nodes(self) -> list[dict]:
        """The head's view of the nodes (node_id, is_head_node, state, ...) from its state API."""
        request = urllib.request.Request(f"{self.dashboard_url}/api/v0/nodes?limit=1000",
                                         headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())["data"]["result"]["result"]

    def alive_nodes(self) -> int:
        try:
            return sum(1 for node in self.nodes() if node["state"] == "ALIVE")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return 0  # the dashboard is still starting

    def wait_for_nodes(self, count: int, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while (alive := self.alive_nodes()) != count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{alive} Ray nodes alive after {timeout_s:.0f} s, expected {count}")
            time.sleep(0.5)

    def stop(self) -> None:
        for index in sorted(self._sessions, reverse=True):  # workers first, the head last
            stop_session(self._sessions.pop(index))

    def __enter__(self) -> "LocalRayCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


class NodeKiller:
    """Chaos for a LocalRayCluster: SIGKILL node `index` once `ready()` is true, once; then start it again
    after `restart_after_s` (None: leave it dead). start/stop/report like cluster.chaos.ProcessKiller."""

    def __init__(self, cluster: LocalRayCluster, index: int, ready, *, restart_after_s: float | None = None,
                 poll_s: float = 0.2):
        import threading

        self.cluster, self.index, self.ready = cluster, index, ready
        self.restart_after_s, self.poll_s = restart_after_s, poll_s
        self.killed: list[dict] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        started = time.monotonic()
        while not self._stop.wait(self.poll_s):
            try:
                if not self.ready():
                    continue
            except OSError:
                continue  # the store is busy or the file half-listed: look again
            pids = self.cluster.kill_node(self.index)
            record = {"pid": min(pids) if pids else 0, "process": f"Ray node {self.index}: {len(pids)} processes",
                      "at_s": round(time.monotonic() - started, 1)}
            self.killed.append(record)
            if self.restart_after_s is not None:
                time.sleep(self.restart_after_s)
                try:
                    self.cluster.start_node(self.index)
                    record["restarted_after_s"] = round(time.monotonic() - started - record["at_s"], 1)
                except RuntimeError as exc:
                    self.error = str(exc)[:300]
            return

    def start(self, root_pid: int | None = None) -> None:
        """Start watching; `root_pid` (the stage's process, as ProcessKiller takes it) is not needed:
        the node is the cluster's, whichever stage runs on it."""
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def report(self) -> dict:
        return {"pattern": f"Ray node {self.index}", "killed": self.killed, **({"error": self.error} if self.error else {})}


def running_task(pids: list[int], task_name: str) -> bool:
    """True when one of `pids` is a Ray worker running `task_name` now (Ray titles it `ray::NAME`)."""
    prefix = f"ray::{task_name}".encode()
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(prefix):
                return True
        except OSError:
            continue  # ended while we looked
    return False
