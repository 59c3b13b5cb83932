"""`megaclass pretrain [--data DATASET] [--out RUN] --config FILE [--set k=v] [--ray-address ADDR] [--no-ray]`.

A dataset -> a run dir. Options: defaults < --config FILE.yaml < --data/--out < --set section.field=value.

Runs pretrain.train on `scaling.num_workers` Ray Train workers: a local Ray without --ray-address,
the cluster at ADDR with it. --no-ray runs the same training function in this process (one worker,
for debugging). Config mistakes exit 2 before Ray starts; a run checkpoint that fails
verification (checksums, or a train_state that is not plain tensors) exits 1, naming the file.
"""

from __future__ import annotations

import argparse
import logging
import sys

from cluster.commands import add_config_arguments, check_local_gpus, config_from_args, print_options
from data_pipeline.config import to_dict
from pretrain.checkpoint import CheckpointError
from pretrain.config import PretrainConfig
from pretrain.run import check_data, check_resume

NAME = "pretrain"
HELP = "pretrain a backbone with a sharded 100k-class head on a dataset (Ray Train, DDP)"
log = logging.getLogger(__name__)


# flag -> config key; each flag sets exactly one field.
FLAGS = {"data": "data.url", "out": "checkpoint.url"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="dataset URL written by megaclass ingest (data.url)")
    parser.add_argument("--out", help="run dir (checkpoint.url): config.yaml, metrics.jsonl, step-N/, final/")
    add_config_arguments(parser, "YAML config (see configs/pretrain_*.yaml and docs/pretrain.md)")
    parser.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting a local Ray")
    parser.add_argument("--no-ray", action="store_true", help="train in this process (one worker), without Ray")


def run(args: argparse.Namespace) -> int:
    if args.list_options:
        return print_options(PretrainConfig)
    # ConfigError -> exit 2, before Ray starts
    cfg = config_from_args(PretrainConfig, args, FLAGS, {"scaling.num_workers": 1 if args.no_ray else None})
    check_local_gpus(cfg.scaling, args.ray_address)
    check_data(cfg)  # an unreadable dataset or unknown split too
    try:
        check_resume(cfg)  # a damaged or hostile run checkpoint to resume from
    except CheckpointError as exc:
        print(f"megaclass pretrain: error: {exc}", file=sys.stderr)
        return 1
    if args.no_ray:
        from pretrain.train import train
        summary = train(cfg)
    else:
        from ray.train import TrainingFailedError

        from cluster.runtime import ray_session, run_torch_trainer
        try:
            with ray_session(args.ray_address):
                summary = run_torch_trainer("pretrain.train:train_from_dict", to_dict(cfg),
                                            num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                            max_failures=cfg.scaling.max_failures, storage_url=cfg.checkpoint.url,
                                            name="ray", cpus_per_worker=cfg.scaling.cpus_per_worker,
                                            min_workers=cfg.scaling.min_workers)
        except TrainingFailedError as exc:  # e.g. a lost node with no restarts left (docs/cluster.md)
            first_lines = " ".join(str(exc).split("\n")[:2])[:400]
            print(f"megaclass pretrain: error: {first_lines} | the run dir {cfg.checkpoint.url} keeps its last "
                  f"step checkpoint: run the same command again to resume (scaling.max_failures="
                  f"{cfg.scaling.max_failures})", file=sys.stderr)
            return 1
    final = cfg.checkpoint.url.rstrip("/") + "/final"
    top1 = summary.get("eval_top1")
    print(f"final checkpoint: {final} (step {summary.get('step')}"
          + (f", held-out top-1 {top1:.4f})" if isinstance(top1, float) else ")"))
    return 143 if summary.get("preempted") else 0
