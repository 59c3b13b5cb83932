"""Top-k predictions of a checkpoint for image files, preprocessed as its pretrained_cfg says.

    megaclass predict MODEL IMAGE... [--top-k 5]

Resize/center-crop (input_size, crop_pct) and normalization (mean, std) come from the checkpoint's
config.json, the same eval transform that validation used during fine-tuning. An unreadable image
is reported with its reason and the others are still predicted.
"""

from __future__ import annotations

import fsspec
import torch
from PIL import Image, UnidentifiedImageError

from data_pipeline.transforms import normalize
from finetune.evaluate import checkpoint_eval_transform, preprocessing
from finetune.model import load_model


def _load_image(url: str, transform) -> torch.Tensor:
    with fsspec.open(url, "rb") as f:
        image = Image.open(f)
        image.load()
    return transform(image.convert("RGB"))


@torch.no_grad()
def predict(model_url: str, images: list[str], k: int = 5, *, batch_size: int = 32) -> list[dict]:
    """[{"image", "top": [{"label", "class_id", "prob"}...]} or {"image", "error"}] in input order."""
    model, ckpt = load_model(model_url)
    _, _, mean, std = preprocessing(ckpt.pretrained_cfg)
    transform = checkpoint_eval_transform(ckpt.pretrained_cfg)
    k = max(1, min(k, len(ckpt.class_names)))
    results: list[dict] = [{"image": url} for url in images]
    ready = []
    for i, url in enumerate(images):
        try:
            ready.append((i, _load_image(url, transform)))
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            results[i]["error"] = f"cannot read image: {exc}"
    for start in range(0, len(ready), batch_size):
        chunk = ready[start:start + batch_size]
        batch = normalize(torch.stack([t for _, t in chunk]), mean, std)
        probs = model(batch).float().softmax(dim=1)
        top = probs.topk(k, dim=1)
        for (i, _), values, ids in zip(chunk, top.values.tolist(), top.indices.tolist()):
            results[i]["top"] = [{"label": ckpt.class_names[c], "class_id": c, "prob": p} for p, c in zip(values, ids)]
    return results


def format_predictions(results: list[dict]) -> str:
    lines = []
    for r in results:
        if "error" in r:
            lines.append(f"{r['image']}: error: {r['error']}")
            continue
        lines.append(r["image"] + ": " + ", ".join(f"{t['label']} {t['prob']:.3f}" for t in r["top"]))
    return "\n".join(lines)
