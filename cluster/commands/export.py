"""`megaclass export MODEL --onnx OUT.onnx`: ONNX export with a PyTorch/onnxruntime parity check.

Prints the max abs difference of the logits on a random batch (CPU); fails above 1e-4.
"""

from __future__ import annotations

import argparse

from cluster.commands.finetune import resolve_model_uri, run_reporting_errors
from cluster.commands.registry import add_trust_argument

NAME = "export"
HELP = "export a model to ONNX and check parity with PyTorch"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint dir or registry://NAME@ALIAS")
    parser.add_argument("--onnx", required=True, metavar="OUT.onnx", help="output file: a local path or any fsspec URL (s3://, gs://, ...)")
    parser.add_argument("--image-size", type=int, default=0, help="input px; 0 = the checkpoint's input_size")
    parser.add_argument("--registry", help="registry root for registry:// URIs")
    add_trust_argument(parser)


def run(args: argparse.Namespace) -> int:
    def body() -> int:
        from cluster.commands.detection import checkpoint_task, run_export
        from finetune.export import export_onnx

        model_url = resolve_model_uri(args.model, args.registry, args.trust)
        if checkpoint_task(model_url) == "detection":
            return run_export(args, model_url)
        report = export_onnx(model_url, args.onnx, image_size=args.image_size)
        print(f"wrote {report['onnx']} (input {report['input_size']}, {report['num_classes']} classes); "
              f"parity vs PyTorch on CPU: max abs logits diff {report['max_abs_diff']:.3g} "
              f"(< {report['tolerance']:g})")
        pre = report["preprocessing"]
        print(f"preprocessing (in the ONNX metadata as megaclass.preprocessing): {pre['interpolation']} resize, "
              f"center crop {pre['input_size'][-1]} px at crop_pct {pre['crop_pct']}, mean {pre['mean']}, std {pre['std']}")
        return 0
    return run_reporting_errors(NAME, body)
