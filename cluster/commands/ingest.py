"""`megaclass ingest SOURCE OUT`: a URL table or image folder -> a verified WebDataset dataset.

    megaclass ingest urls.parquet out/ --shard-size 10000 --val-fraction 0.01
    megaclass ingest urls.csv s3://bucket/ds --ray-address ray://head:10001
    megaclass ingest --verify out/

Options: defaults < `--config FILE.yaml` < the flags below < `--set section.field=value`.
Re-running the same command after a crash resumes (committed shards are skipped).
"""

from __future__ import annotations

import argparse
import sys

from cluster.commands import add_config_arguments, config_from_args, print_options
from data_pipeline.config import finite_float
from data_pipeline.dataset import DatasetError, verify_dataset

NAME = "ingest"
HELP = "ingest a URL table or image folder into WebDataset shards (or --verify a dataset)"

# flag -> config key; each flag sets exactly one field.
FLAGS = {
    "shard_size": "output.shard_size", "val_fraction": "output.val_fraction", "seed": "output.seed",
    "name": "output.name", "max_failed_fraction": "output.max_failed_fraction",
    "image_size": "image.image_size", "min_side": "image.min_side", "max_pixels": "image.max_pixels",
    "jpeg_quality": "image.jpeg_quality",
    "timeout_s": "fetch.timeout_s", "max_bytes": "fetch.max_bytes", "max_redirects": "fetch.max_redirects",
    "threads": "fetch.threads", "allow_network": "fetch.allow_networks",
    "ray_address": "runtime.ray_address", "max_task_retries": "runtime.max_task_retries",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", nargs="?", help="parquet/CSV/JSONL table (url, label[, key]), ROOT/<class>/<img>, "
                        "or a COCO instances JSON (a detection dataset: boxes in each sample)")
    parser.add_argument("out", nargs="?", help="output dataset URL (local path, memory://, s3://, ...)")
    parser.add_argument("--verify", metavar="OUT", help="re-check every shard of OUT against its manifest and exit")
    add_config_arguments(parser, "YAML file with ingest options (fetch/image/output/runtime sections)")
    parser.add_argument("--shard-size", type=int, help="input rows per shard (default 30000, ~1 GB)")
    parser.add_argument("--image-size", type=int, help="stored shorter side at most this many px (default 256)")
    parser.add_argument("--min-side", type=int, help="refuse images with a smaller side, px (default 16)")
    parser.add_argument("--max-pixels", type=int, help="refuse images with more pixels, before decoding")
    parser.add_argument("--jpeg-quality", type=int, help="quality of re-encoded JPEGs (default 90)")
    parser.add_argument("--timeout-s", type=finite_float, help="seconds per download, redirects included (default 10)")
    parser.add_argument("--max-bytes", type=int, help="download cap in bytes (default 20 MiB)")
    parser.add_argument("--max-redirects", type=int, help="redirect hops followed (default 5)")
    parser.add_argument("--threads", type=int, help="concurrent downloads per shard task (default 32)")
    parser.add_argument("--allow-network", action="append", metavar="CIDR",
                        help="open this address range (repeatable); private/loopback/... are refused otherwise")
    parser.add_argument("--ignore-optout", action="store_true", help="do not honour X-Robots-Tag noai/noimageai")
    parser.add_argument("--val-fraction", type=finite_float, help="fraction held out by key hash into split 'val'")
    parser.add_argument("--seed", type=int, help="salt of the held-out split hash")
    parser.add_argument("--name", help="dataset name in _info.json")
    parser.add_argument("--max-failed-fraction", type=finite_float, help="fail when more fetched rows fail (default 0.8)")
    parser.add_argument("--ray-address", help="join this Ray cluster instead of starting a local one")
    parser.add_argument("--max-task-retries", type=int, help="retries of a failed shard task (default 3)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_config(args: argparse.Namespace):
    from data_pipeline.ingest import IngestConfig

    return config_from_args(IngestConfig, args, FLAGS, {"fetch.honour_optout": False if args.ignore_optout else None,
                                                        "runtime.progress": False if args.no_progress else None})


def verify(out_url: str) -> int:
    try:
        problems = verify_dataset(out_url)
    except DatasetError as exc:
        print(f"megaclass ingest --verify: {exc}", file=sys.stderr)
        return 1
    for problem in problems:
        print(f"PROBLEM {problem}")
    print(f"{out_url}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def run(args: argparse.Namespace) -> int:
    from data_pipeline.config import ConfigError
    from data_pipeline.ingest import IngestConfig, IngestError

    if args.list_options:
        return print_options(IngestConfig)
    if args.verify:
        if args.source or args.out:
            raise ConfigError("--verify OUT takes no SOURCE/OUT arguments")
        return verify(args.verify)
    if not args.source or not args.out:
        raise ConfigError("usage: megaclass ingest SOURCE OUT [options] (or --verify OUT)")
    cfg = build_config(args)
    from cluster.ingest_runner import run_ingest

    try:
        run_ingest(args.source, args.out, cfg)
    except IngestError as exc:
        print(f"megaclass ingest: error: {exc}", file=sys.stderr)
        return 1
    return 0
