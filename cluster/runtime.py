"""The Ray runtime for training: one launcher, Ray Train's TorchTrainer around a plain-PyTorch function.

pretrain and finetune expose `*_from_dict(cfg_dict)` functions that run anywhere (alone, torchrun,
here). This module runs one of them on `num_workers` Ray Train workers, each with a torch process
group already set up (gloo on CPU, NCCL with use_gpu). `FailureConfig(max_failures)` restarts the
worker group after a worker dies; the function resumes itself from the newest checkpoint in its
run dir, so Ray's own checkpoint tracking is not used.

    with ray_session(None):                      # local Ray; or an address such as "ray://head:10001"
        summary = run_torch_trainer("pretrain.train:train_from_dict", cfg_dict, num_workers=2,
                                    use_gpu=False, max_failures=1, storage_url=run_dir, name="pretrain")
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import logging
import os
import tempfile
from typing import Any, Callable, Iterator

import ray

from data_pipeline import ALLOCATOR_ENV

# Ray Train (and through it torch, seconds to import) is imported where a trainer runs, not here:
# `ray_session` also serves `megaclass ingest`, whose driver and Ray workers never need torch.

log = logging.getLogger(__name__)

# The environment of every Ray worker: the allocator settings (data_pipeline.ALLOCATOR_ENV).
WORKER_ENV = dict(ALLOCATOR_ENV)


@contextlib.contextmanager
def ray_session(address: str | None, *, num_cpus: int | None = None, log_to_driver: bool = True,
                dashboard: bool = True) -> Iterator[None]:
    """Use an initialised Ray, join the cluster at `address` (else $RAY_ADDRESS), or start a local Ray.

    A joined cluster keeps its own token authentication (RAY_AUTH_TOKEN / ~/.ray/auth_token).
    A local Ray for training keeps its dashboard: Ray Train's controller watches its actors through
    the state API that the dashboard serves (without it, it logs a warning every few seconds).
    """
    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS") or None  # Ray's own convention for "join this cluster"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict[str, Any] = {"address": address} if address else {
        "include_dashboard": dashboard, "dashboard_host": "127.0.0.1", "num_cpus": num_cpus}
    ray.init(runtime_env={"env_vars": WORKER_ENV}, log_to_driver=log_to_driver, **kwargs)
    try:
        yield
    finally:
        ray.shutdown()


def _resolve(train_fn_name: str) -> Callable[..., Any]:
    module_name, _, function_name = train_fn_name.partition(":")
    if not function_name:
        raise ValueError(f"train_fn_name {train_fn_name!r}: expected 'module.path:function'")
    return getattr(importlib.import_module(module_name), function_name)


def _plain(value: Any) -> Any:
    """Keep what Ray can report as metrics (numbers, strings, bools, nested dicts/lists of them)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


def _worker_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: call the training function, report its summary last."""
    import ray.train

    for name, value in WORKER_ENV.items():
        os.environ.setdefault(name, value)
    fn = _resolve(config["train_fn_name"])
    kwargs = {}
    if "report" in inspect.signature(fn).parameters:  # every rank reports (ray.train.report is a barrier)
        kwargs["report"] = lambda metrics: ray.train.report(_plain(metrics))
    summary = _plain(fn(config["cfg"], **kwargs))
    summary = summary if isinstance(summary, dict) else {"result": summary}
    # Ray Train hands the driver only metrics attached to a checkpoint, so rank 0 attaches a tiny one
    # (summary.json under STORAGE/NAME/); the model checkpoints live in the run dir, not here.
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            with open(os.path.join(tmp, "summary.json"), "w") as f:
                json.dump(summary, f)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(summary, checkpoint=checkpoint)


def run_torch_trainer(train_fn_name: str, cfg_dict: dict[str, Any], *, num_workers: int, use_gpu: bool,
                      max_failures: int, storage_url: str, name: str, cpus_per_worker: float = 1.0,
                      min_workers: int = 0) -> dict[str, Any]:
    """Run `train_fn(cfg_dict)` on a Ray Train worker group; returns rank 0's summary (its return value).

    storage_url: where Ray Train keeps its own run state (STORAGE/NAME); pass the run dir.
    min_workers: 0 = exactly num_workers; else Ray Train's elastic mode, which (re)starts the group with
    as many workers as the cluster can hold, between min_workers and num_workers; the training function
    sees the world size it got and keeps its global batch (pretrain: scaling.min_workers).
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    _resolve(train_fn_name)  # fail here, not in every worker
    storage_path = storage_url if "://" in storage_url else os.path.abspath(storage_url)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"train_fn_name": train_fn_name, "cfg": cfg_dict},
        scaling_config=ScalingConfig(num_workers=(min_workers, num_workers) if 0 < min_workers < num_workers
                                     else num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(storage_path=storage_path, name=name,
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return dict(result.metrics or {})
