"""`megaclass report DATASET [--out DIR]`: a static HTML page to judge a dataset by looking at it.

    megaclass report out/                       # -> out/report/index.html (+ report.json)
    megaclass report s3://bucket/ds --out /tmp/ds-report

The page shows the class long tail, failure reasons overall and by domain, stored image sizes and
thumbnail grids of the largest and the rarest classes. It is one self-contained file (no server,
no network). `megaclass ingest` writes it at the end of every run.
"""

from __future__ import annotations

import argparse
import sys

from data_pipeline.config import ConfigError
from data_pipeline.dataset import DatasetError, read_manifest

NAME = "report"
HELP = "write a static HTML report of a dataset (long tail, failures by domain, sizes, thumbnails)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", metavar="DATASET", help="dataset URL (local path, s3://, memory://, ...)")
    parser.add_argument("--out", metavar="DIR", default=None, help="output folder URL (default DATASET/report)")
    parser.add_argument("--classes", type=int, default=12, help="classes in each thumbnail grid (default 12)")
    parser.add_argument("--thumbs", type=int, default=8, help="thumbnails per class (default 8)")
    parser.add_argument("--max-shards", type=int, default=16, help="shards read at most for thumbnails (default 16)")


def run(args: argparse.Namespace) -> int:
    from data_pipeline.report import ReportOptions, write_report

    for flag in ("classes", "thumbs", "max_shards"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')}: must be >= 1, got {getattr(args, flag)}")
    try:
        read_manifest(args.dataset)
    except DatasetError as exc:
        raise ConfigError(f"DATASET: {exc}") from None
    opts = ReportOptions(num_classes_shown=args.classes, thumbs_per_class=args.thumbs, max_shards=args.max_shards)
    try:
        page = write_report(args.dataset, args.out, opts)
    except DatasetError as exc:
        print(f"megaclass report: error: {exc}", file=sys.stderr)
        return 1
    print(page)
    return 0
