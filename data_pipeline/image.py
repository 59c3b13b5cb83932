"""Turn downloaded bytes into the stored image: checked, oriented, RGB, resized, JPEG.

    result = process_image(data, ImageOptions(image_size=256))
    result.jpg, result.width, result.height   # or result.reason ("not_an_image", "too_small", ...)

Order matters for cost and safety: the header is parsed first and the pixel count refused
*before* any decoding (decompression bombs), large JPEGs are decoded DCT-scaled (`draft`) close
to the target size, and an RGB baseline JPEG that already fits is stored byte for byte (its
entropy data is still decoded at 1/8 scale to detect truncation, which costs little) only when
it carries nothing but pixels: no EXIF (GPS), comments, other APP segments or trailing bytes;
anything else is re-encoded, which drops all metadata.

Only the formats in `FORMATS` are ever parsed: `Image.open` would otherwise hand EPS/PostScript
to Ghostscript where it is installed, and exotic decoders are attack surface we do not need.
Reasons: `not_an_image`, `too_many_pixels`, `too_small`, `truncated`, `decode_error`.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP")  # multi-picture (MPO) files open through JPEG
JPEG_FORMATS = ("JPEG", "MPO")
EXIF_ORIENTATION = 0x0112
# Segments a plain baseline JPEG needs: SOF0, DHT, DQT, DRI; APP0 only as the 16-byte JFIF header.
PLAIN_JPEG_MARKERS = frozenset({0xC0, 0xC4, 0xDB, 0xDD})
SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7]")  # any marker but stuffing and restarts
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
# Filters for the final resize. After a DCT-scaled decode the remaining factor is below 2, where
# Pillow's antialiased bilinear (a triangle filter, like OpenCV's INTER_AREA in cost and look) takes
# two thirds of bicubic's time; the resize is half of all the CPU ingestion spends on an image.
RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
            "lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX}


@dataclass(frozen=True)
class ImageOptions:
    image_size: int = 256          # px, the stored shorter side at most (never upscaled)
    min_side: int = 16             # px, smaller images are refused
    max_pixels: int = 64_000_000   # width*height above this is refused before decoding
    jpeg_quality: int = 90
    keep_original: bool = True     # store qualifying JPEG bytes untouched
    resample: str = "bilinear"     # filter of the final resize: a key of RESAMPLE


@dataclass(frozen=True)
class ProcessedImage:
    jpg: bytes | None
    reason: str = ""
    width: int = 0                 # stored size
    height: int = 0
    original_width: int = 0        # as displayed (after EXIF orientation), before resizing
    original_height: int = 0


def _failed(reason: str, width: int = 0, height: int = 0) -> ProcessedImage:
    return ProcessedImage(None, reason, original_width=width, original_height=height)


def target_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """(w, h) with the shorter side at most `image_size`, aspect kept, never upscaled."""
    short = min(width, height)
    if short <= image_size:
        return width, height
    scale = image_size / short
    if width <= height:
        return image_size, max(1, round(height * scale))
    return max(1, round(width * scale)), image_size


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except (ValueError, TypeError, OSError, SyntaxError):
        return 1  # unreadable EXIF: treat as upright rather than fail the image


def plain_jpeg(data: bytes) -> bool:
    """True for a single-scan baseline JPEG with no metadata segments and nothing after its end."""
    if data[:2] != b"\xff\xd8":
        return False
    pos = 2
    while True:
        if pos + 4 > len(data) or data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == 0xDA:
            break
        if marker == 0xE0:
            if length != 16 or data[pos + 4:pos + 9] != b"JFIF\0":
                return False
        elif marker not in PLAIN_JPEG_MARKERS:
            return False
        pos += 2 + length
    end = SCAN_END.search(data, pos + 2 + length)
    return end is not None and end.start() == len(data) - 2 and data[-1] == 0xD9


def _keeps_original(im: Image.Image, data: bytes, opts: ImageOptions, orientation: int) -> bool:
    return (opts.keep_original and im.format == "JPEG" and im.mode == "RGB"
            and not im.info.get("progressive") and not im.info.get("progression")
            and orientation == 1 and min(im.size) <= opts.image_size and plain_jpeg(data))


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha composited on white, 16-bit scaled to 8-bit, palettes expanded."""
    if im.mode == "RGB":
        return im
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in SIXTEEN_BIT_MODES:
        array = np.asarray(im)
        if im.mode == "F":
            array = np.clip(array, 0, 255)
        elif im.mode.startswith("I;16") or array.max(initial=0) > 255:
            array = np.asarray(array, dtype=np.int64) >> 8  # 16-bit range to 8-bit (convert() would clip)
        return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode in ALPHA_MODES:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def process_image(data: bytes, opts: ImageOptions) -> ProcessedImage:
    """Validate and convert one downloaded image; never raises for bad input."""
    try:
        im = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:
        return _failed("too_many_pixels")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return _failed("not_an_image")
    with im:
        width, height = im.size
        if width * height > opts.max_pixels:
            return _failed("too_many_pixels", width, height)
        if min(width, height) < opts.min_side:
            return _failed("too_small", width, height)
        orientation = _orientation(im)
        shown = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
        keep = _keeps_original(im, data, opts, orientation)
        try:
            if im.format in JPEG_FORMATS:
                # DCT-scaled decode: 1/8 only to check the stream when keeping, else near the target
                wanted = (math.ceil(width / 8), math.ceil(height / 8)) if keep else \
                    target_size(width, height, opts.image_size)
                im.draft("RGB" if im.mode in ("RGB", "YCbCr") else im.mode, wanted)
            im.seek(0)  # first frame of an animation
            im.load()
        except Image.DecompressionBombError:
            return _failed("too_many_pixels", *shown)
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            reason = "truncated" if "truncat" in str(exc).lower() or isinstance(exc, EOFError) else "decode_error"
            return _failed(reason, *shown)
        if keep:
            return ProcessedImage(data, "", width, height, width, height)
        try:
            if orientation != 1:
                im = ImageOps.exif_transpose(im)
            rgb = to_rgb(im)
        except (OSError, ValueError) as exc:
            return _failed("decode_error" if "truncat" not in str(exc) else "truncated", *shown)
        size = target_size(*shown, opts.image_size)
        if rgb.size != size:
            rgb = rgb.resize(size, RESAMPLE[opts.resample])
        rgb.info = {}  # Pillow would carry comments/XMP of the source into the new file
        out = io.BytesIO()
        rgb.save(out, "JPEG", quality=opts.jpeg_quality)
        return ProcessedImage(out.getvalue(), "", size[0], size[1], shown[0], shown[1])
