"""Boxes, class names and scores of a detector for image files; optionally the images with boxes drawn.

    megaclass predict RUN/final a.jpg b.png --out DIR     (JSON lines on stdout; DIR/NNNN-<name>.png)

Each image is resized to the detector's square input as in training and validation, and the boxes
are mapped back to the image's own pixels. An unreadable image gets its reason and the others are
still predicted.
"""

from __future__ import annotations

import io
import posixpath

import fsspec
import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

from data_pipeline.dataset import atomic_write_bytes, join
from finetune.detection.model import load_detector

MAX_IMAGE_PIXELS = 64_000_000  # as ingestion: larger images are refused before decoding


def _load(url: str) -> Image.Image:
    with fsspec.open(url, "rb") as f:
        image = Image.open(io.BytesIO(f.read()))
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise ValueError(f"{image.width}x{image.height} pixels is more than {MAX_IMAGE_PIXELS}")
    image.load()
    return image.convert("RGB")


def draw_detections(image: Image.Image, detections: list[dict]) -> bytes:
    """PNG bytes of `image` with each detection's box, class name and score."""
    image = image.copy()
    draw = ImageDraw.Draw(image)
    for d in detections:
        x0, y0, x1, y1 = d["box"]
        draw.rectangle([x0, y0, x1, y1], outline=(255, 0, 0), width=max(1, round(min(image.size) / 150)))
        draw.text((x0 + 1, max(0, y0 - 10)), f"{d['label']} {d['score']:.2f}", fill=(255, 255, 0))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@torch.no_grad()
def predict_detection(model_url: str, images: list[str], *, out_dir: str | None = None,
                      min_score: float = 0.3) -> list[dict]:
    """[{"image", "width", "height", "detections": [{"label", "class_id", "score", "box"}]} | {"image", "error"}]."""
    model, ckpt, spec = load_detector(model_url)
    size = spec.image_size
    results: list[dict] = []
    for n, url in enumerate(images):
        try:
            image = _load(url)
        except UnidentifiedImageError:
            results.append({"image": url, "error": "cannot read image: not an image (format not recognised)"})
            continue
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            results.append({"image": url, "error": f"cannot read image: {exc}"})
            continue
        width, height = image.size
        resized = image.resize((size, size), Image.Resampling.BILINEAR)
        x = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1)
        out = model([x.float().div_(255)])[0]
        scale = torch.tensor([width / size, height / size] * 2)
        detections = [{"label": ckpt.class_names[int(label) - 1], "class_id": int(label) - 1, "score": float(score),
                       "box": [round(v, 2) for v in (box * scale).tolist()]}
                      for box, score, label in zip(out["boxes"], out["scores"], out["labels"]) if score >= min_score]
        result = {"image": url, "width": width, "height": height, "detections": detections}
        if out_dir:
            stem = posixpath.splitext(posixpath.basename(url.rstrip("/")))[0] or "image"
            result["drawn"] = join(out_dir, f"{n:04d}-{stem}.png")
            atomic_write_bytes(result["drawn"], draw_detections(image, detections))
        results.append(result)
    return results
