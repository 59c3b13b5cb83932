"""The built-in detection set: several disjoint objects per image on cluttered backgrounds, as COCO JSON.

An object class is a (shape, colour) pair drawn from the same primitives as the classification
set (cluster.synthetic), so a backbone pretrained there transfers here. Each image has a textured
background, distractor strokes, and 1..max_objects non-overlapping objects; every box is the exact
bounding box of the drawn pixels. Writes ROOT/images/NNNNNN.jpg and ROOT/instances.json (image
paths relative to the JSON's folder).

    python -m cluster.synthetic_detection OUT --images 200 --classes 6
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

from cluster.synthetic import COLOURS, SHAPES, TEXTURES, _background, _shape_points, jpeg_bytes


def detection_classes(num_classes: int, seed: int = 0) -> list[tuple[str, str]]:
    """`num_classes` distinct (shape, colour) pairs in a fixed order."""
    pairs = [(s, c) for s in SHAPES for c in COLOURS if c not in ("black", "white")]
    random.Random(seed).shuffle(pairs)
    if num_classes > len(pairs):
        raise ValueError(f"at most {len(pairs)} detection classes, asked for {num_classes}")
    return pairs[:num_classes]


def class_name(pair: tuple[str, str]) -> str:
    return f"{pair[0]}-{pair[1]}"


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, colour: tuple, cx: float, cy: float, r: float,
                 angle: float) -> None:
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(r / 3)))
    elif shape in ("cross", "bar"):
        for extra in ((0.0, math.pi / 2) if shape == "cross" else (0.0,)):
            dx, dy = r * math.cos(angle + extra), r * math.sin(angle + extra)
            draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=colour, width=max(2, int(r / 2.5)))
    else:
        draw.polygon(_shape_points(shape, cx, cy, r, angle), fill=colour)


def render_scene(classes: list[tuple[str, str]], seed: int, size: tuple[int, int] = (64, 64),
                 max_objects: int = 3) -> tuple[Image.Image, list[tuple[int, list[float]]]]:
    """(image, [(class index, [x, y, w, h])]); a pure function of its arguments."""
    rng = random.Random(f"scene/{seed}")
    w, h = size
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    _background(draw, size, rng.choice(TEXTURES[:4]), rng)
    for _ in range(rng.randint(2, 5)):  # clutter: strokes that are no object
        ink = tuple(rng.randint(0, 255) for _ in range(3))
        draw.line([(rng.uniform(0, w), rng.uniform(0, h)), (rng.uniform(0, w), rng.uniform(0, h))],
                  fill=ink, width=rng.randint(1, 3))
    objects: list[tuple[int, list[float]]] = []
    taken: list[tuple[float, float, float, float]] = []
    for _ in range(rng.randint(1, max_objects)):
        for _attempt in range(20):
            r = min(w, h) * rng.uniform(0.1, 0.22)
            cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
            if all(cx + r < x0 or cx - r > x1 or cy + r < y0 or cy - r > y1 for x0, y0, x1, y1 in taken):
                break
        else:
            continue
        index = rng.randrange(len(classes))
        shape, colour_name = classes[index]
        colour = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[colour_name])
        angle = rng.uniform(0, 2 * math.pi)
        mask = Image.new("L", size)
        _draw_object(ImageDraw.Draw(mask), shape, 255, cx, cy, r, angle)
        bbox = mask.getbbox()
        if bbox is None:
            continue
        _draw_object(draw, shape, colour, cx, cy, r, angle)
        taken.append((cx - r - 1, cy - r - 1, cx + r + 1, cy + r + 1))
        x0, y0, x1, y1 = bbox
        objects.append((index, [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]))
    return image, objects


def write_coco_set(root: str | Path, classes: list[tuple[str, str]], num_images: int, *, seed: int = 0,
                   size: tuple[int, int] = (64, 64), max_objects: int = 3) -> Path:
    """Write ROOT/images/*.jpg and ROOT/instances.json; returns the JSON's path."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for n in range(num_images):
        image, objects = render_scene(classes, seed * 1_000_003 + n, size, max_objects)
        name = f"images/{n:06d}.jpg"
        (root / name).write_bytes(jpeg_bytes(image))
        images.append({"id": n + 1, "file_name": name, "width": size[0], "height": size[1]})
        for index, bbox in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": n + 1, "category_id": index + 1,
                                "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0})
    doc = {"images": images, "annotations": annotations,
           "categories": [{"id": i + 1, "name": class_name(c)} for i, c in enumerate(classes)]}
    path = root / "instances.json"
    path.write_text(json.dumps(doc))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--size", type=int, default=64, help="px, square")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_coco_set(args.out, detection_classes(args.classes, args.seed), args.images, seed=args.seed,
                          size=(args.size, args.size))
    print(f"wrote {args.images} images and {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
