"""`megaclass ingest SOURCE OUT`: a URL table or image folder -> a verified WebDataset dataset.

    megaclass ingest urls.parquet out/ --shard-size 10000 --val-fraction 0.01
    megaclass ingest urls.csv s3://bucket/ds --ray-address ray://head:10001
    megaclass ingest 'parts/*.parquet' out/ --url-col URL --label-col TEXT --keep-columns caption,NSFW
    megaclass ingest SOURCE out/ --plan-only          # rows, parts, shards, classes, skips; nothing fetched
    megaclass ingest --retry-failed out/               # fetch again what failed transiently
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
    "threads": "fetch.threads", "allow_network": "fetch.allow_networks", "retries": "fetch.retries",
    "ca_file": "fetch.ca_file",
    "url_col": "source.url_column", "label_col": "source.label_column", "key_col": "source.key_column",
    "keep_columns": "source.keep_columns",
    "ray_address": "runtime.ray_address", "max_task_retries": "runtime.max_task_retries",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", nargs="?", help="parquet/CSV/JSONL table (url, label[, key]); a folder, glob or "
                        "comma-separated list of such parts; ROOT/<class>/<img>; or a COCO instances JSON "
                        "(a detection dataset: boxes in each sample)")
    parser.add_argument("out", nargs="?", help="output dataset URL (local path, memory://, s3://, ...)")
    parser.add_argument("--verify", metavar="OUT", help="re-check every shard of OUT against its manifest and exit")
    parser.add_argument("--retry-failed", metavar="OUT",
                        help="fetch again the rows of dataset OUT that failed transiently; rewrite only their shards")
    parser.add_argument("--plan-only", action="store_true",
                        help="print the plan (rows, parts, shards, classes, skips by reason) and exit without fetching")
    parser.add_argument("--url-col", help="source column with the image URL (default url)")
    parser.add_argument("--label-col", help="source column with the class name (default label)")
    parser.add_argument("--key-col", help="source column with a unique key (default key; row numbers if absent)")
    parser.add_argument("--keep-columns", metavar="A,B,...",
                        help="source columns copied into each sample's json and the index, e.g. caption,NSFW")
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
    parser.add_argument("--allow-scheme", action="append", metavar="SCHEME",
                        help="let URLs of this scheme be fetched too (file, s3, ...; repeatable; http(s) always)")
    parser.add_argument("--ca-file", help="PEM CA bundle trusted in addition to the system CAs")
    parser.add_argument("--retries", type=int, help="further attempts after a transient failure (default 2)")
    parser.add_argument("--ignore-optout", action="store_true", help="do not honour X-Robots-Tag noai/noimageai")
    parser.add_argument("--val-fraction", type=finite_float, help="fraction held out by key hash into split 'val'")
    parser.add_argument("--seed", type=int, help="salt of the held-out split hash")
    parser.add_argument("--name", help="dataset name in _info.json")
    parser.add_argument("--max-failed-fraction", type=finite_float, help="fail when more fetched rows fail (default 0.8)")
    parser.add_argument("--ray-address", help="join this Ray cluster instead of starting a local one")
    parser.add_argument("--max-task-retries", type=int, help="retries of a failed shard task (default 3)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_config(args: argparse.Namespace, base: dict | None = None):
    """`base`: options recorded in a dataset's manifest (--retry-failed), below everything given here."""
    from data_pipeline.config import load_config
    from data_pipeline.ingest import IngestConfig

    schemes = ["http", "https"] + list(args.allow_scheme) if args.allow_scheme else None
    values = {key: getattr(args, attr) for attr, key in FLAGS.items()} | {
        "fetch.honour_optout": False if args.ignore_optout else None,
        "runtime.progress": False if args.no_progress else None, "fetch.allow_schemes": schemes}
    if base is None:
        return config_from_args(IngestConfig, args, FLAGS, {k: v for k, v in values.items() if k not in FLAGS.values()})
    return load_config(IngestConfig, args.config, args.set, base=base, flags=values)


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


def retry(out_url: str, args: argparse.Namespace) -> int:
    """Options come from the dataset's manifest; this pass's timing, threads and retries from the flags."""
    from data_pipeline.dataset import read_manifest
    from data_pipeline.retry import retry_failed

    try:
        recorded = read_manifest(out_url).get("options", {})
    except DatasetError as exc:
        print(f"megaclass ingest --retry-failed: {exc}", file=sys.stderr)
        return 2
    cfg = build_config(args, base=recorded)
    record = retry_failed(out_url, cfg)
    print(f"retried {record['rows_retried']} rows, recovered {record['rows_recovered']}, "
          f"rewrote {record['shards_rewritten']} shard(s) -> {out_url}")
    return 0


def plan_only(source: str, out: str, cfg) -> int:
    """Plan the whole source without fetching: what a 65M-row job will do, checked before it starts."""
    import time

    from data_pipeline.ingest import plan_shards

    start = time.monotonic()
    plan = plan_shards(source, out, cfg)
    for _ in plan.tasks():  # streams every part once: URL checks and duplicates are counted per reason
        pass
    summary = plan.summary()
    print(f"rows      {summary['rows']}")
    print(f"parts     {summary['parts']}")
    print(f"classes   {summary['classes']}")
    print(f"shards    {summary['shards']} of <= {cfg.output.shard_size} rows")
    for split, rows in summary["splits"].items():
        print(f"split     {split}: {rows} rows")
    skipped = sum(summary["skipped"].values())
    print(f"to fetch  {summary['rows'] - skipped}")
    print(f"skipped   {skipped}")
    for reason, count in sorted(summary["skipped"].items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {reason:<24}{count:>12}")
    print(f"planned in {time.monotonic() - start:.1f} s; nothing fetched")
    return 0


def run(args: argparse.Namespace) -> int:
    from data_pipeline.config import ConfigError
    from data_pipeline.ingest import IngestConfig, IngestError

    if args.list_options:
        return print_options(IngestConfig)
    if args.verify:
        if args.source or args.out:
            raise ConfigError("--verify OUT takes no SOURCE/OUT arguments")
        return verify(args.verify)
    if args.retry_failed:
        if args.source or args.out:
            raise ConfigError("--retry-failed OUT takes no SOURCE/OUT arguments")
        return retry(args.retry_failed, args)
    if args.plan_only and args.source:
        return plan_only(args.source, args.out or "", build_config(args))
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
