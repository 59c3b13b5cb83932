"""The built-in dataset: procedurally drawn, web-like images with many classes.

A class is a combination of a shape, a colour and a background texture, so an upstream set with
hundreds of classes and a downstream set of *other* combinations share visual primitives: a
backbone pretrained on the first transfers to the second, as web pretraining does for real data.
Images vary in size (some above the ingest size, to exercise resizing), position, scale, rotation,
colour jitter and noise, and are written as JPEG files under `ROOT/<class name>/<n>.jpg`.

    python -m cluster.synthetic OUT --classes 200 --per-class 20
"""

from __future__ import annotations

import argparse
import io
import itertools
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "cross", "ring", "bar", "diamond", "star")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
    "purple": (150, 50, 190), "orange": (240, 140, 30), "cyan": (40, 200, 210), "white": (240, 240, 240),
    "black": (20, 20, 20), "pink": (240, 120, 180),
}
TEXTURES = ("plain", "stripes", "dots", "grid", "noise")


@dataclass(frozen=True)
class VisualClass:
    shape: str
    colour: str
    texture: str

    @property
    def name(self) -> str:
        return f"{self.shape}-{self.colour}-{self.texture}"


def all_classes() -> list[VisualClass]:
    """Every combination (400), in a fixed order."""
    return [VisualClass(s, c, t) for s, c, t in itertools.product(SHAPES, COLOURS, TEXTURES)]


def split_classes(num_upstream: int, num_downstream: int, seed: int = 0) -> tuple[list[VisualClass], list[VisualClass]]:
    """Two disjoint class lists drawn from the same primitives."""
    classes = all_classes()
    if num_upstream + num_downstream > len(classes):
        raise ValueError(f"at most {len(classes)} classes in all, asked for {num_upstream} + {num_downstream}")
    random.Random(seed).shuffle(classes)
    return classes[:num_upstream], classes[num_upstream:num_upstream + num_downstream]


def _background(draw: ImageDraw.ImageDraw, size: tuple[int, int], texture: str, rng: random.Random) -> None:
    w, h = size
    base = tuple(rng.randint(90, 170) for _ in range(3))
    draw.rectangle([0, 0, w, h], fill=base)
    ink = tuple(max(0, min(255, c + rng.choice((-60, 60)))) for c in base)
    step = max(4, min(w, h) // rng.randint(6, 10))
    if texture == "stripes":
        for x in range(-h, w, step):
            draw.line([(x, 0), (x + h, h)], fill=ink, width=max(1, step // 3))
    elif texture == "dots":
        for x in range(step // 2, w, step):
            for y in range(step // 2, h, step):
                r = max(1, step // 5)
                draw.ellipse([x - r, y - r, x + r, y + r], fill=ink)
    elif texture == "grid":
        for x in range(0, w, step):
            draw.line([(x, 0), (x, h)], fill=ink, width=1)
        for y in range(0, h, step):
            draw.line([(0, y), (w, y)], fill=ink, width=1)


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def polygon(n: int, radii: tuple[float, ...]) -> list[tuple[float, float]]:
        pts = []
        for i in range(n * len(radii)):
            a = angle + 2 * math.pi * i / (n * len(radii))
            rr = r * radii[i % len(radii)]
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    return {
        "square": lambda: polygon(4, (1.0,)),
        "triangle": lambda: polygon(3, (1.0,)),
        "diamond": lambda: polygon(2, (1.0, 0.5)),
        "star": lambda: polygon(5, (1.0, 0.45)),
    }[shape]()


def _draw_shape(draw: ImageDraw.ImageDraw, vc: VisualClass, size: tuple[int, int], rng: random.Random) -> None:
    w, h = size
    r = min(w, h) * rng.uniform(0.22, 0.38)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    colour = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in COLOURS[vc.colour])
    angle = rng.uniform(0, 2 * math.pi)
    box = [cx - r, cy - r, cx + r, cy + r]
    if vc.shape == "circle":
        draw.ellipse(box, fill=colour)
    elif vc.shape == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(r / 3)))
    elif vc.shape in ("cross", "bar"):
        arms = (0.0, math.pi / 2) if vc.shape == "cross" else (0.0,)
        for extra in arms:
            a = angle + extra
            dx, dy = r * math.cos(a), r * math.sin(a)
            draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=colour, width=max(2, int(r / 2.5)))
    else:
        draw.polygon(_shape_points(vc.shape, cx, cy, r, angle), fill=colour)


def render(vc: VisualClass, seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    """One image of class `vc`; a pure function of (class, seed, size)."""
    rng = random.Random(f"{vc.name}/{seed}")
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    _background(draw, size, vc.texture, rng)
    _draw_shape(draw, vc, size, rng)
    if vc.texture == "noise" or rng.random() < 0.5:
        amp = 40 if vc.texture == "noise" else 12
        noise = np.random.default_rng(rng.randrange(1 << 30)).integers(-amp, amp + 1, (size[1], size[0], 3))
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return image


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_image_folder(root: str | Path, classes: list[VisualClass], per_class: int, *, seed: int = 0,
                       sizes: tuple[tuple[int, int], ...] = ((64, 64), (96, 72), (80, 80))) -> list[tuple[Path, str]]:
    """Write `ROOT/<class>/<n>.jpg`; returns [(path, class name)] in a stable order."""
    root = Path(root)
    written = []
    for vc in classes:
        folder = root / vc.name
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            path = folder / f"{n:05d}.jpg"
            size = sizes[(seed + n) % len(sizes)]
            path.write_bytes(jpeg_bytes(render(vc, seed * 1_000_003 + n, size)))
            written.append((path, vc.name))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    classes, _ = split_classes(args.classes, 0, args.seed)
    written = write_image_folder(args.out, classes, args.per_class, seed=args.seed)
    print(f"wrote {len(written)} images of {len(classes)} classes to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
