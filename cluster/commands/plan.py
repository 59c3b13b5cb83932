"""`megaclass plan`: the capacity plan of a real run, from dataset size, classes, backbone, cluster shape.

    megaclass plan --images 65000000 --classes 100000 --arch resnet50d --nodes 8 --gpus-per-node 8
    megaclass plan ... --per-gpu-images-per-s 2400 --json

Rates default to the measured figures in BENCHMARKS.md (see cluster/plan.py); pass your own
measurements to replace them. Nothing is started; this is arithmetic (docs/capacity-plan.md).
"""

from __future__ import annotations

import argparse
import json

from data_pipeline.config import ConfigError, finite_float

from cluster import plan as capacity

NAME = "plan"
HELP = "print the capacity plan (shards, ingestion time, storage, head memory, epoch time) for a run"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = capacity.PlanInputs(images=1, classes=1)
    parser.add_argument("--images", type=int, required=True, help="images in the dataset")
    parser.add_argument("--classes", type=int, required=True, help="number of classes")
    parser.add_argument("--arch", default=d.arch, help=f"timm backbone (default {d.arch})")
    parser.add_argument("--nodes", type=int, default=d.nodes, help=f"training nodes (default {d.nodes})")
    parser.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node, help=f"default {d.gpus_per_node}")
    parser.add_argument("--batch-size-per-gpu", type=int, default=d.batch_size_per_gpu,
                        help=f"images per GPU per step (default {d.batch_size_per_gpu})")
    parser.add_argument("--epochs", type=int, default=d.epochs, help=f"epochs to total up (default {d.epochs})")
    parser.add_argument("--per-gpu-images-per-s", type=finite_float, default=d.per_gpu_images_per_s,
                        help=f"training throughput per GPU (default {d.per_gpu_images_per_s:g}: ResNet-50 bf16)")
    parser.add_argument("--ingest-images-per-s-per-core", type=finite_float, default=d.ingest_images_per_s_per_core,
                        help=f"ingestion rate per core (default {d.ingest_images_per_s_per_core:g}: megaclass ingest "
                             "measured on one core, BENCHMARKS.md)")
    parser.add_argument("--loader-images-per-s-per-core", type=finite_float, default=d.loader_images_per_s_per_core,
                        help=f"loader rate per worker (default {d.loader_images_per_s_per_core:g}: measured, BENCHMARKS.md)")
    parser.add_argument("--cores-per-node", type=int, default=d.cores_per_node,
                        help=f"CPU cores per node (default {d.cores_per_node})")
    parser.add_argument("--ingest-nodes", type=int, default=None, help="nodes ingesting (default: --nodes)")
    parser.add_argument("--image-bytes", type=int, default=d.image_bytes,
                        help=f"stored bytes per image (default {d.image_bytes:,})")
    parser.add_argument("--source-image-bytes", type=int, default=d.source_image_bytes,
                        help=f"downloaded bytes per source image (default {d.source_image_bytes:,})")
    parser.add_argument("--node-network-bytes-per-s", type=finite_float, default=d.node_network_bytes_per_s,
                        help=f"download bandwidth per ingesting node (default {d.node_network_bytes_per_s:g}: 10 Gbit/s)")
    parser.add_argument("--shard-bytes", type=int, default=d.shard_bytes,
                        help=f"target shard size in bytes (default {d.shard_bytes:,})")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    inputs = capacity.PlanInputs(
        images=args.images, classes=args.classes, arch=args.arch, nodes=args.nodes,
        gpus_per_node=args.gpus_per_node, batch_size_per_gpu=args.batch_size_per_gpu,
        per_gpu_images_per_s=args.per_gpu_images_per_s,
        ingest_images_per_s_per_core=args.ingest_images_per_s_per_core,
        loader_images_per_s_per_core=args.loader_images_per_s_per_core, cores_per_node=args.cores_per_node,
        ingest_nodes=args.ingest_nodes, image_bytes=args.image_bytes,
        source_image_bytes=args.source_image_bytes, node_network_bytes_per_s=args.node_network_bytes_per_s,
        shard_bytes=args.shard_bytes,
        epochs=args.epochs)
    try:
        plan = capacity.make_plan(inputs)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    print(json.dumps(plan, indent=2, sort_keys=True) if args.json else capacity.format_plan(plan))
    return 0
