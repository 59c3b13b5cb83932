"""Fine-tuning on small real data: `megaclass finetune` with its defaults vs a plain timm + torch loop.

    python bench/finetune_vs_timm.py --workdir /tmp/ftbench --seeds 0,1,2   (the recorded run: each row is a mean over seeds)
    python bench/finetune_vs_timm.py --workdir /tmp/ftbench --set data.hflip=0.5   (a non-default, compared)
    python bench/finetune_vs_timm.py --workdir /tmp/ftbench --quick    (wiring only; numbers not meaningful)

The baseline is the loop a user would write from the timm and torch docs: `timm.create_model`
(random init, or `local-dir:CKPT` with a new head), torchvision `ImageFolder` with RandomResizedCrop +
ToTensor + Normalize, a DataLoader (shuffle, one worker, persistent), AdamW (lr 1e-3, weight decay
0.05), cosine schedule, label smoothing 0.1; evaluated with Resize + CenterCrop. megaclass runs
`finetune.train.finetune` (what `megaclass finetune --no-ray` runs) with its defaults, except the
budget: the same steps and the same batch (64, which megaclass lowers to the training set size when
larger; the DataLoader then yields the whole set as one batch). megaclass also gets a validation folder
(best-step selection, as a user would give it); the plain loop keeps its last step. Both are scored on
the same held-out test folder, with one torch thread and one loader worker each, one after the other.

Datasets (all built here, 40 px JPEGs trained at 32 px):
- digits:  the ten digits rendered from every font file the OS ships (`fc-list`) and matplotlib ships
           (DejaVu, Liberation, STIX, Computer Modern): real glyph designs, jittered in size, position,
           rotation and contrast. Orientation matters.
- fonts:   which of 5 font families (DejaVu Sans / Serif, Liberation Sans / Serif, the monospaced
           ones) drew a random letter: style, not shape.
- shapes:  synthetic (cluster.synthetic): shape x colour x texture, classes unseen upstream.
Upstream, for "from a megaclass checkpoint": `megaclass pretrain` (pretrain.train) on the 52 letters
from the same fonts plus 100 other synthetic shape classes, timm test_resnet at 32 px.

Each row: one dataset, shots per class (3 or 10), init (scratch or the megaclass checkpoint); test
top-1 of both and the wall-time ratio megaclass / plain (megaclass's includes its validations and
checkpoint writes; the folder ingest, paid once per folder, is reported apart). With several
`--seeds`, every run is repeated per seed (megaclass `train.seed`, the plain loop's `torch.manual_seed`:
head init, sample order, augmentation) and a row shows the means and the standard error of the
per-seed difference. Prints the table and writes WORKDIR/finetune_vs_timm.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import re
import subprocess
import time
from pathlib import Path

for _name, _value in (("PILLOW_BLOCKS_MAX", "64"), ("MALLOC_MMAP_THRESHOLD_", "67108864"),
                      ("MALLOC_TRIM_THRESHOLD_", "1073741824")):
    os.environ.setdefault(_name, _value)

import timm  # noqa: E402
import torch  # noqa: E402
import torchvision.transforms as T  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402
from torch import nn  # noqa: E402
from torchvision.datasets import ImageFolder  # noqa: E402

from cluster.synthetic import split_classes, write_image_folder  # noqa: E402
from data_pipeline.config import from_dict, load_config  # noqa: E402
from data_pipeline.ingest import IngestConfig, finalize, plan_shards, write_shard  # noqa: E402
from finetune.config import FinetuneConfig  # noqa: E402
from finetune.data import resolve_dataset  # noqa: E402
from finetune.evaluate import evaluate  # noqa: E402
from finetune.train import finetune  # noqa: E402
from pretrain.checkpoint import load_checkpoint  # noqa: E402
from pretrain.config import PretrainConfig  # noqa: E402
from pretrain.train import train as pretrain  # noqa: E402

log = logging.getLogger("bench.finetune_vs_timm")
ARCH = "test_resnet"
IMAGE_SIZE = 32
SOURCE_PX = 40
BATCH = 64
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# symbol and math fonts have no (or no usual) letters and digits
SKIP_FONTS = re.compile(r"STIXSiz|STIXNonUni|cmex|cmsy|cmmi|LastResort|MathTeX", re.I)
FAMILIES = {"dejavu-sans": re.compile(r"DejaVuSans(?!Mono)"), "dejavu-serif": re.compile(r"DejaVuSerif"),
            "liberation-sans": re.compile(r"LiberationSans"), "liberation-serif": re.compile(r"LiberationSerif"),
            "monospaced": re.compile(r"Mono|cmtt")}


def shipped_fonts() -> list[Path]:
    """Font files of the OS (fc-list) and of matplotlib, one per file name."""
    files = []
    try:
        out = subprocess.run(["fc-list", ":", "file"], capture_output=True, text=True, check=True).stdout
        files += [Path(line.split(":")[0].strip()) for line in out.splitlines() if line.strip()]
    except (OSError, subprocess.CalledProcessError):
        log.warning("fc-list not available: matplotlib's fonts only")
    import matplotlib
    files += sorted((Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf").glob("*.ttf"))
    seen, unique = set(), []
    for path in files:
        if path.suffix.lower() in (".ttf", ".otf") and path.name not in seen and not SKIP_FONTS.search(path.name):
            seen.add(path.name)
            unique.append(path)
    return unique


def render_glyph(text: str, font_path: Path, rng: random.Random) -> Image.Image:
    """One glyph, jittered: size, position, rotation, background and ink grey levels."""
    bg = rng.randint(0, 255)
    ink = (bg + rng.randint(90, 165)) % 256
    img = Image.new("L", (SOURCE_PX * 2, SOURCE_PX * 2), bg)
    font = ImageFont.truetype(str(font_path), rng.randint(36, 52))
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = (img.width - (right - left)) / 2 - left + rng.uniform(-5, 5)
    y = (img.height - (bottom - top)) / 2 - top + rng.uniform(-5, 5)
    draw.text((x, y), text, fill=ink, font=font)
    img = img.rotate(rng.uniform(-12, 12), resample=Image.Resampling.BILINEAR, fillcolor=bg)
    return img.resize((SOURCE_PX, SOURCE_PX), Image.Resampling.LANCZOS).convert("RGB")


def write_glyph_folder(root: Path, classes: dict[str, list[tuple[str, Path]]], per_class: int, seed: int) -> None:
    """ROOT/<class>/<n>.jpg; classes: name -> [(text choices, font)] drawn from at random."""
    rng = random.Random(seed)
    for name, choices in classes.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            text, font = rng.choice(choices)
            render_glyph(rng.choice(text), font, rng).save(folder / f"{i:04d}.jpg", quality=90)


def build_data(work: Path, shots: tuple[int, ...], quick: bool) -> tuple[dict, dict]:
    """(upstream folders, downstream {dataset: {split: folder}}) written under work/images."""
    fonts = shipped_fonts()
    log.info("%d font files: %s", len(fonts), ", ".join(p.name for p in fonts))
    images = work / "images"
    test_n, val_n = (20, 5) if quick else (60, 10)
    digits = {d: [(d, f) for f in fonts] for d in "0123456789"}
    families = {name: [(LETTERS, f) for f in fonts if rx.search(f.name)] for name, rx in FAMILIES.items()}
    families = {k: v for k, v in families.items() if v}
    upstream_shapes, downstream_shapes = split_classes(100, 10, seed=3)
    down: dict[str, dict[str, Path]] = {}
    for name, seed in (("digits", 10), ("fonts", 20), ("shapes", 30)):
        sizes = {**{f"train{k}": k for k in shots}, "val": val_n, "test": test_n}
        down[name] = {split: images / name / split for split in sizes}
        for split, per_class in sizes.items():
            folder = down[name][split]
            if folder.exists():
                continue
            split_seed = seed * 1000 + sum(map(ord, split))  # disjoint draws per split
            if name == "shapes":
                write_image_folder(folder, downstream_shapes, per_class, seed=split_seed,
                                   sizes=((SOURCE_PX, SOURCE_PX),))
            else:
                write_glyph_folder(folder, digits if name == "digits" else families, per_class, split_seed)
    up = images / "upstream"
    if not up.exists():
        per_class = 8 if quick else 30
        write_glyph_folder(up, {f"letter-{'upper' if c.isupper() else 'lower'}-{c}": [(c, f) for f in fonts]
                                for c in LETTERS}, per_class, seed=1)
        write_image_folder(up, upstream_shapes, per_class // 2, seed=2, sizes=((SOURCE_PX, SOURCE_PX),))
    return {"folder": up}, down


def ingest(folder: Path, out: Path, val_fraction: float) -> str:
    cfg = from_dict(IngestConfig, {"output": {"val_fraction": val_fraction, "shard_size": 4000, "name": folder.name},
                                   "fetch": {"threads": 4}, "runtime": {"progress": False}})
    plan = plan_shards(str(folder), str(out), cfg)
    finalize(plan, [write_shard(plan.task(i), cfg) for i in range(plan.num_tasks)], cfg)
    return str(out)


def run_pretrain(dataset: str, run: Path, steps: int) -> str:
    if (run / "final" / "config.json").exists():
        return str(run / "final")
    cfg = load_config(PretrainConfig, None, [
        f"data.url={dataset}", f"data.image_size={IMAGE_SIZE}", "data.num_workers=1", "data.eval_split=val",
        "data.scale=0.35,1", "data.hflip=0", f"model.arch={ARCH}", "optim.name=adamw", "optim.lr=0.003",
        "optim.weight_decay=0.05", "optim.warmup_steps=30", "train.global_batch_size=64",
        f"train.max_steps={steps}", "train.channels_last=false", "train.num_threads=1",
        "loss.label_smoothing=0.1", f"checkpoint.url={run}", "checkpoint.every_steps=0", "checkpoint.keep=1",
        "log.every_steps=50", "log.eval_batches=4", "log.tensorboard=false"])
    pretrain(cfg)
    return str(run / "final")


def run_megaclass(ckpt: str, train: str, val: str, test: str, run: Path, steps: int, scratch: bool,
                  cache: Path, extra: tuple[str, ...] = ()) -> dict:
    cfg = load_config(FinetuneConfig, None, [
        f"finetune.checkpoint_url={ckpt}", f"data.url={train}", f"data.val_url={val}", f"checkpoint.url={run}",
        f"data.cache_url={cache}", f"train.max_steps={steps}", f"train.global_batch_size={BATCH}",
        "data.num_workers=1", "train.num_threads=1", "log.tensorboard=false", f"finetune.scratch={scratch}",
        *extra])
    started = time.perf_counter()
    summary = finetune(cfg)
    seconds = time.perf_counter() - started
    report = evaluate(summary["final_url"], test, num_workers=0, cache_url=str(cache))
    return {"test_top1": report["top1"], "val_top1": summary["best_top1"], "best_step": summary["best_step"],
            "seconds": seconds}


def run_plain(ckpt: str, train: Path, test: Path, steps: int, scratch: bool, seed: int) -> dict:
    """The loop a timm user writes (see the module doc)."""
    torch.manual_seed(seed)
    source = load_checkpoint(ckpt)
    mean, std = source.pretrained_cfg["mean"], source.pretrained_cfg["std"]
    started = time.perf_counter()
    train_set = ImageFolder(str(train), T.Compose([T.RandomResizedCrop(IMAGE_SIZE), T.ToTensor(),
                                                   T.Normalize(mean, std)]))
    num_classes = len(train_set.classes)
    if scratch:
        model = timm.create_model(source.arch, pretrained=False, num_classes=num_classes)
    else:
        model = timm.create_model(f"local-dir:{ckpt}", pretrained=True, num_classes=num_classes)
    loader = torch.utils.data.DataLoader(train_set, batch_size=BATCH, shuffle=True, num_workers=1,
                                         persistent_workers=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    model.train()
    step = 0
    while step < steps:
        for x, y in loader:
            loss = criterion(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step == steps:
                break
    seconds = time.perf_counter() - started
    test_set = ImageFolder(str(test), T.Compose([T.Resize(IMAGE_SIZE), T.CenterCrop(IMAGE_SIZE), T.ToTensor(),
                                                 T.Normalize(mean, std)]))
    assert test_set.classes == train_set.classes
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(test_set, batch_size=256):
            correct += int((model(x).argmax(1) == y).sum())
    return {"test_top1": correct / len(test_set), "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/megaclass-finetune-vs-timm")
    parser.add_argument("--steps", type=int, default=80, help="optimizer steps of every downstream run")
    parser.add_argument("--pretrain-steps", type=int, default=300, help="upstream steps of 64 images")
    parser.add_argument("--shots", default="3,10", help="training images per class, comma-separated")
    parser.add_argument("--datasets", default="digits,fonts,shapes")
    parser.add_argument("--seeds", default="0", help="comma-separated; each row is the mean over these seeds")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="extra megaclass finetune option (to compare non-defaults)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the wiring, not the numbers")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.pretrain_steps = 10, 20
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    torch.set_num_threads(1)
    work = Path(args.workdir)
    shots = tuple(int(s) for s in args.shots.split(","))
    seeds = tuple(int(s) for s in args.seeds.split(","))
    t0 = time.perf_counter()
    upstream, down = build_data(work, shots, args.quick)
    timings = {"data_s": time.perf_counter() - t0}

    t = time.perf_counter()
    up_ds = str(work / "upstream")
    if not (work / "upstream" / "manifest.json").exists():
        ingest(upstream["folder"], work / "upstream", val_fraction=0.05)
    pretrained = run_pretrain(up_ds, work / "runs" / "pretrain", args.pretrain_steps)
    timings["pretrain_s"] = time.perf_counter() - t
    up_top1 = load_checkpoint(pretrained).megaclass.get("metrics", {})
    log.info("upstream checkpoint %s (%.0f s): %s", pretrained, timings["pretrain_s"], up_top1)

    t = time.perf_counter()
    cache = work / "cache"
    for splits in down.values():  # ingest every folder once, before the timed runs (a user's second run)
        for folder in splits.values():
            resolve_dataset(str(folder), str(cache))
    timings["ingest_downstream_s"] = time.perf_counter() - t

    rows = []
    for name in args.datasets.split(","):
        for k in shots:
            for init in ("scratch", "pretrained"):
                scratch = init == "scratch"
                d = down[name]
                runs = []
                for seed in seeds:
                    run = work / "runs" / f"{name}-{k}shot-{init}-seed{seed}-{int(time.time())}"
                    mc = run_megaclass(pretrained, str(d[f"train{k}"]), str(d["val"]), str(d["test"]), run,
                                       args.steps, scratch, cache, (f"train.seed={seed}", *args.overrides))
                    plain = run_plain(pretrained, d[f"train{k}"], d["test"], args.steps, scratch, seed)
                    runs.append({"seed": seed, "megaclass": mc, "plain": plain})
                    log.info("%-7s %2d-shot %-10s seed %d: megaclass %.3f (%.0f s)  plain %.3f (%.0f s)", name, k,
                             init, seed, mc["test_top1"], mc["seconds"], plain["test_top1"], plain["seconds"])
                n_train = sum(1 for _ in d[f"train{k}"].rglob("*.jpg"))
                rows.append(summarise_row({"dataset": name, "shots": k, "init": init, "train_images": n_train,
                                           "batch": min(BATCH, n_train)}, runs))
    timings["total_s"] = time.perf_counter() - t0
    print_table(rows, args, timings)
    (work / "finetune_vs_timm.json").write_text(json.dumps({"args": vars(args), "timings": timings, "rows": rows,
                                                            "upstream_metrics": up_top1}, indent=2, default=str))
    return 0


def summarise_row(row: dict, runs: list[dict]) -> dict:
    """Means over seeds, the per-seed gap in points and its standard error, the time ratio of the sums."""
    gaps = [100 * (r["megaclass"]["test_top1"] - r["plain"]["test_top1"]) for r in runs]
    mean_gap = sum(gaps) / len(gaps)
    spread = (sum((g - mean_gap) ** 2 for g in gaps) / (len(gaps) - 1)) ** 0.5 if len(gaps) > 1 else float("nan")
    return {**row, "runs": runs, "gap_points": mean_gap, "gap_stderr": spread / len(gaps) ** 0.5,
            "megaclass": {"test_top1": sum(r["megaclass"]["test_top1"] for r in runs) / len(runs),
                          "seconds": sum(r["megaclass"]["seconds"] for r in runs)},
            "plain": {"test_top1": sum(r["plain"]["test_top1"] for r in runs) / len(runs),
                      "seconds": sum(r["plain"]["seconds"] for r in runs)},
            "time_ratio": sum(r["megaclass"]["seconds"] for r in runs) / sum(r["plain"]["seconds"] for r in runs)}


def print_table(rows: list[dict], args, timings: dict) -> None:
    print(f"\nTest top-1, {args.steps} steps per run, batch min({BATCH}, training images), {ARCH} @ {IMAGE_SIZE} px, "
          f"mean over seeds {args.seeds}"
          + (f", megaclass with {' '.join(args.overrides)}" if args.overrides else ", megaclass defaults"))
    print("| dataset | shots | init | train images | plain loop | megaclass | megaclass - plain (± s.e.) "
          "| time megaclass / plain |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dataset']} | {r['shots']} | {r['init']} | {r['train_images']} | {r['plain']['test_top1']:.3f} | "
              f"{r['megaclass']['test_top1']:.3f} | {r['gap_points']:+.1f} ± {r['gap_stderr']:.1f} | "
              f"{r['time_ratio']:.2f} |")
    worst = min(r["gap_points"] for r in rows)
    ratio = math.exp(sum(math.log(r["time_ratio"]) for r in rows) / len(rows))
    print(f"\nworst row megaclass - plain: {worst:+.1f} points; geometric mean time ratio {ratio:.2f}")
    print("timings: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))


if __name__ == "__main__":
    raise SystemExit(main())
