"""`megaclass finetune`: a pretrained checkpoint + downstream data -> a fine-tuned model (RUN/final/).

    megaclass finetune --checkpoint registry://backbone@production --train flowers/ --val flowers_val/ \
        --out runs/flowers --set finetune.mode=lp-ft --set train.epochs=20
    megaclass finetune --checkpoint runs/pre/final --train ds/ --out runs/ft --no-ray   (this process)
    megaclass finetune --task detection --checkpoint runs/pre/final --train train.json --val val.json --out runs/det

Options: defaults < --config FILE.yaml < the flags < --set section.field=value. The checkpoint may be
a registry URI, resolved here to a verified local folder; an image-folder DATA is ingested here
once (cached), so that Ray workers receive dataset URLs. Without --no-ray the run is a Ray Train
job (scaling.num_workers DDP ranks) on a local Ray, or on --ray-address.
"""

from __future__ import annotations

import argparse
import logging
import sys

from cluster.commands import add_config_arguments, check_local_gpus, config_from_args, print_options
from data_pipeline.config import ConfigError, from_dict, merge, to_dict
from data_pipeline.dataset import DatasetError

NAME = "finetune"
HELP = "fine-tune a checkpoint on a small labelled dataset (full, linear probe, or lp-ft), or train a detector"
log = logging.getLogger(__name__)


def user_errors() -> tuple[type[Exception], ...]:
    """Exceptions that mean bad input (a checkpoint, dataset, registry URI or export) rather than a bug."""
    from cluster.registry import RegistryError
    from cluster.signing import SignatureError
    from finetune.export import ExportError
    from pretrain.checkpoint import CheckpointError

    return CheckpointError, DatasetError, RegistryError, SignatureError, ExportError


def run_reporting_errors(command: str, body) -> int:
    """Run `body()`; a bad-input error prints as one line and exits 1 (ConfigError: exit 2 via cli.main)."""
    try:
        return int(body() or 0)
    except ConfigError:
        raise
    except user_errors() as exc:
        print(f"megaclass {command}: error: {exc}", file=sys.stderr)
        return 1


def resolve_model_uri(uri: str, registry: str | None, trust: list[str] = ()) -> str:
    """A registry URI -> verified local folder; with `trust` (public key files) also signed by one of them."""
    from cluster.registry import resolve_checkpoint_uri
    from cluster.signing import load_public_key

    return resolve_checkpoint_uri(uri, registry, trust=[load_public_key(path) for path in trust])


# flag -> config key; each flag sets exactly one field.
FLAGS = {"checkpoint": "finetune.checkpoint_url", "train": "data.url", "val": "data.val_url", "out": "checkpoint.url",
         "mode": "finetune.mode", "scratch": "finetune.scratch"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=("classification", "detection"), default="classification",
                        help="detection: COCO JSON data, a Faster R-CNN FPN / RetinaNet / FCOS (model.detector)")
    parser.add_argument("--checkpoint", help="source checkpoint dir (any fsspec URL) or registry://NAME@ALIAS")
    parser.add_argument("--train", help="train data: dataset URL or image folder ROOT/<class>/<image> "
                                        "(detection: a COCO instances JSON or a detection dataset)")
    parser.add_argument("--val", help="validation data (same forms); default: the 'val' split of --train")
    parser.add_argument("--out", help="run dir (checkpoint.url): config.yaml, metrics.jsonl, best/, final/")
    parser.add_argument("--mode", choices=("full", "linear", "lp-ft"), help="finetune.mode")
    parser.add_argument("--scratch", action="store_true", default=None,
                        help="random init of the same model, same everything else (finetune.scratch): a baseline")
    parser.add_argument("--registry", help="registry root for registry:// URIs (default $MEGACLASS_REGISTRY)")
    parser.add_argument("--trust", action="append", default=[], metavar="PUBKEY",
                        help="PEM Ed25519 public key (repeatable): the checkpoint must be a registry version "
                             "signed by one of them")
    parser.add_argument("--ray-address", help="join this Ray cluster (default: a local Ray for the command)")
    parser.add_argument("--no-ray", action="store_true", help="train in this process (single rank, or torchrun)")
    add_config_arguments(parser, "YAML file with FinetuneConfig sections (docs/finetune.md)")


def build_config(args: argparse.Namespace):
    from finetune.config import FinetuneConfig

    return config_from_args(FinetuneConfig, args, FLAGS, {"scaling.num_workers": 1 if args.no_ray else None})


def run(args: argparse.Namespace) -> int:
    if args.list_options:
        from finetune.config import FinetuneConfig
        from finetune.detection.config import DetectionConfig
        return print_options(DetectionConfig if args.task == "detection" else FinetuneConfig)
    if args.task == "detection":
        from cluster.commands.detection import run_finetune
        return run_reporting_errors(NAME, lambda: run_finetune(args, resolve_model_uri))
    return run_reporting_errors(NAME, lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from finetune.data import resolve_dataset
    from finetune.train import check_inputs, finetune

    from cluster.commands.detection import reject_detection_data

    cfg = build_config(args)
    reject_detection_data(cfg.data.url, "--train")
    reject_detection_data(cfg.data.val_url, "--val")
    cfg.check_runnable()
    check_local_gpus(cfg.scaling, args.ray_address)
    # Resolve here, once: workers get a verified local checkpoint and dataset URLs, not URIs or folders.
    resolved = {"finetune": {"checkpoint_url": resolve_model_uri(cfg.finetune.checkpoint_url, args.registry,
                                                                 args.trust),
                             "source_uri": cfg.finetune.source_uri or cfg.finetune.checkpoint_url},
                "data": {"url": resolve_dataset(cfg.data.url, cfg.data.cache_url)}}
    if cfg.data.val_url:
        resolved["data"]["val_url"] = resolve_dataset(cfg.data.val_url, cfg.data.cache_url)
    cfg = from_dict(type(cfg), merge(to_dict(cfg), resolved))
    if args.no_ray:
        summary = finetune(cfg)
    else:
        # bad input fails here in one line, not as a Ray worker traceback; a batch larger than the data
        # becomes the data here, with one notice, so that every worker gets the same fitted config
        cfg, _ = check_inputs(cfg)
        from cluster.runtime import ray_session, run_torch_trainer

        with ray_session(args.ray_address):
            summary = run_torch_trainer("finetune.train:finetune_from_dict", to_dict(cfg),
                                        num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                        max_failures=cfg.scaling.max_failures, storage_url=cfg.checkpoint.url,
                                        name="ray", cpus_per_worker=cfg.scaling.cpus_per_worker)
    final = summary.get("final_url", cfg.checkpoint.url.rstrip("/") + "/final") if isinstance(summary, dict) else None
    best = summary.get("best_top1") if isinstance(summary, dict) else None
    print(f"final model: {final}" + (f" (val top-1 {best:.4f})" if isinstance(best, float) else ""))
    return 0
