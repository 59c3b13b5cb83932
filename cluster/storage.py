"""Storage primitives on any fsspec filesystem: create-if-absent, a lock file, hashing copies.

The registry's concurrency rests on one operation, creating a file only if it does not exist:
locally a hard link of a complete temporary file (atomic, never seen half-written), elsewhere
fsspec's mode "xb" (memory://; s3fs sends it as a conditional put, If-None-Match, reliably for
all file sizes since 2025.7; check other object-store filesystems before relying on it). Everything else here is built on it or is plain streaming I/O.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import socket
import time
import uuid

from fsspec.implementations.local import LocalFileSystem

CHUNK_BYTES = 4 << 20


def create_exclusive(fs, path: str, data: bytes) -> bool:
    """Create `path` with `data` unless it exists; True when this call created it."""
    if isinstance(fs, LocalFileSystem):
        # A hard link of a complete temp file: atomic and never visible half-written.
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    try:
        with fs.open(path, "xb") as f:
            f.write(data)
        return True
    except FileExistsError:
        return False


def hash_file(fs, path: str) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def copy_hashing(src_fs, src: str, dst_fs, dst: str) -> tuple[str, int]:
    """Copy one file between filesystems and return the sha256 and size of what was read."""
    h, size = hashlib.sha256(), 0
    parent = posixpath.dirname(dst)
    if parent:
        dst_fs.makedirs(parent, exist_ok=True)
    with src_fs.open(src, "rb") as fin, dst_fs.open(dst, "wb") as fout:
        while chunk := fin.read(CHUNK_BYTES):
            h.update(chunk)
            size += len(chunk)
            fout.write(chunk)
    return h.hexdigest(), size


class FileLock:
    """Mutual exclusion through a create-if-absent file, held for a short read-modify-write.

    A lock older than `stale_s` was left by a crashed holder and is removed. (Two waiters that
    both judge it stale could both proceed once; acceptable for a crash-only path.)
    """

    def __init__(self, fs, path: str, timeout_s: float = 60.0, stale_s: float = 30.0):
        self.fs, self.path, self.timeout_s, self.stale_s = fs, path, timeout_s, stale_s

    def __enter__(self):
        deadline = time.monotonic() + self.timeout_s
        self.fs.makedirs(posixpath.dirname(self.path), exist_ok=True)
        while True:
            stamp = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "created": time.time()})
            if create_exclusive(self.fs, self.path, stamp.encode()):
                return self
            self._break_if_stale()
            if time.monotonic() > deadline:
                from cluster.registry import RegistryError  # here: cluster.registry imports this module
                raise RegistryError(f"{self.path}: lock held for over {self.timeout_s:.0f} s")
            time.sleep(0.01 + 0.02 * (uuid.uuid4().int % 100) / 100)

    def _break_if_stale(self) -> None:
        try:
            with self.fs.open(self.path, "rb") as f:
                created = float(json.loads(f.read())["created"])
        except FileNotFoundError:
            return
        except (ValueError, KeyError):
            created = 0.0  # unreadable lock content: a writer died mid-write long ago or now; age decides
        if time.time() - created > self.stale_s:
            self.fs.rm(self.path)

    def __exit__(self, *exc) -> None:
        self.fs.rm(self.path)
