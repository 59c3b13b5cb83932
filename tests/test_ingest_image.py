"""Image processing at ingestion: every PIL mode to RGB, orientation, sizes, refusals (no I/O)."""

import io

import numpy as np
import pytest
from PIL import Image

from tests.conftest import encode_image
from data_pipeline.image import ImageOptions, process_image, target_size

OPTS = ImageOptions(image_size=32, min_side=16, max_pixels=1_000_000, jpeg_quality=90)


def decoded(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def test_small_rgb_baseline_jpeg_kept_byte_for_byte():
    data = encode_image(Image.new("RGB", (30, 20), (10, 200, 30)), "JPEG", quality=80)
    result = process_image(data, OPTS)
    assert result.jpg == data and (result.width, result.height) == (30, 20)


def test_large_jpeg_resized_shorter_side_without_upscaling():
    data = encode_image(Image.new("RGB", (400, 100), (10, 200, 30)), "JPEG")
    result = process_image(data, OPTS)
    assert (result.width, result.height) == (128, 32) and decoded(result.jpg).size == (128, 32)
    assert target_size(20, 10, 32) == (20, 10)  # never upscaled


def test_resample_filter_is_the_one_configured():
    rng = np.random.default_rng(0)
    data = encode_image(Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)), "JPEG")
    out = {name: process_image(data, ImageOptions(image_size=40, resample=name)) for name in ("bilinear", "bicubic")}
    assert all((r.width, r.height) == (53, 40) for r in out.values())
    assert out["bilinear"].jpg != out["bicubic"].jpg  # the option reaches the resize


def test_progressive_jpeg_reencoded():
    data = encode_image(Image.new("RGB", (30, 20), (10, 200, 30)), "JPEG", progressive=True)
    result = process_image(data, OPTS)
    assert result.jpg != data and decoded(result.jpg).info.get("progressive") is None


def test_exif_orientation_applied():
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to display
    result = process_image(encode_image(im, "JPEG", exif=exif.tobytes(), quality=95), OPTS)
    out = decoded(result.jpg)
    assert out.size == (20, 40) and (result.original_width, result.original_height) == (20, 40)
    top = np.asarray(out)[2, 10]
    assert top[2] > 200 and top[0] < 60  # blue ends up on top after a clockwise turn


def make_mode(mode: str) -> bytes:
    if mode == "CMYK":
        return encode_image(Image.new("CMYK", (24, 24), (0, 255, 255, 0)), "JPEG")
    if mode == "P":
        return encode_image(Image.new("RGB", (24, 24), (200, 0, 0)).convert("P"), "PNG")
    if mode == "P-transparent":
        im = Image.new("P", (24, 24), 0)
        im.putpalette([0, 0, 0, 255, 0, 0])
        return encode_image(im, "PNG", transparency=0)  # index 0 fully transparent -> white
    if mode == "RGBA":
        return encode_image(Image.new("RGBA", (24, 24), (0, 0, 0, 0)), "PNG")
    if mode == "LA":
        return encode_image(Image.new("LA", (24, 24), (0, 0)), "PNG")
    if mode == "I;16":
        return encode_image(Image.fromarray(np.full((24, 24), 65535, np.uint16)), "PNG")
    if mode == "L":
        return encode_image(Image.new("L", (24, 24), 255), "JPEG")
    if mode == "1":
        return encode_image(Image.new("1", (24, 24), 1), "PNG")
    if mode == "WEBP-RGBA":
        return encode_image(Image.new("RGBA", (24, 24), (0, 0, 0, 0)), "WEBP", lossless=True)
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["CMYK", "P", "P-transparent", "RGBA", "LA", "I;16", "L", "1", "WEBP-RGBA"])
def test_every_mode_becomes_rgb(mode):
    result = process_image(make_mode(mode), OPTS)
    assert result.reason == "" and result.jpg is not None
    out = decoded(result.jpg)
    assert out.mode == "RGB" and out.size == (24, 24)
    pixel = np.asarray(out)[12, 12].astype(int)
    if mode == "CMYK" or mode == "P":
        assert pixel[0] > 180 and pixel[1] < 60  # red
    else:
        assert pixel.min() > 230  # white: transparent on white, or full-scale gray/16-bit/1-bit


def test_animation_first_frame():
    frames = [Image.new("RGB", (24, 24), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100)
    out = decoded(process_image(buf.getvalue(), OPTS).jpg)
    assert np.asarray(out)[5, 5][0] > 200 and np.asarray(out)[5, 5][2] < 60


def test_refusals():
    assert process_image(b"<html>not an image</html>", OPTS).reason == "not_an_image"
    assert process_image(b"", OPTS).reason == "not_an_image"
    assert process_image(encode_image(Image.new("RGB", (15, 40)), "PNG"), OPTS).reason == "too_small"
    assert process_image(encode_image(Image.new("RGB", (16, 16)), "PNG"), OPTS).jpg is not None  # 16 px passes
    bomb = encode_image(Image.new("1", (2000, 1000)), "PNG")  # 2 Mpx, a few kB
    assert len(bomb) < 10_000 and process_image(bomb, OPTS).reason == "too_many_pixels"


@pytest.mark.parametrize("size", [(32, 32), (400, 300)])
def test_truncated_jpeg(size):
    rng = np.random.default_rng(0)
    data = encode_image(Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)), "JPEG")
    assert process_image(data[: len(data) * 4 // 5], OPTS).reason == "truncated"  # kept and resized paths
