"""Experiment trackers: the run dir's records also sent to MLflow and/or Weights & Biases (rank 0 only).

    trackers = open_trackers(["mlflow", "wandb"], run_url, is_main=dist.is_main, config=to_dict(cfg),
                             options=cfg.log.tracking)
    trackers.log(step, {"loss": 2.3, "lr": 0.1}); trackers.log_artifact(run_url + "/curves.png"); trackers.close()

metrics.jsonl stays the source of truth; a tracker gets the same numbers at the same steps. Each
tracker package is imported only when its name is listed (`pip install megaclass[mlflow]`,
`megaclass[wandb]`). The id of every tracker run is kept in RUN/trackers.json, so a resumed run
(a restarted worker group, a re-run of the same command) continues the same tracker run instead of
starting a new one.

MLflow: $MLFLOW_TRACKING_URI or `log.mlflow_tracking_uri` when set; otherwise MLflow's embedded
SQLite store, in the run dir for a local run dir (RUN/mlflow.db, artifacts in RUN/mlartifacts/), and
MLflow's own default (./mlflow.db) for a remote one. The whole resolved config is logged as params
("section.field"), once, when the tracker run is created.
W&B: offline unless $WANDB_MODE or `log.wandb_mode` says otherwise; its files go to RUN/wandb/ for
a local run dir (`wandb sync RUN/wandb/offline-run-*` uploads them later).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import posixpath
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

import fsspec

from fsspec.implementations.local import LocalFileSystem

from data_pipeline.config import doc, require
from data_pipeline.dataset import atomic_write_json, join

log = logging.getLogger(__name__)

STATE_FILE = "trackers.json"
EXTERNAL = ("mlflow", "wandb")   # TensorBoard is written by the run dir itself
KNOWN = ("tensorboard", *EXTERNAL)
MLFLOW_PARAM_CHARS = 6000        # MLflow's limit on one param value
MLFLOW_BATCH = 100               # params per log_batch call (MLflow's limit)


@dataclass(frozen=True)
class TrackingSection:
    run_name: str | None = doc("tracker run name (default: the run dir's last path component)", None)
    mlflow_tracking_uri: str | None = doc("MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                          "sqlite RUN/mlflow.db for a local run dir, else MLflow's default)", None)
    mlflow_experiment: str = doc("MLflow experiment name", "megaclass")
    wandb_project: str = doc("W&B project", "megaclass")
    wandb_mode: str | None = doc("W&B mode: offline, online or disabled (default: $WANDB_MODE, else offline)", None)

    def validate(self) -> None:
        require(self.wandb_mode in (None, "offline", "online", "disabled"), "log.tracking.wandb_mode",
                "must be offline, online or disabled")
        require(bool(self.mlflow_experiment), "log.tracking.mlflow_experiment", "must not be empty")
        require(bool(self.wandb_project), "log.tracking.wandb_project", "must not be empty")


def check_tracker_names(names: list[str], field: str = "log.trackers") -> None:
    """ConfigError naming the field for an unknown tracker or one whose package is missing."""
    for name in names:
        require(name in KNOWN, field, f"unknown tracker {name!r} (known: {', '.join(KNOWN)})")
        if name in EXTERNAL:
            require(importlib.util.find_spec(name) is not None, field,
                    f"{name!r} is not installed (pip install 'megaclass[{name}]')")


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 0.1}} -> {"optim.lr": 0.1}."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def is_local(url: str) -> bool:
    return isinstance(fsspec.core.url_to_fs(url)[0], LocalFileSystem)


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracker(Protocol):
    def log(self, step: int, values: dict[str, float]) -> None: ...
    def log_artifact(self, local_path: str) -> None: ...
    def close(self, success: bool) -> None: ...


class MlflowTracker:
    """One MLflow run through MlflowClient (no global active run)."""

    def __init__(self, run_url: str, state: dict[str, Any], config: dict[str, Any], opts: TrackingSection,
                 run_name: str):
        from mlflow import MlflowClient

        # A run being continued lives where it was created; a new one goes where the options say.
        uri = state.get("tracking_uri") or opts.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        artifact_location = None
        if not uri and is_local(run_url):
            root = fsspec.core.url_to_fs(run_url)[1]
            uri = f"sqlite:///{os.path.abspath(join(root, 'mlflow.db'))}"
            artifact_location = os.path.abspath(join(root, "mlartifacts"))
        self.client = MlflowClient(tracking_uri=uri or None)
        self.tracking_uri = self.client.tracking_uri
        run_id = state.get("run_id")
        if run_id and self.client.get_run(run_id):
            self.client.update_run(run_id, status="RUNNING")
            log.info("mlflow: continuing run %s at %s", run_id, self.tracking_uri)
        else:
            experiment = self.client.get_experiment_by_name(opts.mlflow_experiment)
            experiment_id = (experiment.experiment_id if experiment else
                             self.client.create_experiment(opts.mlflow_experiment, artifact_location=artifact_location))
            run_id = self.client.create_run(experiment_id, run_name=run_name,
                                            tags={"megaclass.run_url": run_url}).info.run_id
            self._log_params(run_id, config)
        self.run_id = run_id

    def _log_params(self, run_id: str, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k, json.dumps(v) if not isinstance(v, str) else v)
                  for k, v in sorted(flatten(config).items())]
        params = [Param(p.key, p.value[:MLFLOW_PARAM_CHARS]) for p in params]
        for start in range(0, len(params), MLFLOW_BATCH):
            self.client.log_batch(run_id, params=params[start:start + MLFLOW_BATCH])

    def state(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id}

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def log_artifact(self, local_path: str) -> None:
        self.client.log_artifact(self.run_id, local_path)

    def close(self, success: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if success else "FAILED")


class WandbTracker:
    """One W&B run; offline by default, resumed by id."""

    def __init__(self, run_url: str, state: dict[str, Any], config: dict[str, Any], opts: TrackingSection,
                 run_name: str):
        import wandb

        mode = opts.wandb_mode or os.environ.get("WANDB_MODE") or "offline"
        directory = fsspec.core.url_to_fs(run_url)[1] if is_local(run_url) else None
        if directory:
            os.makedirs(directory, exist_ok=True)
        self.id = state.get("id") or uuid.uuid4().hex[:16]  # W&B run ids: lowercase letters and digits
        self.run = wandb.init(project=state.get("project", opts.wandb_project), name=run_name, id=self.id,
                              resume="allow", mode=mode, dir=directory, config=config,
                              settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))
        self.project = self.run.project

    def state(self) -> dict[str, Any]:
        return {"id": self.id, "project": self.project}

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def log_artifact(self, local_path: str) -> None:
        self.run.save(local_path, base_path=os.path.dirname(local_path), policy="now")

    def close(self, success: bool) -> None:
        self.run.finish(exit_code=0 if success else 1)


TRACKERS = {"mlflow": MlflowTracker, "wandb": WandbTracker}


class Trackers:
    """The external trackers of one run; on ranks other than 0 (or with none listed) every call is a no-op."""

    def __init__(self, run_url: str, trackers: dict[str, Tracker]):
        self.run_url, self.trackers = run_url, trackers

    def log(self, step: int, values: dict[str, Any]) -> None:
        numbers = _numbers(values)
        if numbers:
            for tracker in self.trackers.values():
                tracker.log(step, numbers)

    def log_artifact(self, url: str) -> None:
        """A file of the run dir (any fsspec URL) as an artifact of every tracker run."""
        if not self.trackers:
            return
        fs, path = fsspec.core.url_to_fs(url)
        if not fs.exists(path):
            return
        if is_local(url):
            for tracker in self.trackers.values():
                tracker.log_artifact(path)
            return
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, posixpath.basename(path))
            fs.get(path, local)
            for tracker in self.trackers.values():
                tracker.log_artifact(local)

    def close(self, success: bool = True) -> None:
        for tracker in self.trackers.values():
            tracker.close(success)
        self.trackers = {}


def read_state(run_url: str) -> dict[str, Any]:
    url = join(run_url, STATE_FILE)
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return {}
    try:
        state = json.loads(fs.cat_file(path))
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s is unreadable; starting new tracker runs", url)
        return {}
    return state if isinstance(state, dict) else {}


def open_trackers(names: list[str], run_url: str, *, is_main: bool, config: dict[str, Any],
                  options: TrackingSection = TrackingSection()) -> Trackers:
    """Start (or continue, from RUN/trackers.json) a run in every external tracker named in `names`."""
    wanted = [n for n in names if n in EXTERNAL]
    if not is_main or not wanted:
        return Trackers(run_url, {})
    state = read_state(run_url)
    run_name = options.run_name or posixpath.basename(run_url.rstrip("/")) or "megaclass"
    opened: dict[str, Tracker] = {}
    for name in wanted:
        entry = state.get(name) if isinstance(state.get(name), dict) else {}
        opened[name] = TRACKERS[name](run_url, entry, config, options, run_name)
        state[name] = opened[name].state()
    atomic_write_json(join(run_url, STATE_FILE), state)
    return Trackers(run_url, opened)


def log_evaluation(model_url: str, report_dir: str, metrics: dict[str, Any]) -> list[str]:
    """Attach an evaluation of RUN/final (or any RUN/<dir>) to RUN's tracker runs, when RUN has any.

    `metrics` are logged under "evaluate/<name>" at the checkpoint's step; report.json and confusion.png of
    `report_dir` become artifacts. Returns the trackers written to ([] for a model without a run dir
    with trackers, e.g. a registry version).
    """
    run_url = posixpath.dirname(str(model_url).rstrip("/"))
    state = read_state(run_url) if run_url else {}
    names = [name for name in EXTERNAL if isinstance(state.get(name), dict)]
    if not names:
        return []
    with fsspec.open(join(model_url, "config.json"), "r") as f:
        step = int((json.load(f).get("megaclass") or {}).get("step") or 0)
    trackers = open_trackers(names, run_url, is_main=True, config={})
    try:
        trackers.log(step, {f"evaluate/{k}": v for k, v in metrics.items()})
        for name in ("report.json", "confusion.png"):
            trackers.log_artifact(join(report_dir, name))
    finally:
        trackers.close()
    return names
