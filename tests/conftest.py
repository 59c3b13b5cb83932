"""Shared test fixtures and helpers: a loopback HTTP server, image bytes, free TCP ports.

Fixtures (pytest finds them by name):
    http_server    a `LoopbackServer` on 127.0.0.1 for the test module (routes added per test)

Helpers (`from tests.conftest import ...`):
    encode_image(image, "PNG", ...)     bytes of a PIL image in any format Pillow writes
    solid_jpeg(width, height, color)    a flat JPEG (small, fast to make)
    noise_jpeg(seed, width, height)     a deterministic textured JPEG (compresses like a photo)
    free_port()                         a TCP port nothing listens on right now (never a fixed port)
"""

from __future__ import annotations

import io
import socket
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from tests.http_server import LoopbackServer


def encode_image(image: Image.Image, fmt: str = "JPEG", **save_args) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **save_args)
    return buf.getvalue()


def solid_jpeg(width: int, height: int, color: tuple[int, int, int] = (200, 30, 30), quality: int = 90) -> bytes:
    return encode_image(Image.new("RGB", (width, height), color), "JPEG", quality=quality)


def noise_jpeg(seed: int, width: int, height: int, quality: int = 90) -> bytes:
    """A random base colour plus noise: not flat, so sizes and decode costs look like real images."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(1, 1, 3))
    noise = rng.integers(0, 64, size=(height, width, 3))
    return encode_image(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB"), "JPEG",
                        quality=quality)


def free_port() -> int:
    """A port the OS just handed out on 127.0.0.1 (racy only against other processes binding port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def http_server() -> Iterator[LoopbackServer]:
    with LoopbackServer() as server:
        yield server
