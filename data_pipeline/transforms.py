"""Image transforms for the reader: JPEG bytes or PIL images in, uint8 CHW tensors out.

Loader workers return uint8 (4x fewer bytes through shared memory than float) and the trainer
normalizes on its device with `normalize`. The train transform samples its RandomResizedCrop box
*before* decoding so it can ask libjpeg for a DCT-scaled decode (`Image.draft`) that is never below
the crop's output resolution: 1.4-1.65x faster on large sources (measured on 1024x768), identical
statistics to torchvision's RandomResizedCrop + horizontal flip.

    tf = create_train_transform(224)
    chw_uint8 = tf.from_bytes(jpeg_bytes, rng=random.Random(0))   # decode + crop + flip
    chw_uint8 = tf(pil_image)                                       # plain callable form
    x = normalize(batch_uint8.to(device), IMAGENET_MEAN, IMAGENET_STD)

Randomness comes from an explicit `random.Random` when given (the reader seeds one per batch so
augmentation is reproducible and resumable), else from the `random` module.
"""

from __future__ import annotations

import io
import math
import random
from typing import Sequence

import numpy as np
import torch
from PIL import Image

# timm.data.constants IMAGENET_DEFAULT_MEAN / IMAGENET_DEFAULT_STD (copied: data_pipeline does not import timm)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLE = Image.Resampling.BILINEAR


def _to_chw_uint8(img: Image.Image) -> torch.Tensor:
    array = np.asarray(img, dtype=np.uint8)
    if array.ndim == 2:  # defensive: callers convert to RGB first
        array = np.repeat(array[:, :, None], 3, axis=2)
    # numpy's transpose copy: ~30x cheaper than torch's permute().contiguous() for HWC uint8 here
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _open_rgb(data: bytes, requested_size: tuple[int, int] | None = None) -> Image.Image:
    """Open image bytes; when `requested_size` is given, let JPEG decode at the smallest DCT scale >= it."""
    img = Image.open(io.BytesIO(data))
    if requested_size is not None and img.format == "JPEG":
        img.draft("RGB", requested_size)
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


def sample_crop_box(width: int, height: int, scale: Sequence[float], ratio: Sequence[float],
                    rng: random.Random) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params with an explicit rng: (left, top, crop_w, crop_h)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    # fallback: the whole image, clamped to the ratio range, centered
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class TrainTransform:
    """RandomResizedCrop(image_size, scale, ratio) + horizontal flip, uint8 CHW output."""

    def __init__(self, image_size: int, scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: float = 0.5, use_draft: bool = True):
        self.image_size = int(image_size)
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.hflip = float(hflip)
        self.use_draft = use_draft

    def _crop(self, img: Image.Image, box: tuple[float, float, float, float], rng: random.Random) -> torch.Tensor:
        out = img.resize((self.image_size, self.image_size), _RESAMPLE, box=box)
        if rng.random() < self.hflip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return _to_chw_uint8(out)

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        rng = rng or random
        img = img if img.mode == "RGB" else img.convert("RGB")
        left, top, w, h = sample_crop_box(img.width, img.height, self.scale, self.ratio, rng)
        return self._crop(img, (left, top, left + w, top + h), rng)

    def from_bytes(self, data: bytes, rng: random.Random | None = None) -> torch.Tensor:
        """Decode + transform; the crop box is drawn from the header size, then a draft decode is requested."""
        rng = rng or random
        header = Image.open(io.BytesIO(data))
        width, height = header.size
        left, top, w, h = sample_crop_box(width, height, self.scale, self.ratio, rng)
        requested = None
        if self.use_draft and header.format == "JPEG":
            # smallest decode in which the crop still has >= image_size pixels on both sides
            requested = (math.ceil(width * self.image_size / w), math.ceil(height * self.image_size / h))
        img = _open_rgb(data, requested)
        sx, sy = img.width / width, img.height / height
        return self._crop(img, (left * sx, top * sy, (left + w) * sx, (top + h) * sy), rng)


class EvalTransform:
    """Resize the shorter side to image_size / crop_pct, center crop image_size; uint8 CHW output."""

    def __init__(self, image_size: int, crop_pct: float = 0.875, use_draft: bool = True):
        self.image_size = int(image_size)
        self.crop_pct = float(crop_pct)
        self.resize_size = int(math.floor(self.image_size / self.crop_pct))
        self.use_draft = use_draft

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        img = img if img.mode == "RGB" else img.convert("RGB")
        width, height = img.size
        scale = self.resize_size / min(width, height)
        new_w, new_h = max(self.image_size, round(width * scale)), max(self.image_size, round(height * scale))
        left, top = (new_w - self.image_size) / 2 / scale, (new_h - self.image_size) / 2 / scale
        box = (left, top, left + self.image_size / scale, top + self.image_size / scale)
        return _to_chw_uint8(img.resize((self.image_size, self.image_size), _RESAMPLE, box=box))

    def from_bytes(self, data: bytes, rng: random.Random | None = None) -> torch.Tensor:
        header = Image.open(io.BytesIO(data))
        width, height = header.size
        requested = None
        if self.use_draft and header.format == "JPEG":
            factor = self.resize_size / min(width, height)
            requested = (math.ceil(width * factor), math.ceil(height * factor))
        return self(_open_rgb(data, requested))


def create_train_transform(image_size: int, *, scale: Sequence[float] = (0.08, 1.0), hflip: float = 0.5,
                           ratio: Sequence[float] = (3 / 4, 4 / 3), use_draft: bool = True) -> TrainTransform:
    """Training augmentation: PIL image (or bytes via `.from_bytes`) -> uint8 [3, image_size, image_size]."""
    return TrainTransform(image_size, scale=scale, ratio=ratio, hflip=hflip, use_draft=use_draft)


def create_eval_transform(image_size: int, crop_pct: float = 0.875, *, use_draft: bool = True) -> EvalTransform:
    """Evaluation preprocessing (timm's center-crop convention): -> uint8 [3, image_size, image_size]."""
    return EvalTransform(image_size, crop_pct=crop_pct, use_draft=use_draft)


def decode_and_transform(data: bytes, transform, rng: random.Random | None = None) -> torch.Tensor:
    """Apply `transform` to image bytes: its fast `from_bytes` path when it has one, else PIL decode first."""
    from_bytes = getattr(transform, "from_bytes", None)
    if from_bytes is not None:
        return from_bytes(data, rng=rng)
    img = _open_rgb(data)
    out = transform(img)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"transform {transform!r} returned {type(out).__name__}, expected a uint8 tensor")
    return out


def normalize(batch_uint8: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float (x/255 - mean) / std, computed on the tensor's own device."""
    if batch_uint8.dim() < 3 or batch_uint8.shape[-3] != len(mean):
        raise ValueError(f"normalize: expected [..., {len(mean)}, H, W], got {tuple(batch_uint8.shape)}")
    device = batch_uint8.device
    scale = torch.tensor([255.0 * s for s in std], device=device, dtype=dtype).view(-1, 1, 1)
    shift = torch.tensor([255.0 * m for m in mean], device=device, dtype=dtype).view(-1, 1, 1)
    return (batch_uint8.to(dtype) - shift) / scale
