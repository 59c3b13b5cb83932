"""Ingestion (web images -> WebDataset shards) and the shard reader: the bottom package of megaclass."""

# The allocator settings for every process that decodes JPEGs or trains (BENCHMARKS.md, "Reference
# figures"): without them first-touch page faults cost decode and training ~40%. glibc reads the
# MALLOC_* variables at process start, so they go into the environment of the processes we start
# (Ray workers, torchrun ranks, subprocesses) and are applied with mallopt in forked loader workers.
# Kept here, in a module that imports nothing, so scripts can set them before importing torch or PIL.
ALLOCATOR_ENV = {
    "PILLOW_BLOCKS_MAX": "64",
    "MALLOC_MMAP_THRESHOLD_": "67108864",
    "MALLOC_TRIM_THRESHOLD_": "1073741824",
}
