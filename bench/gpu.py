"""GPU readiness: our training step against the bare model, host syncs, the head, the loader, scaling, overheads.

    torchrun --nproc-per-node 8 bench/gpu.py --json gpu.json     # a GPU node: resnet50d, bf16, 224 px, 100k classes
    torchrun --nproc-per-node 2 bench/gpu.py --toy               # CPU + gloo at toy size (tests/test_bench_gpu.py)

Every part prints a ratio against a ceiling measured in the same run (targets in brackets):
(A) ceiling: the bare timm model with a Linear over this rank's share of the classes, bf16 autocast,
    channels_last, synthetic float batches already on the device, SGD; eager and (--compile) compiled.
(B) `pretrain.train.train_step` on the same batches (uint8 from pinned host memory, as the loader
    delivers them): B/A [>= 0.95], then the cost of EMA, gradient clipping and mixup one at a time.
(C) host syncs in one non-logging train_step, counted by torch.cuda.set_sync_debug_mode [<= 1].
(D) the sharded head alone at per-rank shapes: step time, peak memory, and the time of its
    collectives (all_gather of features, reduce-scatter of their gradient, the loss all_reduces).
(E) the reader at data.image_size from stored 256 px JPEGs, this process and its loader workers pinned
    to scaling.cpus_per_worker cores: images/s against (A) [>= 0.90].
(F) (B)'s images/s per rank at world N against the same rank measured alone first [>= 0.93 at N = 8].
(G) a run checkpoint and an evaluation, amortised over the config's checkpoint.every_steps and
    log.eval_every_steps, as a fraction of training time [<= 0.03].
Figures are the slowest rank's. Without CUDA the parts run on CPU (C is skipped): that only checks
that the script works; it says nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
from data_pipeline import ALLOCATOR_ENV  # noqa: E402  (imports nothing: set before torch and PIL)

for _key, _value in ALLOCATOR_ENV.items():
    os.environ.setdefault(_key, _value)

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from data_pipeline.reader import Batch, create_loader  # noqa: E402
from data_pipeline.transforms import create_train_transform  # noqa: E402
from pretrain.config import load_pretrain_config  # noqa: E402
from pretrain.dist import (DistInfo, all_gather_with_grad, all_reduce_, all_reduce_max, barrier,  # noqa: E402
                           broadcast_object, cleanup, init_distributed)
from pretrain.head import ShardedClassifierHead, shard_range  # noqa: E402
from pretrain.run import build_run, save_run_checkpoint  # noqa: E402
from pretrain.train import evaluate, train_step  # noqa: E402
from tests.dataset_factory import make_dataset  # noqa: E402

FULL = dict(arch="resnet50d", image_size=224, stored_px=256, batch_per_rank=256, classes=100_000, steps=20,
            warmup=5, precision="bf16", train_images=4096, config="configs/pretrain_resnet50d.yaml",
            cpus_per_worker=8, loader_workers=6)
TOY = dict(arch="test_resnet", image_size=32, stored_px=40, batch_per_rank=8, classes=100, steps=2, warmup=1,
           precision="fp32", train_images=64, config="", cpus_per_worker=1, loader_workers=1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _images_per_s(step, batch_size: int, steps: int, warmup: int, device: torch.device) -> float:
    """Steady-state images/s of `step()`; the device is synchronised only around the timed window."""
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch_size / (time.perf_counter() - start)


def ceiling(args, dist: DistInfo, images: torch.Tensor, compile_model: bool) -> float:
    """(A) the bare model + Linear(F, this rank's classes), bf16, channels_last, SGD, batches on the device."""
    start, end = shard_range(args.classes, dist.world_size, dist.rank)
    model = timm.create_model(args.arch, num_classes=max(end - start, 1)).to(dist.device)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    forward = torch.compile(model) if compile_model else model
    x = images.to(dist.device).float().contiguous(memory_format=torch.channels_last)
    y = torch.randint(max(end - start, 1), (len(x),), device=dist.device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            F.cross_entropy(forward(x), y).backward()
        optimizer.step()
    return _images_per_s(step, len(x), args.steps, args.warmup, dist.device)


def make_run(args, dist: DistInfo, data_url: str, run_url: str, **overrides):
    sets = {"data.url": data_url, "checkpoint.url": run_url, "model.arch": args.arch,
            "data.image_size": args.image_size, "train.global_batch_size": args.batch_per_rank * dist.world_size,
            "scaling.num_workers": dist.world_size, "scaling.use_gpu": dist.device.type == "cuda",
            "train.precision": args.precision, "train.channels_last": True, "train.ema": False,
            "train.grad_clip_norm": 0.0, "loss.mixup": 0.0, "loss.cutmix": 0.0, "log.tensorboard": False,
            "optim.name": "sgd", "train.max_steps": 10**6, "data.num_workers": 0 if args.toy else args.loader_workers,
            **overrides}
    cfg = load_pretrain_config(args.config or None, [f"{k}={v}" for k, v in sets.items()])
    return build_run(cfg, dist)


def ours(run, batch: Batch, args) -> float:
    """(B) train_step on the same batch, uint8 in pinned host memory."""
    return _images_per_s(lambda: train_step(run, [batch]), len(batch.labels), args.steps, args.warmup, run.dist.device)


def host_syncs(run, batch: Batch) -> int | None:
    """(C) synchronising calls in one train_step, as torch.cuda's sync debug mode reports them."""
    if run.dist.device.type != "cuda":
        return None
    train_step(run, [batch])
    _sync(run.dist.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_step(run, [batch])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def head_alone(args, dist: DistInfo, num_features: int) -> dict[str, float]:
    """(D) the sharded head at per-rank shapes: step ms, peak MB, and its collectives' ms."""
    head = ShardedClassifierHead(num_features, args.classes, dist, init_seed=0)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9)
    features = torch.randn(args.batch_per_rank, num_features, device=dist.device, requires_grad=True)
    targets = torch.randint(args.classes, (args.batch_per_rank,), device=dist.device)
    if dist.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dist.device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        features.grad = None
        with torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            head.forward_loss(features, targets, label_smoothing=0.1).loss.backward()
        optimizer.step()

    def collectives():
        gathered = all_gather_with_grad(features.detach().requires_grad_(), dist, grad_scale=dist.world_size)
        gathered.backward(torch.ones_like(gathered))
        all_reduce_(torch.zeros(len(gathered), device=dist.device), dist, op="max")
        all_reduce_(torch.zeros(4 * len(gathered) + 1, device=dist.device), dist)
    batch = args.batch_per_rank
    step_ms = 1e3 * batch / _images_per_s(step, batch, args.steps, args.warmup, dist.device)
    comm_ms = 1e3 * batch / _images_per_s(collectives, batch, args.steps, args.warmup, dist.device)
    peak_mb = torch.cuda.max_memory_allocated(dist.device) / 2**20 if dist.device.type == "cuda" else float("nan")
    return {"head_step_ms": step_ms, "head_collectives_ms": comm_ms, "head_peak_mb": peak_mb,
            "head_rows_per_rank": head.end - head.start}


def loader_rate(args, dist: DistInfo, data_url: str, cpus_per_worker: int, num_workers: int) -> float:
    """(E) the reader alone, pinned to this rank's slice of cpus_per_worker cores (loader workers inherit it)."""
    available = sorted(os.sched_getaffinity(0))
    first = (dist.local_rank * cpus_per_worker) % len(available)
    cores = {available[(first + i) % len(available)] for i in range(min(cpus_per_worker, len(available)))}
    os.sched_setaffinity(0, cores)
    try:
        loader = create_loader(data_url, "train", batch_size_per_rank=args.batch_per_rank, num_workers=num_workers,
                               transform=create_train_transform(args.image_size), pin_memory=dist.device.type == "cuda",
                               samples_per_epoch=None)
        batches = iter(loader)
        next(batches)  # worker start-up is not steady state
        count, start = 0, time.perf_counter()
        for batch in batches:
            count += len(batch.labels)
        return count / (time.perf_counter() - start)
    finally:
        os.sched_setaffinity(0, set(available))


def overheads(run, step_s: float) -> dict[str, float]:
    """(G) one checkpoint and one evaluation, amortised over the config's intervals."""
    cfg = run.cfg
    start = time.perf_counter()
    save_run_checkpoint(run, {})
    checkpoint_s = time.perf_counter() - start
    start = time.perf_counter()
    evaluate(run)
    eval_s = time.perf_counter() - start
    every, eval_every = cfg.checkpoint.every_steps or 1000, cfg.log.eval_every_steps or cfg.log.every_steps
    return {"checkpoint_s": checkpoint_s, "eval_s": eval_s,
            "overhead_fraction": (checkpoint_s / every + eval_s / eval_every) / step_s}


def synthetic_batch(args, device: torch.device) -> Batch:
    images = torch.randint(0, 256, (args.batch_per_rank, 3, args.image_size, args.image_size), dtype=torch.uint8)
    labels = torch.randint(args.classes, (args.batch_per_rank,))
    if device.type == "cuda":
        images, labels = images.pin_memory(), labels.pin_memory()
    return Batch(images, labels, [])


def measure(args) -> dict:
    dist = init_distributed()
    workdir = broadcast_object(tempfile.mkdtemp(prefix="bench-gpu-") if dist.is_main else None, dist)
    data_url = f"{workdir}/data"
    if dist.is_main:  # stored like ingestion leaves them: shorter side stored_px
        make_dataset(data_url, {"train": [args.train_images], "val": [max(2 * args.batch_per_rank * dist.world_size, 16)]},
                     num_classes=args.classes, image_size=args.stored_px)
    barrier(dist)
    torch.manual_seed(dist.rank)
    batch = synthetic_batch(args, dist.device)
    out: dict = {"world_size": dist.world_size, "device": str(dist.device), "arch": args.arch}
    alone = make_run(args, DistInfo(device=dist.device), data_url, f"{workdir}/alone-{dist.rank}")
    out["B_alone_img_s"] = ours(alone, batch, args)  # the world-1 figure for (F), every rank at once
    del alone
    barrier(dist)
    out["A_eager_img_s"] = ceiling(args, dist, batch.images, compile_model=False)
    if args.compile:
        out["A_compiled_img_s"] = ceiling(args, dist, batch.images, compile_model=True)
    run = make_run(args, dist, data_url, f"{workdir}/run", **{"train.compile": args.compile})
    out["B_img_s"] = ours(run, batch, args)
    out["C_host_syncs"] = host_syncs(run, batch)
    out["G"] = overheads(run, args.batch_per_rank / out["B_img_s"])
    num_features = run.head.num_features
    del run
    for name, extra in (("ema", {"train.ema": True}), ("clip", {"train.grad_clip_norm": 1.0}),
                        ("mixup", {"loss.mixup": 0.2, "loss.cutmix": 1.0, "loss.mix_prob": 0.5})):
        variant = make_run(args, dist, data_url, f"{workdir}/run-{name}", **extra)
        out[f"B_{name}_img_s"] = ours(variant, batch, args)
        del variant
    out["D"] = head_alone(args, dist, num_features)
    out["E_loader_img_s"] = loader_rate(args, dist, data_url, args.cpus_per_worker, args.loader_workers)
    slowest = {k: all_reduce_max(v, dist) for k, v in _numbers(out).items()}  # rates: take the minimum instead
    fastest_rates = {k: -all_reduce_max(-v, dist) for k, v in _numbers(out).items() if k.endswith("img_s")}
    cleanup(dist)
    return {**slowest, **fastest_rates, "world_size": dist.world_size, "device": str(dist.device), "arch": args.arch,
            "is_main": dist.is_main}


def _numbers(out: dict, prefix: str = "") -> dict[str, float]:
    flat = {}
    for key, value in out.items():
        if isinstance(value, dict):
            flat.update(_numbers(value, f"{prefix}{key}_"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat


def ratios(r: dict) -> dict[str, float]:
    a = r["A_eager_img_s"]
    result = {"B/A": r["B_img_s"] / a, "E/A": r["E_loader_img_s"] / a, "F": r["B_img_s"] / r["B_alone_img_s"],
              "G": r["G_overhead_fraction"]}
    for name in ("ema", "clip", "mixup"):
        result[f"cost_{name}"] = 1.0 - r[f"B_{name}_img_s"] / r["B_img_s"]
    if "A_compiled_img_s" in r:
        result["A_compiled/A_eager"] = r["A_compiled_img_s"] / a
    result["D_collectives/step"] = r["D_head_collectives_ms"] / r["D_head_step_ms"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy", action="store_true", help="tiny model, 32 px, 100 classes: checks the script on CPU")
    for key, value in FULL.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (A) and train.compile (B)")
    parser.add_argument("--json", help="write the figures and ratios here (rank 0)")
    args = parser.parse_args(argv)
    for key, value in (TOY if args.toy else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    figures = measure(args)
    if not figures.pop("is_main"):
        return 0
    result = {"figures": figures, "ratios": ratios(figures), "toy": args.toy}
    print(f"bench/gpu.py: {figures['arch']} at {args.image_size} px, batch {args.batch_per_rank}/rank, "
          f"{args.classes} classes, world {figures['world_size']} on {figures['device']}, torch {torch.__version__}")
    for key, value in {**figures, **result["ratios"]}.items():
        if isinstance(value, float):
            print(f"  {key:<28} {value:10.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
