"""Capacity plan for a real run: shards, ingestion time, storage, head memory, steps and epoch time.

Pure arithmetic on a few measured rates (defaults from BENCHMARKS.md, overridable) plus the
backbone's feature width and parameter count, read from timm on the meta device (no weights, no
memory). `megaclass plan` prints it; docs/capacity-plan.md walks through the seed's scale.

    plan = make_plan(PlanInputs(images=65_000_000, classes=100_000, arch="resnet50d", nodes=8,
                                gpus_per_node=8))
    print(format_plan(plan))
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

# Measured figures (BENCHMARKS.md, with the commands). Each is a default that `megaclass plan` lets you replace.
INGEST_IMAGES_PER_S_PER_CORE = 114.0   # megaclass ingest end to end, one core (Ingestion: 113.0 / 114.6)
LOADER_IMAGES_PER_S_PER_CORE = 620.0   # the reader, one loader worker, ingested images (Pretraining (b): 592-688)
PER_GPU_IMAGES_PER_S = 3000.0          # ResNet-50 bf16 training on a current datacenter GPU (reference figures)
IMAGE_BYTES = 20_500                   # stored JPEG, shorter side 256, q90, from web-like sources (Reference figures)
SHARD_BYTES = 1_000_000_000            # ~1 GB shards: few enough objects, small enough to retry
SOURCE_IMAGE_BYTES = 118_000           # a web JPEG as downloaded (the ingestion benchmark's mean)
NODE_NETWORK_BYTES_PER_S = 1.25e9      # 10 Gbit/s per ingesting node (an assumption, not a measurement)
OPTIMIZER_BYTES_PER_PARAM = 16         # fp32 weight + grad + AdamW exp_avg + exp_avg_sq
FEATURE_BYTES = 2                      # bf16 features all-gathered for the sharded head

# Used when timm cannot build the architecture (unknown name): feature width only.
KNOWN_FEATURES = {"resnet50d": 2048, "resnet101d": 2048, "res2net101d": 2048, "resnext101_32x16d": 2048,
                  "mobilenetv3_large_100": 1280, "efficientnet_b0": 1280, "resnet18": 512}


@dataclass(frozen=True)
class PlanInputs:
    images: int
    classes: int
    arch: str = "resnet50d"
    nodes: int = 1
    gpus_per_node: int = 8
    batch_size_per_gpu: int = 256
    per_gpu_images_per_s: float = PER_GPU_IMAGES_PER_S
    ingest_images_per_s_per_core: float = INGEST_IMAGES_PER_S_PER_CORE
    loader_images_per_s_per_core: float = LOADER_IMAGES_PER_S_PER_CORE
    cores_per_node: int = 96
    ingest_nodes: int | None = None      # nodes doing ingestion (default: the training nodes)
    image_bytes: int = IMAGE_BYTES
    source_image_bytes: int = SOURCE_IMAGE_BYTES
    node_network_bytes_per_s: float = NODE_NETWORK_BYTES_PER_S
    shard_bytes: int = SHARD_BYTES
    epochs: int = 1


def backbone_shape(arch: str) -> tuple[int, int | None]:
    """(num_features, backbone parameter count) from timm on the meta device; table fallback."""
    import timm
    import torch

    try:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, num_classes=0)
    except RuntimeError as exc:  # timm: "Unknown model"
        if arch in KNOWN_FEATURES:
            return KNOWN_FEATURES[arch], None
        raise ValueError(f"--arch {arch!r}: not a timm model ({exc})") from None
    return int(model.num_features), sum(p.numel() for p in model.parameters())


def make_plan(inputs: PlanInputs, num_features: int | None = None, backbone_params: int | None = None) -> dict[str, Any]:
    """The plan as a flat dict of numbers (bytes, seconds, counts); see `format_plan`."""
    p = inputs
    for name in ("images", "classes", "nodes", "gpus_per_node", "batch_size_per_gpu", "cores_per_node",
                 "image_bytes", "source_image_bytes", "shard_bytes", "epochs"):
        if getattr(p, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(p, name)}")
    for name in ("per_gpu_images_per_s", "ingest_images_per_s_per_core", "loader_images_per_s_per_core",
                 "node_network_bytes_per_s"):
        if getattr(p, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(p, name)}")
    if num_features is None:
        num_features, backbone_params = backbone_shape(p.arch)
    world = p.nodes * p.gpus_per_node
    global_batch = world * p.batch_size_per_gpu

    storage_bytes = p.images * p.image_bytes
    samples_per_shard = max(1, p.shard_bytes // p.image_bytes)
    num_shards = math.ceil(p.images / samples_per_shard)
    ingest_nodes = p.ingest_nodes or p.nodes
    ingest_cores = ingest_nodes * p.cores_per_node
    # ingestion is bound by CPU (decode/resize/encode) or by the download link, whichever is slower
    ingest_cpu_images_per_s = p.ingest_images_per_s_per_core * ingest_cores
    ingest_net_images_per_s = ingest_nodes * p.node_network_bytes_per_s / p.source_image_bytes
    ingest_images_per_s = min(ingest_cpu_images_per_s, ingest_net_images_per_s)
    ingest_s = p.images / ingest_images_per_s

    head_params = num_features * p.classes + p.classes  # weight + bias
    classes_per_rank = math.ceil(p.classes / world)
    head_params_per_rank = classes_per_rank * (num_features + 1)
    cluster_images_per_s = p.per_gpu_images_per_s * world
    steps_per_epoch = p.images // global_batch
    epoch_s = p.images / cluster_images_per_s
    return {
        **{f"input_{k}": v for k, v in asdict(p).items()},
        "num_features": num_features,
        "backbone_params": backbone_params,
        "world_size": world,
        "global_batch_size": global_batch,
        "storage_bytes": storage_bytes,
        "num_shards": num_shards,
        "samples_per_shard": samples_per_shard,
        "shard_bytes": samples_per_shard * p.image_bytes,
        "ingest_cores": ingest_cores,
        "ingest_s": ingest_s,
        "ingest_images_per_s": ingest_images_per_s,
        "ingest_cpu_images_per_s": ingest_cpu_images_per_s,
        "ingest_network_images_per_s": ingest_net_images_per_s,
        "ingest_bound": "cpu" if ingest_cpu_images_per_s <= ingest_net_images_per_s else "network",
        "download_bytes": p.images * p.source_image_bytes,
        "shards_per_loader_slot": num_shards / world,
        "head_params": head_params,
        "head_bytes_unsharded": head_params * OPTIMIZER_BYTES_PER_PARAM,
        "classes_per_rank": classes_per_rank,
        "head_params_per_rank": head_params_per_rank,
        "head_bytes_per_rank": head_params_per_rank * OPTIMIZER_BYTES_PER_PARAM,
        "backbone_bytes_per_rank": None if backbone_params is None else backbone_params * OPTIMIZER_BYTES_PER_PARAM,
        # logits of the global batch for this rank's classes (sharded) == local batch x all classes (unsharded)
        "logits_bytes_per_rank": global_batch * classes_per_rank * 4,
        "feature_allgather_bytes_per_step": global_batch * num_features * FEATURE_BYTES,
        "grad_allreduce_bytes_per_step_sharded": None if backbone_params is None else backbone_params * 4,
        "grad_allreduce_bytes_per_step_unsharded": None if backbone_params is None else (backbone_params + head_params) * 4,
        "cluster_images_per_s": cluster_images_per_s,
        "read_bytes_per_s": cluster_images_per_s * p.image_bytes,
        "loader_cores_per_gpu": p.per_gpu_images_per_s / p.loader_images_per_s_per_core,
        "steps_per_epoch": steps_per_epoch,
        "epoch_s": epoch_s,
        "total_s": epoch_s * p.epochs,
        "total_steps": steps_per_epoch * p.epochs,
    }


def _bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


def _duration(s: float) -> str:
    if s >= 86400:
        return f"{s / 86400:,.1f} d ({s / 3600:,.0f} h)"
    if s >= 3600:
        return f"{s / 3600:,.1f} h"
    if s >= 60:
        return f"{s / 60:,.1f} min"
    return f"{s:,.1f} s"


def _millions(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:,.1f}M"


def format_plan(plan: dict[str, Any]) -> str:
    """Human-readable plan, grouped by stage; every assumed rate is printed next to what it drives."""
    i = {k[len("input_"):]: v for k, v in plan.items() if k.startswith("input_")}
    rows = [
        ("Dataset", ""),
        ("images / classes", f"{i['images']:,} / {i['classes']:,}"),
        ("storage", f"{_bytes(plan['storage_bytes'])} at {_bytes(i['image_bytes'])}/image"),
        ("shards", f"{plan['num_shards']:,} x {_bytes(plan['shard_bytes'])} ({plan['samples_per_shard']:,} images each)"),
        ("ingest with", f"megaclass ingest SOURCE OUT --shard-size {plan['samples_per_shard']}"),
        ("Ingestion", ""),
        ("cpu", f"{plan['ingest_cores']:,} cores at {i['ingest_images_per_s_per_core']:,.0f} img/s/core "
                f"= {plan['ingest_cpu_images_per_s']:,.0f} img/s"),
        ("network", f"{_bytes(i['node_network_bytes_per_s'])}/s per node at {_bytes(i['source_image_bytes'])}/image "
                    f"= {plan['ingest_network_images_per_s']:,.0f} img/s ({_bytes(plan['download_bytes'])} in all)"),
        ("time", f"{_duration(plan['ingest_s'])} ({plan['ingest_bound']}-bound)"),
        ("Head (16 B/param: fp32 weight, grad, AdamW m and v)", ""),
        ("shape", f"Linear({plan['num_features']:,}, {i['classes']:,}) = {_millions(plan['head_params'])} params"),
        ("unsharded, every rank", _bytes(plan["head_bytes_unsharded"])),
        (f"sharded over {plan['world_size']} ranks",
         f"{_bytes(plan['head_bytes_per_rank'])} per rank ({plan['classes_per_rank']:,} classes)"),
        ("backbone per rank", f"{_bytes(plan['backbone_bytes_per_rank'])} ({_millions(plan['backbone_params'])} params)"),
        ("logits per rank (fp32)", _bytes(plan["logits_bytes_per_rank"])),
        ("feature all-gather / step", _bytes(plan["feature_allgather_bytes_per_step"])),
        ("grad all-reduce / step", f"{_bytes(plan['grad_allreduce_bytes_per_step_sharded'])} sharded, "
                                   f"{_bytes(plan['grad_allreduce_bytes_per_step_unsharded'])} if the head were replicated"),
        ("Training", ""),
        ("GPUs", f"{i['nodes']} nodes x {i['gpus_per_node']} = {plan['world_size']}, "
                 f"global batch {plan['global_batch_size']:,}"),
        ("throughput", f"{i['per_gpu_images_per_s']:,.0f} img/s/GPU = {plan['cluster_images_per_s']:,.0f} img/s, "
                       f"reading {_bytes(plan['read_bytes_per_s'])}/s"),
        ("loader cores per GPU", f"{plan['loader_cores_per_gpu']:.1f} at {i['loader_images_per_s_per_core']:,.0f} img/s/core"),
        ("shards per rank", f"{plan['shards_per_loader_slot']:,.1f}"),
        ("steps per epoch", f"{plan['steps_per_epoch']:,}"),
        ("epoch time", _duration(plan["epoch_s"])),
        (f"{i['epochs']} epoch(s)", f"{plan['total_steps']:,} steps, {_duration(plan['total_s'])}"),
    ]
    width = max(len(k) for k, v in rows if v)
    return "\n".join(f"{k}" if not v else f"  {k:<{width}}  {v}" for k, v in rows)
