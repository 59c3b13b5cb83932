"""Ingestion (web images -> WebDataset shards) and the shard reader: the bottom package of megaclass."""

# The allocator settings for every process that decodes JPEGs or trains (BENCHMARKS.md, "Reference
# figures"): without them first-touch page faults cost decode and training ~40%. glibc reads the
# MALLOC_* variables at process start, so they go into the environment of the processes we start
# (Ray workers, torchrun ranks, subprocesses) and are applied with mallopt in forked loader workers.
# Kept here, in a module that imports nothing at import time, so scripts can set them before
# importing torch or PIL.
ALLOCATOR_ENV = {
    "PILLOW_BLOCKS_MAX": "64",
    "MALLOC_MMAP_THRESHOLD_": "67108864",
    "MALLOC_TRIM_THRESHOLD_": "1073741824",
}


def apply_allocator_settings() -> None:
    """`ALLOCATOR_ENV` applied inside a running process (a forked worker): glibc read MALLOC_* at
    its start, so the same effect is set with mallopt; Pillow's block cache through its API."""
    import ctypes
    import os

    from PIL import Image

    for name, value in ALLOCATOR_ENV.items():
        os.environ.setdefault(name, value)
    Image.core.set_blocks_max(int(os.environ["PILLOW_BLOCKS_MAX"]))
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, int(os.environ["MALLOC_MMAP_THRESHOLD_"]))
    libc.mallopt(M_TRIM_THRESHOLD, int(os.environ["MALLOC_TRIM_THRESHOLD_"]))
