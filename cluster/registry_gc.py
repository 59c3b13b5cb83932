"""Collect what abandoned publishes leave in a registry: `megaclass registry gc --older-than 24h`.

A publisher that dies leaves either its `NAME/.staging/ID/` folder (files copied, no number claimed
yet) or a claimed `NAME/versions/NNNNNN/` without version.json (which is not a version). Neither is
ever read. Both are removed once nothing in them changed for `older_than_s`; of a claimed folder the
`.claim` file stays, so that the number is never handed out again. Complete versions are never touched.
A publish in progress keeps writing fresh files, so a cut-off of hours is safe; 0 is for when no
publisher can be running.
"""

from __future__ import annotations

import posixpath
import re
import time
from dataclasses import dataclass, field

from cluster.registry import CLAIM_FILE, STAGING_DIR, VERSION_FILE, Registry

DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration_s(text: str) -> float:
    """'90s', '30m', '24h', '7d' -> seconds (ValueError otherwise)."""
    match = DURATION_RE.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a duration like 90s, 30m, 24h or 7d")
    return float(match.group(1)) * UNIT_S[match.group(2)]


@dataclass
class GcReport:
    removed: list[str] = field(default_factory=list)   # URLs of the folders removed (or emptied but for .claim)
    kept_recent: list[str] = field(default_factory=list)
    bytes_freed: int = 0


def _url(reg: Registry, path: str) -> str:
    return reg.root_url + "/" + posixpath.relpath(path, reg.root)


def collect_garbage(reg: Registry, older_than_s: float, dry_run: bool = False) -> GcReport:
    report = GcReport()
    cutoff = time.time() - older_than_s
    fs = reg.fs
    for name in reg.names() + [n for n in _names_with_staging_only(reg) if n not in reg.names()]:
        doomed: list[tuple[str, bool]] = []  # (folder, keep the claim file)
        staging_root = reg._path(name, STAGING_DIR)
        if fs.exists(staging_root):
            doomed += [(p.rstrip("/"), False) for p in fs.ls(staging_root, detail=False)]
        for number in reg._numbered_dirs(name):
            folder = reg._version_path(name, number)
            if not fs.exists(posixpath.join(folder, VERSION_FILE)):
                doomed.append((folder, True))
        for folder, keep_claim in doomed:
            files = fs.find(folder, detail=True)
            doomed_files = {p: info for p, info in files.items() if not (keep_claim and posixpath.basename(p) == CLAIM_FILE)}
            if not doomed_files:
                continue  # only the claim is left: nothing to collect
            if max(fs.modified(p).timestamp() for p in files) > cutoff:  # the claim too: a publish may be running
                report.kept_recent.append(_url(reg, folder))
                continue
            report.removed.append(_url(reg, folder))
            report.bytes_freed += sum(int(info.get("size") or 0) for info in doomed_files.values())
            if dry_run:
                continue
            if keep_claim:
                fs.rm(list(doomed_files))
            else:
                fs.rm(folder, recursive=True)
    return report


def _names_with_staging_only(reg: Registry) -> list[str]:
    """Model names whose only content is a staging folder (a first publish that died)."""
    if not reg.fs.exists(reg.root):
        return []
    found = (posixpath.basename(p.rstrip("/")) for p in reg.fs.ls(reg.root, detail=False))
    return sorted(n for n in found if reg.fs.exists(reg._path(n, STAGING_DIR)))
