"""Where a checkpoint is built and how it is put in place: the Atomicity rules of pretrain.checkpoint.

A checkpoint is built in a sibling `.staging-NAME`, SHA256SUMS last. Locally the staging dir is
renamed onto the target. Object stores have no rename: the complete staging dir is copied over the
target (server-side copies, SHA256SUMS last) and removed after; while the target is being replaced
its SHA256SUMS is absent and `readable_url` sends readers to the complete staging copy, so a URL
that held a valid checkpoint always does.
"""

from __future__ import annotations

import os
import posixpath
import shutil

import fsspec

from data_pipeline.dataset import is_local

SUMS_FILE = "SHA256SUMS"  # pretrain.checkpoint.SUMS_FILE: written last, it marks a checkpoint complete


def staging_url(url: str) -> str:
    """Where the checkpoint for `url` is built: the sibling `.staging-NAME` (same filesystem)."""
    base = str(url).rstrip("/")
    parent, name = base.rsplit("/", 1) if "/" in base else ("", base)
    return f"{parent}/.staging-{name}" if parent else f".staging-{name}"


def readable_url(url: str) -> str:
    """`url`, or its complete staging dir while `url` is being replaced."""
    fs, root = fsspec.core.url_to_fs(str(url))
    if fs.exists(posixpath.join(root.rstrip("/"), SUMS_FILE)):
        return url
    staging = staging_url(url)
    return staging if fs.exists(posixpath.join(fsspec.core.url_to_fs(staging)[1], SUMS_FILE)) else url


def commit(fs, staging: str, target: str) -> None:
    """Put the complete checkpoint at path `staging` in place of path `target` on `fs`."""
    if is_local(fs):
        if os.path.exists(target):  # a re-run of the same step: the old one is moved aside first
            trash = f"{staging}.old"
            shutil.rmtree(trash, ignore_errors=True)
            os.rename(target, trash)
            os.rename(staging, target)
            shutil.rmtree(trash)
        else:
            os.rename(staging, target)
        return
    if fs.exists(target):
        if fs.exists(posixpath.join(target, SUMS_FILE)):
            fs.rm(posixpath.join(target, SUMS_FILE))  # first: from now on readers take the complete staging dir
        fs.rm(target, recursive=True)
    files = sorted(posixpath.relpath(p, staging.rstrip("/")) for p in fs.find(staging))
    for rel in [r for r in files if r != SUMS_FILE] + [SUMS_FILE]:  # server-side copies, SHA256SUMS last
        fs.copy(posixpath.join(staging, rel), posixpath.join(target, rel))
    fs.rm(staging, recursive=True)
