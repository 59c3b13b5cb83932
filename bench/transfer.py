"""The transfer table: does pretraining on many classes pay off downstream? One run, this machine.

    python bench/transfer.py --workdir /tmp/transfer            (~10-15 min on 2 cores)
    python bench/transfer.py --workdir /tmp/transfer --quick    (smoke run, ~3 min; numbers not meaningful)

1. Upstream: 300 procedurally drawn classes (cluster.synthetic: a class is a shape x colour x
   background texture), ingested with the real ingest code, pretrained with pretrain.train (timm
   test_resnet at 32 px, single process).
2. Downstream: 20 *other* combinations of the same primitives (disjoint classes), few images per
   class for training, a separate validation set (early stopping / best-step selection) and a
   separate test set (what the table reports).
3. The same architecture and downstream budget (steps x batch) four ways: from scratch (random init,
   full training), linear probe, full fine-tune, linear probe then fine-tune; each with and without
   label smoothing and mixup. Every run goes through finetune.train, the scratch one from a
   randomly initialised contract-2 checkpoint, so the only difference is the initial weights.

Prints the table (test top-1, %) and writes WORKDIR/transfer.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

from data_pipeline import ALLOCATOR_ENV  # imports nothing: set before torch and PIL

for _name, _value in ALLOCATOR_ENV.items():
    os.environ.setdefault(_name, _value)

import timm  # noqa: E402
import torch  # noqa: E402

from cluster.synthetic import split_classes, write_image_folder  # noqa: E402
from data_pipeline.config import from_dict, load_config  # noqa: E402
from data_pipeline.ingest import IngestConfig, finalize, plan_shards, write_shard  # noqa: E402
from finetune.config import FinetuneConfig  # noqa: E402
from finetune.data import resolve_dataset  # noqa: E402
from finetune.evaluate import evaluate  # noqa: E402
from finetune.train import finetune  # noqa: E402
from pretrain.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from pretrain.config import PretrainConfig  # noqa: E402
from pretrain.train import train as pretrain  # noqa: E402

log = logging.getLogger("bench.transfer")
ARCH = "test_resnet"
IMAGE_SIZE = 32
SIZES = ((48, 48), (56, 48), (48, 56))  # source px; RandomResizedCrop takes them to 32
AUGMENTATIONS = {"plain": ("loss.label_smoothing=0", "loss.mixup=0"),
                 "+LS": ("loss.label_smoothing=0.1", "loss.mixup=0"),
                 "+mixup": ("loss.label_smoothing=0", "loss.mixup=0.2"),
                 "+LS+mixup": ("loss.label_smoothing=0.1", "loss.mixup=0.2")}
# (row label, initial weights, finetune.mode, extra overrides)
ROWS = (("scratch", "scratch", "full", ("optim.lr=0.003", "optim.layer_decay=1.0")),
        ("linear probe", "pretrained", "linear", ("finetune.lp_lr=0.01",)),
        ("fine-tuned", "pretrained", "full", ("optim.lr=0.002", "optim.layer_decay=0.8")),
        ("lp-ft", "pretrained", "lp-ft", ("optim.lr=0.002", "optim.layer_decay=0.8", "finetune.lp_lr=0.01")))


def ingest(folder: Path, out: Path, val_fraction: float = 0.0) -> str:
    """The real ingest steps, sequentially in this process (no Ray needed for a bench)."""
    cfg = from_dict(IngestConfig, {"output": {"val_fraction": val_fraction, "shard_size": 4000, "name": folder.name},
                                   "fetch": {"threads": 4}, "runtime": {"progress": False}})
    plan = plan_shards(str(folder), str(out), cfg)
    finalize(plan, [write_shard(plan.task(i), cfg) for i in range(plan.num_tasks)], cfg)
    return str(out)


def run_pretrain(dataset: str, run: Path, steps: int) -> tuple[str, dict]:
    cfg = load_config(PretrainConfig, None, [
        f"data.url={dataset}", f"data.image_size={IMAGE_SIZE}", "data.num_workers=1", "data.eval_split=val",
        "data.scale=0.35,1", f"model.arch={ARCH}", "optim.name=adamw", "optim.lr=0.003",
        "optim.weight_decay=0.05", "optim.warmup_steps=50", "train.global_batch_size=128",
        f"train.max_steps={steps}", "train.precision=fp32", "train.channels_last=false", "train.num_threads=1",
        "loss.label_smoothing=0.1", f"checkpoint.url={run}", "checkpoint.every_steps=0", "checkpoint.keep=1",
        "log.every_steps=100", "log.eval_batches=4", "log.tensorboard=false"])
    metrics = pretrain(cfg)
    return str(run / "final"), metrics


def scratch_checkpoint(pretrained_url: str, out: Path) -> str:
    """A randomly initialised checkpoint with the pretrained one's arch, classes and preprocessing."""
    source = load_checkpoint(pretrained_url)
    torch.manual_seed(1234)
    model = timm.create_model(source.arch, pretrained=False, num_classes=source.num_classes, **source.model_args)
    return save_checkpoint(str(out), state_dict=model.state_dict(), arch=source.arch, num_classes=source.num_classes,
                           class_names=source.class_names, pretrained_cfg=source.pretrained_cfg,
                           megaclass={"step": 0, "kind": "random-init"}, model_args=source.model_args)


def downstream_run(ckpt: str, data: dict[str, str], run: Path, mode: str, overrides: tuple, steps: int,
                   lp_steps: int) -> dict:
    cfg = load_config(FinetuneConfig, None, [
        f"finetune.checkpoint_url={ckpt}", f"data.url={data['train']}", f"data.val_url={data['val']}",
        f"checkpoint.url={run}", f"data.image_size={IMAGE_SIZE}", "data.num_workers=0", "data.scale=0.35,1",
        "train.global_batch_size=32", f"train.max_steps={steps}", "train.eval_every_steps=10", "train.patience=0",
        "train.channels_last=false", "train.num_threads=1", "optim.warmup_steps=10", "optim.weight_decay=0.05", "log.every_steps=50",
        "log.tensorboard=false", f"finetune.mode={mode}", f"finetune.lp_steps={lp_steps}", *overrides])
    started = time.perf_counter()
    summary = finetune(cfg)
    report = evaluate(summary["final_url"], data["test"], num_workers=0)
    return {"val_top1": summary["best_top1"], "best_step": summary["best_step"], "test_top1": report["top1"],
            "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/megaclass-transfer")
    parser.add_argument("--upstream-classes", type=int, default=300)
    parser.add_argument("--upstream-per-class", type=int, default=30)
    parser.add_argument("--pretrain-steps", type=int, default=800)
    parser.add_argument("--downstream-classes", type=int, default=20)
    parser.add_argument("--shots", type=int, default=5, help="downstream training images per class")
    parser.add_argument("--steps", type=int, default=150, help="downstream optimizer steps (batch 32), every run")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the wiring, not the numbers")
    args = parser.parse_args(argv)
    if args.quick:
        args.upstream_classes, args.upstream_per_class, args.pretrain_steps, args.steps = 200, 8, 60, 20
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    work = Path(args.workdir)
    t0 = time.perf_counter()
    timings = {}

    upstream, downstream = split_classes(args.upstream_classes, args.downstream_classes, seed=0)
    if not (work / "upstream" / "manifest.json").exists():
        write_image_folder(work / "images" / "upstream", upstream, args.upstream_per_class, seed=0, sizes=SIZES)
        ingest(work / "images" / "upstream", work / "upstream", val_fraction=0.05)
    timings["upstream_data_s"] = time.perf_counter() - t0
    log.info("upstream: %d classes x %d images (%.0f s)", len(upstream), args.upstream_per_class, timings["upstream_data_s"])

    t = time.perf_counter()
    pretrained, pre_metrics = run_pretrain(str(work / "upstream"), work / "runs" / "pretrain", args.pretrain_steps)
    timings["pretrain_s"] = time.perf_counter() - t
    log.info("pretrained %s in %.0f s: %s", pretrained, timings["pretrain_s"],
             {k: v for k, v in pre_metrics.items() if isinstance(v, (int, float))})

    t = time.perf_counter()
    data = {}
    for split, (per_class, seed) in {"train": (args.shots, 101), "val": (10, 202), "test": (20, 303)}.items():
        write_image_folder(work / "images" / f"down_{split}", downstream, per_class, seed=seed, sizes=SIZES)
        data[split] = resolve_dataset(str(work / "images" / f"down_{split}"), str(work / "cache"))
    inits = {"pretrained": pretrained, "scratch": scratch_checkpoint(pretrained, work / "scratch")}
    timings["downstream_data_s"] = time.perf_counter() - t

    t = time.perf_counter()
    results: dict[str, dict[str, dict]] = {}
    lp_steps = max(1, args.steps // 3)
    for label, init, mode, extra in ROWS:
        for aug, aug_overrides in AUGMENTATIONS.items():
            run = work / "runs" / f"{label.replace(' ', '_')}{aug.replace('+', '_')}"
            results.setdefault(label, {})[aug] = downstream_run(inits[init], data, run, mode, extra + aug_overrides,
                                                                args.steps, lp_steps)
            log.info("%-12s %-10s test top-1 %.3f (%.0f s)", label, aug, results[label][aug]["test_top1"],
                     results[label][aug]["seconds"])
    timings["downstream_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0

    print_table(results, args, timings)
    (work / "transfer.json").write_text(json.dumps({"args": vars(args), "timings": timings, "results": results,
                                                    "pretrain_metrics": pre_metrics}, indent=2, default=str))
    return 0


def print_table(results: dict, args, timings: dict) -> None:
    augs = list(AUGMENTATIONS)
    print(f"\nDownstream test top-1 (%), {args.downstream_classes} new classes, {args.shots} train images/class, "
          f"{args.steps} steps x 32 per run; {ARCH} @ {IMAGE_SIZE}px pretrained on {args.upstream_classes} classes "
          f"x {args.upstream_per_class} images for {args.pretrain_steps} steps x 128")
    print("| init / mode | " + " | ".join(augs) + " |")
    print("| --- |" + " --- |" * len(augs))
    for label, row in results.items():
        print(f"| {label} | " + " | ".join(f"{100 * row[a]['test_top1']:.1f}" for a in augs) + " |")
    gains = [results["fine-tuned"][a]["test_top1"] - results["scratch"][a]["test_top1"] for a in augs]
    print("\nfine-tuned minus scratch: " + ", ".join(f"{a} {100 * g:+.1f}" for a, g in zip(augs, gains)) + " points")
    print("timings: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))


if __name__ == "__main__":
    raise SystemExit(main())
