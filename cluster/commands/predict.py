"""`megaclass predict MODEL IMAGE... [--top-k 5]`: top-k labels with probabilities per image.

Preprocessing (input size, crop, mean/std) comes from the checkpoint. Exit code 1 when any image
could not be read (the others are still printed).
"""

from __future__ import annotations

import argparse
import json

from data_pipeline.config import ConfigError, finite_float

from cluster.commands.finetune import resolve_model_uri, run_reporting_errors
from cluster.commands.registry import add_trust_argument

NAME = "predict"
HELP = "top-k labels with probabilities for image files"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint dir or registry://NAME@ALIAS")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (local paths or fsspec URLs)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    parser.add_argument("--out", help="detector: write each image with its boxes drawn here (PNG)")
    parser.add_argument("--min-score", type=finite_float, default=0.3, help="detector: report boxes scoring at least this")
    parser.add_argument("--registry", help="registry root for registry:// URIs")
    add_trust_argument(parser)


def run(args: argparse.Namespace) -> int:
    def body() -> int:
        from cluster.commands.detection import checkpoint_task, run_predict
        from finetune.predict import format_predictions, predict

        model_url = resolve_model_uri(args.model, args.registry, args.trust)
        if checkpoint_task(model_url) == "detection":
            return run_predict(args, model_url)
        if args.out:
            raise ConfigError(f"--out: draws boxes, for detectors only; {model_url} is a classification checkpoint")
        results = predict(model_url, args.images, args.top_k)
        print("\n".join(json.dumps(r) for r in results) if args.json else format_predictions(results))
        return 1 if any("error" in r for r in results) else 0
    return run_reporting_errors(NAME, body)
