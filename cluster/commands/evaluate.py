"""`megaclass evaluate MODEL DATA [--out DIR]`: top-1/top-5, per-class accuracy, confusion matrix.

MODEL is a checkpoint dir or registry URI; DATA a dataset URL or an image folder. With --out, writes
DIR/report.json and DIR/confusion.png.
"""

from __future__ import annotations

import argparse
import json

from cluster.commands.finetune import resolve_model_uri, run_reporting_errors
from cluster.commands.registry import add_trust_argument

NAME = "evaluate"
HELP = "evaluate a model on labelled data (top-1, top-5, per-class, confusion matrix)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint dir or registry://NAME@ALIAS")
    parser.add_argument("data", help="dataset URL or image folder ROOT/<class>/<image>; for a detector: a COCO "
                                     "instances JSON or a detection dataset")
    parser.add_argument("--out", help="write report.json and confusion.png (detector: predictions.png) here")
    parser.add_argument("--split", default="val", help="split to score (default val; a one-split dataset uses its own)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes")
    parser.add_argument("--json", action="store_true", help="print the whole report as JSON")
    parser.add_argument("--registry", help="registry root for registry:// URIs")
    add_trust_argument(parser)


def run(args: argparse.Namespace) -> int:
    def body() -> int:
        from cluster.commands.detection import checkpoint_task, reject_detection_data, run_evaluate
        from finetune.evaluate import evaluate, format_report

        model_url = resolve_model_uri(args.model, args.registry, args.trust)
        if checkpoint_task(model_url) == "detection":
            return run_evaluate(args, model_url)
        reject_detection_data(args.data, f"{model_url} is a classification checkpoint; data")
        report = evaluate(model_url, args.data, split=args.split,
                          out_dir=args.out, batch_size=args.batch_size, num_workers=args.workers)
        print(json.dumps(report, indent=2) if args.json else format_report(report))
        if args.out:
            print(f"report: {args.out.rstrip('/')}/report.json")
            from pretrain.trackers import log_evaluation

            for name in log_evaluation(model_url, args.out, {k: report[k] for k in ("top1", "top5")}):
                print(f"logged to {name}: evaluate/top1, evaluate/top5, report.json, confusion.png")
        return 0
    return run_reporting_errors(NAME, body)
