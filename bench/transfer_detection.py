"""The detection transfer table: does many-class pretraining pay off for a detector? One run, this machine.

    python bench/transfer_detection.py --workdir /tmp/transfer-det            (~20-30 min on 2 quiet cores)
    python bench/transfer_detection.py --workdir /tmp/transfer-det --quick    (wiring check, numbers meaningless)

1. Upstream: the classification set of bench/transfer.py (cluster.synthetic: shape x colour x
   texture classes), ingested with the real ingest code and pretrained with pretrain.train
   (timm test_resnet at 32 px, single process). Reused when WORKDIR already holds it.
2. Detection set (cluster.synthetic_detection): several disjoint objects per 64 px image on
   textured, cluttered backgrounds; a class is a (shape, colour) pair. COCO JSON train / val /
   test sets, ingested through finetune's COCO path.
3. The same Faster R-CNN FPN and budget (steps x batch) three ways: backbone from the pretrained
   checkpoint, from scratch (`finetune.scratch`: identical detector, random weights), and the
   pretrained backbone frozen (`finetune.mode=linear`: FPN and heads train). Val mAP picks the
   best step; the table reports COCO mAP@.5 and mAP@[.5:.95] on the separate test set.

Prints the table and writes WORKDIR/transfer_detection.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

for _name, _value in (("PILLOW_BLOCKS_MAX", "64"), ("MALLOC_MMAP_THRESHOLD_", "67108864"),
                      ("MALLOC_TRIM_THRESHOLD_", "1073741824")):
    os.environ.setdefault(_name, _value)

sys.path.insert(0, str(Path(__file__).resolve().parent))

from transfer import SIZES, ingest, run_pretrain  # noqa: E402  (bench/transfer.py: the same upstream)

from cluster.synthetic import split_classes, write_image_folder  # noqa: E402
from cluster.synthetic_detection import detection_classes, write_coco_set  # noqa: E402
from data_pipeline.config import load_config  # noqa: E402
from finetune.detection.config import DetectionConfig  # noqa: E402
from finetune.detection.evaluate import evaluate_detection  # noqa: E402
from finetune.detection.train import finetune_detection  # noqa: E402

log = logging.getLogger("bench.transfer_detection")
IMAGE_SIZE = 64
# key: (row label, finetune overrides)
ROWS = {"scratch": ("scratch", ("finetune.scratch=true",)),
        "frozen": ("pretrained, frozen backbone", ("finetune.mode=linear",)),
        "finetuned": ("pretrained, fine-tuned", ())}


def detection_run(ckpt: str, data: dict[str, str], run: Path, overrides: tuple, args, cache: Path) -> dict:
    cfg = load_config(DetectionConfig, None, [
        f"finetune.checkpoint_url={ckpt}", f"data.url={data['train']}", f"data.val_url={data['val']}",
        f"checkpoint.url={run}", f"data.image_size={IMAGE_SIZE}", "data.num_workers=1", f"data.cache_url={cache}",
        f"model.detector={args.detector}", "model.fpn_channels=64", f"train.global_batch_size={args.batch}",
        f"train.max_steps={args.steps}", f"train.eval_every_steps={max(1, args.steps // args.evals)}", "train.patience=0",
        "train.num_threads=1", "optim.lr=0.002", "optim.weight_decay=0.0001", "optim.warmup_steps=20",
        "log.every_steps=50", "log.tensorboard=false", *overrides])
    started = time.perf_counter()
    summary = finetune_detection(cfg)
    report = evaluate_detection(summary["final_url"], data["test"], num_workers=1, cache_url=str(cache))
    return {"val_map": summary["best_map"], "best_step": summary["best_step"], "test_map": report["map"],
            "test_map_50": report["map_50"], "test_map_75": report["map_75"], "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/megaclass-transfer-detection")
    parser.add_argument("--upstream-classes", type=int, default=200)
    parser.add_argument("--upstream-per-class", type=int, default=20)
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--classes", type=int, default=6, help="detection classes (shape x colour)")
    parser.add_argument("--train-images", type=int, default=200)
    parser.add_argument("--steps", type=int, default=200, help="detector optimizer steps, every run")
    parser.add_argument("--batch", type=int, default=16, help="images per step")
    parser.add_argument("--evals", type=int, default=4, help="validations per run (best step selection)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"rows to run now, of {','.join(ROWS)}: separate "
                        "processes may run different rows at once; the table shows every row found in WORKDIR")
    parser.add_argument("--detector", default="faster_rcnn", choices=("faster_rcnn", "retinanet", "fcos"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the wiring, not the numbers")
    args = parser.parse_args(argv)
    if args.quick:
        args.upstream_classes, args.upstream_per_class, args.pretrain_steps = 50, 6, 20
        args.train_images, args.steps = 32, 6
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    work = Path(args.workdir)
    t0 = time.perf_counter()
    timings = {}

    upstream, _ = split_classes(args.upstream_classes, 0, seed=0)
    if not (work / "upstream" / "manifest.json").exists():
        write_image_folder(work / "images" / "upstream", upstream, args.upstream_per_class, seed=0, sizes=SIZES)
        ingest(work / "images" / "upstream", work / "upstream", val_fraction=0.05)
    pretrained = work / "runs" / "pretrain" / "final"
    if not (pretrained / "SHA256SUMS").exists():
        run_pretrain(str(work / "upstream"), work / "runs" / "pretrain", args.pretrain_steps)
    timings["upstream_s"] = time.perf_counter() - t0
    log.info("pretrained backbone %s (%.0f s)", pretrained, timings["upstream_s"])

    classes = detection_classes(args.classes, seed=0)
    data = {}
    for split, (count, seed) in {"train": (args.train_images, 11), "val": (48, 22), "test": (96, 33)}.items():
        data[split] = str(write_coco_set(work / "detection" / split, classes, count, seed=seed,
                                         size=(IMAGE_SIZE, IMAGE_SIZE), max_objects=4))

    for key in args.rows.split(","):
        label, overrides = ROWS[key]
        t = time.perf_counter()
        result = detection_run(str(pretrained), data, work / "runs" / key, overrides, args, work / "cache")
        result["seconds"] = time.perf_counter() - t
        (work / f"row-{key}.json").write_text(json.dumps({"args": vars(args), "result": result}, indent=2))
        log.info("%-28s test mAP@.5 %.3f mAP %.3f (%.0f s)", label, result["test_map_50"], result["test_map"],
                 result["seconds"])
    timings["total_s"] = time.perf_counter() - t0
    results = {ROWS[key][0]: json.loads((work / f"row-{key}.json").read_text())["result"]
               for key in ROWS if (work / f"row-{key}.json").exists()}
    (work / "transfer_detection.json").write_text(json.dumps({"args": vars(args), "timings": timings,
                                                              "results": results}, indent=2))
    print_table(results, args, timings)
    return 0


def print_table(results: dict, args, timings: dict) -> None:
    print(f"\n{args.detector} on test_resnet @ {IMAGE_SIZE}px, {args.classes} classes, {args.train_images} train "
          f"images, {args.steps} steps x {args.batch} per run; backbone pretrained on {args.upstream_classes} classes "
          f"x {args.upstream_per_class} images for {args.pretrain_steps} steps x 128. Test set: 96 images.")
    print("| backbone | test mAP@.5 | test mAP@[.5:.95] | val mAP (best step) |")
    print("| --- | --- | --- | --- |")
    for label, r in results.items():
        print(f"| {label} | {100 * r['test_map_50']:.1f} | {100 * r['test_map']:.1f} | "
              f"{100 * r['val_map']:.1f} ({r['best_step']}) |")
    if "scratch" in results and "pretrained, fine-tuned" in results:
        gain = results["pretrained, fine-tuned"]["test_map_50"] - results["scratch"]["test_map_50"]
        gain_map = results["pretrained, fine-tuned"]["test_map"] - results["scratch"]["test_map"]
        print(f"\npretrained minus scratch: mAP@.5 {100 * gain:+.1f} points, mAP {100 * gain_map:+.1f} points")
    print("timings: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))


if __name__ == "__main__":
    raise SystemExit(main())
