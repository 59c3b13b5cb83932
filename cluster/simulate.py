"""The whole pipeline, for real, on one machine: what `make demo` and `megaclass simulate` run.

1. web:      draws a many-class image set (cluster.synthetic) plus a handful of broken files,
             serves it over HTTP on 127.0.0.1, and writes a URL table pointing at it
2. ingest:   `megaclass ingest` of that table, one task per shard (local worker processes; the
             cluster's Ray with --nodes 2+)
3. pretrain: `megaclass pretrain` with DDP workers on a local Ray (Ray Train)
4. publish:  `megaclass registry publish` of the run's final/ checkpoint into a local registry
5. finetune: `megaclass finetune --checkpoint registry://NAME@latest` on a disjoint downstream set, and
             alongside it the same command with `--scratch --no-ray`: the baseline from random weights
6. evaluate: `megaclass evaluate` of both fine-tuned models on the downstream validation folder; the
             report gives both top-1 and the gain from pretraining in points
7. with --detection: `megaclass finetune --task detection` of the same published backbone on a COCO
   JSON set of several objects per cluttered image, then `megaclass evaluate` of the detector (COCO mAP)

Every stage is the real command in its own process, exactly as a user runs it. `--chaos` also
SIGKILLs one ingestion worker and one training worker mid-run; the report shows that ingestion
retried the task with every row accounted for and that training resumed from its last checkpoint
and reached its final step.

`--storage s3` puts the dataset, the run dirs and the registry in a bucket of an S3 API server (moto's,
on 127.0.0.1, reached through AWS_ENDPOINT_URL as any S3 API is); `--nodes N` runs ingestion and training
on a Ray cluster of N nodes (RAY_ADDRESS), and then `--chaos` SIGKILLs the second node instead (its raylet
and workers) during ingestion and after the first step checkpoint, and starts it again `node_restart_s` later.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cluster import synthetic, synthetic_detection
from cluster.chaos import ProcessKiller
from cluster.localcluster import LocalRayCluster, NodeKiller, S3Server, running_task
from cluster.simulation_report import build_report
from cluster.webserver import StaticServer
from data_pipeline import ALLOCATOR_ENV
from data_pipeline.config import ConfigError, doc, require
from pretrain.checkpoint import list_checkpoints

log = logging.getLogger(__name__)
CONFIG_DIR = Path(__file__).parent / "configs"
MARKER_FILE = ".megaclass-simulation"


@dataclass(frozen=True)
class WebSection:
    upstream_classes: int = doc("classes in the upstream (pretraining) web set", 100, ge=2)
    images_per_class: int = doc("upstream images per class", 12, ge=2)
    downstream_classes: int = doc("classes of the downstream set, disjoint from upstream", 10, ge=2)
    downstream_train_per_class: int = doc("downstream training images per class", 10, ge=1)
    downstream_val_per_class: int = doc("downstream validation images per class", 10, ge=1)
    seed: int = doc("seed of the drawn images", 0)
    detection_classes: int = doc("object classes of the detection set (with --detection)", 4, ge=1)
    detection_train_images: int = doc("detection training images (several objects each)", 64, ge=1)
    detection_val_images: int = doc("detection validation images", 24, ge=1)


@dataclass(frozen=True)
class SimulationConfig:
    web: WebSection = field(default_factory=WebSection)
    shard_size: int = doc("ingest rows per shard", 200, ge=1)
    pretrain_config: str = doc("pretrain YAML ('' = the embedded simulate-pretrain.yaml)", "")
    finetune_config: str = doc("finetune YAML ('' = the embedded simulate-finetune.yaml)", "")
    pretrain_overrides: list[str] = doc("extra --set overrides for pretrain", [])
    finetune_overrides: list[str] = doc("extra --set overrides for finetune", [])
    chaos: bool = doc("kill one ingestion worker and one training worker mid-run (with nodes > 1: the second node)",
                      False)
    detection: bool = doc("add the detection stages (finetune --task detection, evaluate with COCO mAP)", False)
    detection_config: str = doc("detection finetune YAML ('' = the embedded simulate-detection.yaml)", "")
    detection_overrides: list[str] = doc("extra --set overrides for the detection finetune", [])
    stage_timeout_s: float = doc("seconds before a stage is declared hung", 900.0)
    storage: str = doc("where dataset, run dirs and registry live: local (the workdir) or s3 (an S3 API server, "
                       "moto's, started for the simulation)", "local")
    nodes: int = doc("Ray nodes: 1 = a local Ray per training command (ingestion: local processes); 2+ = a "
                     "cluster of that many, 1 CPU each, started "
                     "for the simulation (ray start --head / --address, token auth)", 1)
    node_restart_s: float = doc("with chaos and nodes > 1: seconds before the killed node is started again", 10.0)

    def validate(self) -> None:
        require(self.storage in ("local", "s3"), "storage", f"must be local or s3, got {self.storage!r}")
        require(self.nodes >= 1, "nodes", "must be >= 1")
        require(self.node_restart_s >= 0, "node_restart_s", "must be >= 0")


# The broken inputs every simulation includes, with the reason ingestion must record for each.
BROKEN_FILES = {
    "broken/not-an-image.jpg": (b"<html>this is not an image</html>", "not_an_image"),
    "broken/tiny.jpg": (None, "too_small"),
    "broken/truncated.jpg": (None, "truncated"),
}
MISSING_URL = "broken/missing.jpg"


@dataclass
class _Running:
    """A stage's process while it runs."""
    name: str
    proc: subprocess.Popen
    out: Any
    log_path: Path
    started: float
    killer: ProcessKiller | None


@dataclass
class StageResult:
    name: str
    seconds: float
    details: dict = field(default_factory=dict)


class Simulation:
    """Runs the stages in order inside `workdir`, collecting what the report shows."""

    def __init__(self, cfg: SimulationConfig, workdir: str | Path):
        self.cfg = cfg
        self.workdir = Path(workdir).resolve()
        self.stages: list[StageResult] = []
        self.paths = {
            "web": self.workdir / "web",
            "downstream": self.workdir / "downstream",
            "source": self.workdir / "web-urls.parquet",
            "dataset": self.workdir / "dataset",
            "run": self.workdir / "runs" / "pretrain",
            "registry": self.workdir / "registry",
            "finetune": self.workdir / "runs" / "finetune",
            "finetune-scratch": self.workdir / "runs" / "finetune-scratch",
            "evaluation": self.workdir / "evaluation",
            "evaluation-scratch": self.workdir / "evaluation-scratch",
            "detection": self.workdir / "detection",
            "detector": self.workdir / "runs" / "detection",
            "detection_evaluation": self.workdir / "evaluation-detection",
        }
        self.env = dict(os.environ)
        self.env.update({
            "MEGACLASS_REGISTRY": str(self.paths["registry"]), **ALLOCATOR_ENV, "RAY_USAGE_STATS_ENABLED": "0",
        })

    # -- stages ---------------------------------------------------------------------------------

    def make_web(self) -> None:
        web = self.cfg.web
        upstream, downstream = synthetic.split_classes(web.upstream_classes, web.downstream_classes, web.seed)
        written = synthetic.write_image_folder(self.paths["web"] / "up", upstream, web.images_per_class,
                                               seed=web.seed, sizes=((64, 64), (96, 72), (300, 240)))
        synthetic.write_image_folder(self.paths["downstream"] / "train", downstream,
                                     web.downstream_train_per_class, seed=web.seed + 1)
        synthetic.write_image_folder(self.paths["downstream"] / "val", downstream,
                                     web.downstream_val_per_class, seed=web.seed + 2)
        for rel, (payload, _) in BROKEN_FILES.items():
            path = self.paths["web"] / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if payload is None and "tiny" in rel:
                payload = synthetic.jpeg_bytes(synthetic.render(upstream[0], 0, (8, 8)))
            elif payload is None:
                payload = synthetic.jpeg_bytes(synthetic.render(upstream[0], 1, (200, 200)))[:700]
            path.write_bytes(payload)
        if self.cfg.detection:
            classes = synthetic_detection.detection_classes(web.detection_classes, web.seed)
            synthetic_detection.write_coco_set(self.paths["detection"] / "train", classes, web.detection_train_images,
                                               seed=web.seed + 1)
            synthetic_detection.write_coco_set(self.paths["detection"] / "val", classes, web.detection_val_images,
                                               seed=web.seed + 2)
        self._web_rows = [(str(p.relative_to(self.paths["web"])), label) for p, label in written]
        self._broken_rows = [(rel, "broken") for rel in (*BROKEN_FILES, MISSING_URL)]

    def write_source(self, base_url: str) -> int:
        rows = self._web_rows + self._broken_rows
        # One duplicate URL: ingestion must skip it with a reason, not download it twice.
        rows.append(self._web_rows[0])
        table = pa.table({"url": [f"{base_url}/{rel}" for rel, _ in rows], "label": [lab for _, lab in rows]})
        pq.write_table(table, self.paths["source"])
        return table.num_rows

    def run_stage(self, name: str, args: list[str], killer: ProcessKiller | None = None) -> StageResult:
        return self.wait_stage(self.start_stage(name, args, killer))

    def start_stage(self, name: str, args: list[str], killer: ProcessKiller | None = None) -> "_Running":
        cmd = [sys.executable, "-m", "cluster", *args]
        log.info("stage %s: megaclass %s", name, " ".join(args))
        log_path = self.workdir / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(log_path, "wb")
        running = _Running(name, subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                                  cwd=self.workdir), out, log_path, time.perf_counter(), killer)
        if killer is not None:
            killer.start(running.proc.pid)
        return running

    def wait_stage(self, running: "_Running") -> StageResult:
        try:
            code = running.proc.wait(timeout=max(1.0, self.cfg.stage_timeout_s - (time.perf_counter() - running.started)))
        except subprocess.TimeoutExpired:
            running.proc.kill()
            running.proc.wait()
            code = -1
        finally:
            running.out.close()
            if running.killer is not None:
                running.killer.stop()
        result = StageResult(running.name, time.perf_counter() - running.started, {"log": str(running.log_path)})
        if running.killer is not None:
            result.details["chaos"] = running.killer.report()
        self.stages.append(result)
        if code != 0:
            tail = running.log_path.read_text(errors="replace").splitlines()[-25:]
            raise RuntimeError(f"stage {running.name} failed (exit {code}); last lines of {running.log_path}:\n"
                               + "\n".join(tail))
        return result

    def prepare_workdir(self) -> None:
        """Start from an empty workdir; a previous simulation's (it carries the marker) is replaced."""
        marker = self.workdir / MARKER_FILE
        if self.workdir.exists() and any(self.workdir.iterdir()):
            if not marker.exists():
                raise ConfigError(f"--workdir {self.workdir}: not empty and not a previous simulation; "
                                  "choose a new or empty folder")
            shutil.rmtree(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        marker.write_text("created by megaclass simulate; the next simulation here replaces this folder\n")

    def run(self) -> dict:
        self.prepare_workdir()
        with contextlib.ExitStack() as stack:
            if self.cfg.storage == "s3":
                s3 = stack.enter_context(S3Server(bucket="megaclass-sim"))
                stack.enter_context(_environ(s3.env))  # this process reads the report back from the bucket
                self.env.update(s3.env)
                for name in ("dataset", "run", "registry", "finetune"):
                    self.paths[name] = s3.url(*self.paths[name].relative_to(self.workdir).parts)
                self.env["MEGACLASS_REGISTRY"] = self.paths["registry"]
            cluster = None
            if self.cfg.nodes > 1:
                cluster = stack.enter_context(LocalRayCluster(self.cfg.nodes, cpus_per_node=1,
                                                              extra_env={k: v for k, v in self.env.items()
                                                                         if k.startswith("AWS_")}))
                self.env.update(cluster.env)
            return self._run_stages(cluster)

    def _killers(self, cluster: LocalRayCluster | None):
        """(ingest killer, pretrain killer) for --chaos, else (None, None)."""
        if not self.cfg.chaos:
            return None, None
        run_url = str(self.paths["run"])
        if cluster is not None:
            return (NodeKiller(cluster, 1, lambda: running_task(cluster.node_pids(1), "_write_shard_task"),
                               restart_after_s=0.0),
                    NodeKiller(cluster, 1, lambda: bool(list_checkpoints(run_url)),
                               restart_after_s=self.cfg.node_restart_s))
        # one machine: ingestion's local worker processes (forked, so they carry the command's own command line)
        return ProcessKiller("-m cluster ingest", after_s=0.0), _AfterCheckpoint("RayTrainWorker", run_url)

    def _run_stages(self, cluster: LocalRayCluster | None) -> dict:
        started = time.perf_counter()
        self.make_web()
        ingest_killer, pretrain_killer = self._killers(cluster)
        with StaticServer(self.paths["web"]) as server:
            num_rows = self.write_source(server.base_url)
            self.run_stage("ingest", ["ingest", str(self.paths["source"]), str(self.paths["dataset"]),
                                      "--allow-network", "127.0.0.0/8", "--shard-size", str(self.cfg.shard_size),
                                      "--val-fraction", "0.1", "--image-size", "96", "--no-progress"], ingest_killer)
        self.stages[-1].details["rows"] = num_rows
        pretrain_cfg = self.cfg.pretrain_config or str(CONFIG_DIR / "simulate-pretrain.yaml")
        restarts = 2 if cluster is not None else 1  # a lost node: the group dies with it, and may fail once more on restart
        self.run_stage("pretrain", ["pretrain", "--config", pretrain_cfg,
                                    "--set", f"data.url={self.paths['dataset']}",
                                    "--set", f"checkpoint.url={self.paths['run']}",
                                    *(a for o in self.cfg.pretrain_overrides for a in ("--set", o))]
                       + (["--set", f"scaling.max_failures={restarts}"] if self.cfg.chaos else []), pretrain_killer)
        self.run_stage("publish", ["registry", "publish", posixpath.join(str(self.paths["run"]), "final"),
                                   "--name", "sim-backbone", "--registry", str(self.paths["registry"])])
        finetune_cfg = self.cfg.finetune_config or str(CONFIG_DIR / "simulate-finetune.yaml")
        finetune_args = ["finetune", "--checkpoint", "registry://sim-backbone@latest",
                         "--registry", str(self.paths["registry"]), "--train", str(self.paths["downstream"] / "train"),
                         "--val", str(self.paths["downstream"] / "val"), "--config", finetune_cfg,
                         *(a for o in self.cfg.finetune_overrides for a in ("--set", o))]
        # The baseline: the same fine-tune from random weights (--scratch), in parallel on the other core
        # (--no-ray: one rank in its own process), so the report can say what pretraining was worth.
        baseline = self.start_stage("finetune-scratch", [*finetune_args, "--scratch", "--no-ray", "--set",
                                                         f"checkpoint.url={self.paths['finetune-scratch']}"])
        try:
            self.run_stage("finetune", [*finetune_args, "--set", f"checkpoint.url={self.paths['finetune']}"])
        finally:
            self.wait_stage(baseline)
        scratch_eval = self.start_stage("evaluate-scratch", [
            "evaluate", str(self.paths["finetune-scratch"] / "final"), str(self.paths["downstream"] / "val"),
            "--out", str(self.paths["evaluation-scratch"])])
        try:
            self.run_stage("evaluate", ["evaluate", posixpath.join(str(self.paths["finetune"]), "final"),
                                        str(self.paths["downstream"] / "val"), "--out", str(self.paths["evaluation"])])
        finally:
            self.wait_stage(scratch_eval)
        if self.cfg.detection:
            self.run_detection()
        return build_report(self, time.perf_counter() - started)

    def run_detection(self) -> None:
        detection_cfg = self.cfg.detection_config or str(CONFIG_DIR / "simulate-detection.yaml")
        data = self.paths["detection"]
        self.run_stage("detection", ["finetune", "--task", "detection", "--checkpoint", "registry://sim-backbone@latest",
                                     "--train", str(data / "train" / "instances.json"),
                                     "--val", str(data / "val" / "instances.json"), "--config", detection_cfg,
                                     "--set", f"checkpoint.url={self.paths['detector']}",
                                     "--set", f"data.cache_url={self.workdir / 'cache'}",
                                     *(a for o in self.cfg.detection_overrides for a in ("--set", o))])
        self.run_stage("evaluate-detection", ["evaluate", str(self.paths["detector"] / "final"),
                                              str(data / "val" / "instances.json"),
                                              "--out", str(self.paths["detection_evaluation"])])


class _AfterCheckpoint(ProcessKiller):
    """A ProcessKiller that fires once the run dir (any fsspec URL) holds a complete step checkpoint."""

    def __init__(self, pattern: str, run_url: str):
        super().__init__(pattern)
        self.run_url = run_url

    def _ready(self, started: float) -> bool:
        try:
            return bool(list_checkpoints(self.run_url))
        except OSError:
            return False  # listed while being written: look again


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
