"""Pretraining overheads, measured in one run against their ceilings.

    .venv/bin/python bench/train.py                     # (a) + (b) + (c) with C = 1k, 10k, 100k
    .venv/bin/python bench/train.py --head-classes 1000 --steps 20 --json out.json

(a) pipeline vs bare loop: `pretrain.train.train` (reader, augmentation, logging, a checkpoint
    mid-window) against a bare timm loop (same backbone + Linear head + AdamW, same batch, same
    torch threads) on identical batches already in memory. Both report steady-state images/s
    (the pipeline: the second logging window, which contains a checkpoint). Target ratio >= 0.95.
(b) loader vs decode ceiling: the reader with W workers, iterated alone, against a single-core
    loop of decode + RandomResizedCrop + flip (`TrainTransform.from_bytes`) over the same JPEGs:
    per-worker images/s / single-core images/s. Target >= 0.9.
(c) the sharded head's memory and step time per rank at world size 1 and 2 (bench/head.py).

Images are written like ingestion leaves them (shorter side 256, JPEG q90). The machine is shared
by whatever else runs: repeat and take the best when numbers matter.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from data_pipeline import ALLOCATOR_ENV  # noqa: E402  (imports nothing: set before torch and PIL)

for _key, _value in ALLOCATOR_ENV.items():
    os.environ.setdefault(_key, _value)

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from data_pipeline import dataset as ds  # noqa: E402
from data_pipeline.reader import create_loader  # noqa: E402
from data_pipeline.transforms import IMAGENET_MEAN, IMAGENET_STD, create_train_transform, normalize  # noqa: E402
from pretrain.config import load_pretrain_config  # noqa: E402
from pretrain.rundir import read_metrics  # noqa: E402
from pretrain.train import train  # noqa: E402
from tests.dataset_factory import make_dataset  # noqa: E402


def pipeline_images_per_s(data_url: str, run_url: str, args) -> tuple[float, float]:
    """Steady-state images/s of train(): the second of two logging windows (it contains a checkpoint)."""
    half = args.steps
    cfg = load_pretrain_config(None, [
        f"data.url={data_url}", f"checkpoint.url={run_url}", f"model.arch={args.arch}", f"data.image_size={args.size}",
        f"data.num_workers={args.workers}", f"train.global_batch_size={args.batch}", f"train.max_steps={2 * half}",
        f"log.every_steps={half}", f"checkpoint.every_steps={half + half // 2}", "data.eval_split=",
        f"train.num_threads={args.threads}", "train.channels_last=true", "optim.name=adamw", "optim.lr=0.001",
        "log.tensorboard=false"])
    train(cfg)
    last = read_metrics(run_url)[-1]
    return last["images_per_s"], last["data_wait_fraction"]


def bare_images_per_s(batches: list, num_classes: int, args) -> float:
    """The same model, head and optimizer stepping on batches already decoded and in memory."""
    torch.manual_seed(0)
    backbone = timm.create_model(args.arch, pretrained=False, num_classes=0).to(memory_format=torch.channels_last)
    head = torch.nn.Linear(backbone.num_features, num_classes)
    optimizer = timm.optim.create_optimizer_v2(torch.nn.ModuleDict({"b": backbone, "h": head}), opt="adamw", lr=1e-3)

    def step(images, labels):
        x = normalize(images, IMAGENET_MEAN, IMAGENET_STD).contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(head(backbone(x)), labels, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for images, labels in batches[:2]:  # warm-up, like the pipeline's first window
        step(images, labels)
    start = time.perf_counter()
    for images, labels in batches[2:]:
        step(images, labels)
    return (len(batches) - 2) * args.batch / (time.perf_counter() - start)


def loader_vs_ceiling(data_url: str, args) -> dict[str, float]:
    shards = ds.split_shards(data_url, "train")
    jpegs = [s["jpg"] for url, _ in shards for s in ds.iter_shard(url)]
    transform = create_train_transform(args.size)
    ceilings, loader_rates = [], []
    passes = args.loader_passes  # several passes per measurement: a one-second window is mostly noise
    for repeat in range(args.repeats):  # interleaved, best of each (see part a)
        rng = random.Random(repeat)
        start = time.perf_counter()
        for data in jpegs * passes:
            transform.from_bytes(data, rng)
        ceilings.append(passes * len(jpegs) / (time.perf_counter() - start))
        loader = create_loader(data_url, "train", batch_size_per_rank=args.batch, num_workers=args.workers,
                               transform=transform, shuffle_buffer=256, epoch=repeat,
                               samples_per_epoch=passes * len(jpegs))
        count, start = 0, None
        for batch in loader:
            if start is None:  # exclude worker start-up: time from the first batch on
                start = time.perf_counter()
                continue
            count += len(batch.keys)
        loader_rates.append(count / (time.perf_counter() - start))
    ceiling, loader_rate = max(ceilings), max(loader_rates)
    return {"ceiling_images_per_s_one_core": ceiling, "loader_images_per_s": loader_rate,
            "loader_per_worker_ratio": loader_rate / max(args.workers, 1) / ceiling}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=112, help="training crop, px")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12, help="steps per window (pipeline: 2 windows)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the trainer (both loops)")
    parser.add_argument("--workers", type=int, default=1, help="loader worker processes")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--loader-passes", type=int, default=4, help="part (b): passes over the data per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions of (a); best of each")
    parser.add_argument("--head-classes", default="1000,10000,100000", help="part (c); '' to skip")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results: dict = {"args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        samples = args.batch * (2 * args.steps + 2)
        sizes = [samples // 4 + 1] * 4
        data_url = make_dataset(Path(tmp) / "ds", sizes, num_classes=args.classes, image_size=256)
        batches = [(b.images, b.labels) for b in create_loader(
            data_url, "train", batch_size_per_rank=args.batch, num_workers=0,
            transform=create_train_transform(args.size))][: args.steps + 2]
        bare_runs, pipeline_runs = [], []
        for repeat in range(args.repeats):  # interleaved, best of each: other load on the machine only slows
            bare_runs.append(bare_images_per_s(batches, args.classes, args))
            pipeline_runs.append(pipeline_images_per_s(data_url, str(Path(tmp) / f"run{repeat}"), args))
        bare, (pipeline, data_wait) = max(bare_runs), max(pipeline_runs)
        results["a"] = {"pipeline_images_per_s": pipeline, "bare_images_per_s": bare, "ratio": pipeline / bare,
                        "pipeline_data_wait_fraction": data_wait, "bare_runs": bare_runs,
                        "pipeline_runs": [p for p, _ in pipeline_runs]}
        print(f"(a) pipeline {pipeline:.1f} img/s (data wait {data_wait:.1%}) vs bare timm loop {bare:.1f} img/s: "
              f"ratio {pipeline / bare:.3f} (target >= 0.95); runs {[round(p, 1) for p, _ in pipeline_runs]} "
              f"vs {[round(b, 1) for b in bare_runs]}")
        results["b"] = loader_vs_ceiling(data_url, args)
        b = results["b"]
        print(f"(b) loader {b['loader_images_per_s']:.0f} img/s with {args.workers} worker(s) vs single-core "
              f"decode+RRC {b['ceiling_images_per_s_one_core']:.0f} img/s: per-worker ratio "
              f"{b['loader_per_worker_ratio']:.3f} (target >= 0.9)")
    if args.head_classes:
        from head import format_table, run_head_bench
        rows = run_head_bench(tuple(int(c) for c in args.head_classes.split(",")), (1, 2))
        results["c"] = rows
        print("(c) sharded head, per rank:\n" + format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
