"""Contract 3, the model registry (format version 1): immutable numbered versions of checkpoints.

    REGISTRY/NAME/versions/NNNNNN/   a contract-2 checkpoint without train_state/, plus version.json
    REGISTRY/NAME/aliases.json       {"production": 2, "candidate": 3}; `latest` is computed
    REGISTRY/NAME/.staging/ID/       files of a publish in progress (never read)

The root is any fsspec URL: `--registry`, else $MEGACLASS_REGISTRY, else
~/.local/share/megaclass/registry. A publish copies and hashes the checkpoint into `.staging/`,
claims the next free number by creating `versions/NNNNNN/.claim` with create-if-absent, moves the
staged files in, and writes `version.json` last, also create-if-absent. The claim (not only
version.json) is exclusive so that two publishers never write files into the same folder on object
stores, where "moving" is copying. A folder without version.json is not a version. Create-if-absent
is a hard link of a complete temporary file locally (atomic, never a half-written file) and
fsspec's mode "xb" elsewhere (memory://; s3fs maps it to a conditional put since 2025.7; a
filesystem without that primitive cannot host concurrent publishers safely).

Aliases move by compare-and-swap: the read-check-write of aliases.json happens under a lock file
created the same create-if-absent way (held for milliseconds; a lock older than
`ALIAS_LOCK_STALE_S` is left from a crashed writer and is broken). `expected` makes the swap
conditional on the alias's current value.

    reg = Registry("memory://reg"); v = reg.publish("runs/r1/final", "resnet-web", alias="candidate")
    path = reg.resolve("registry://resnet-web@candidate")   # verified local folder
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil
import socket
import subprocess
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from cluster.signing import SignatureError, check_signature, sign
from cluster.storage import FileLock, copy_hashing, create_exclusive, hash_file
from data_pipeline.dataset import atomic_write_json
from pretrain.checkpoint import (CHECKPOINT_FILES, CONFIG_FILE, SUMS_FILE, TRAIN_STATE_DIR, CheckpointError,
                                 format_sums, parse_sums)

FORMAT_VERSION = 1
SCHEME = "registry://"
VERSION_FILE = "version.json"
ALIASES_FILE = "aliases.json"
CLAIM_FILE = ".claim"
STAGING_DIR = ".staging"
VERSIONS_DIR = "versions"
REQUIRED_FILES = CHECKPOINT_FILES[:-1]  # a version holds exactly these and SUMS_FILE (contract 2 without train_state/)
LATEST = "latest"
ALIAS_LOCK_STALE_S = 30.0
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # always fullmatch: `$` accepts a trailing newline


class RegistryError(ValueError):
    """A missing, incomplete or altered version, a bad name, or a lost compare-and-swap."""


class AliasConflict(RegistryError):
    """set_alias(expected=...) found the alias pointing elsewhere."""


def default_registry_url() -> str:
    return os.environ.get("MEGACLASS_REGISTRY") or str(Path.home() / ".local/share/megaclass/registry")


def default_cache_dir() -> str:
    return os.environ.get("MEGACLASS_CACHE") or str(Path.home() / ".cache/megaclass/registry")


def validate_name(value: str, field: str) -> str:
    """A model name or alias: no separators, no '..', so it can never leave its folder."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value) or ".." in value:
        raise RegistryError(f"{field}: {value!r} is not a valid name (letters, digits, '.', '_', '-'; "
                            f"starts with a letter or digit; at most 128 characters; no '..')")
    return value


def parse_ref(ref: str, field: str = "model") -> tuple[str, int | None, str | None]:
    """`[registry://]NAME`, `NAME/VERSION` or `NAME@ALIAS` -> (name, version, alias)."""
    body = ref[len(SCHEME):] if ref.startswith(SCHEME) else ref
    if "@" in body:
        name, alias = body.split("@", 1)
        return validate_name(name, f"{field} name"), None, validate_name(alias, f"{field} alias")
    if "/" in body:
        name, version = body.split("/", 1)
        if version == LATEST:
            return validate_name(name, f"{field} name"), None, LATEST
        if not version.isdigit() or int(version) < 1:
            raise RegistryError(f"{field} version: {version!r} is not a positive integer (in {ref!r})")
        return validate_name(name, f"{field} name"), int(version), None
    return validate_name(body, f"{field} name"), None, None


def code_revision() -> str:
    """git HEAD of the source tree when there is one, else the installed package version."""
    src = Path(__file__).resolve().parents[1]
    if (src / ".git").exists():
        try:
            head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True,
                                  text=True, timeout=10, check=True).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return head + ("+dirty" if dirty else "")
        except (OSError, subprocess.SubprocessError):
            pass  # no usable git: fall through to the package version
    from importlib.metadata import PackageNotFoundError, version
    try:
        return f"megaclass=={version('megaclass')}"
    except PackageNotFoundError:
        return "unknown"


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Registry:
    """One registry root. Methods take validated names; URIs go through `resolve`."""

    def __init__(self, root_url: str | None = None, cache_dir: str | None = None, trust: list | None = None):
        """trust: Ed25519 public keys (cluster.signing); when given, resolve and verify refuse versions
        that are not signed by one of them."""
        self.root_url = str(root_url or default_registry_url()).rstrip("/")
        self.trust = list(trust or [])
        self.fs, self.root = fsspec.core.url_to_fs(self.root_url)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.cache_dir = cache_dir or default_cache_dir()

    def __repr__(self) -> str:
        return f"Registry({self.root_url!r})"

    # --- layout -------------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _version_path(self, name: str, version: int) -> str:
        return self._path(name, VERSIONS_DIR, f"{version:06d}")

    def _numbered_dirs(self, name: str) -> list[int]:
        """Every claimed number, complete or not."""
        base = self._path(name, VERSIONS_DIR)
        if not self.fs.exists(base):
            return []
        entries = (posixpath.basename(p.rstrip("/")) for p in self.fs.ls(base, detail=False))
        return sorted(int(e) for e in entries if len(e) == 6 and e.isdigit())

    # --- reading ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        found = (posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False))
        return sorted(n for n in found if NAME_RE.fullmatch(n) and self.fs.exists(self._path(n, VERSIONS_DIR)))

    def versions(self, name: str) -> list[int]:
        """Complete versions (those with version.json), ascending."""
        validate_name(name, "name")
        return [v for v in self._numbered_dirs(name)
                if self.fs.exists(posixpath.join(self._version_path(name, v), VERSION_FILE))]

    def latest(self, name: str) -> int | None:
        versions = self.versions(name)
        return versions[-1] if versions else None

    def aliases(self, name: str) -> dict[str, int]:
        validate_name(name, "name")
        path = self._path(name, ALIASES_FILE)
        if not self.fs.exists(path):
            return {}
        with self.fs.open(path, "rb") as f:
            data = f.read()
        try:
            table = json.loads(data)
            if isinstance(table, dict) and all(type(v) is int and NAME_RE.fullmatch(k) for k, v in table.items()):
                return table
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
            pass  # reported below
        raise RegistryError(f"{self.root_url}/{name}/{ALIASES_FILE}: not a JSON object of alias -> version number")

    def list(self) -> list[dict[str, Any]]:
        """One summary per model name: versions, latest, aliases."""
        out = []
        for name in self.names():
            versions = self.versions(name)
            out.append({"name": name, "versions": versions, "latest": versions[-1] if versions else None,
                        "aliases": self.aliases(name)})
        return out

    def lookup(self, name: str, version: int | None = None, alias: str | None = None) -> int:
        """The version number a (name, version | alias | nothing = latest) reference denotes."""
        validate_name(name, "name")
        if version is not None:
            if version not in self.versions(name):
                incomplete = version in self._numbered_dirs(name)
                raise RegistryError(f"registry://{name}/{version}: no such version in {self.root_url}"
                                    + (" (no version.json: an incomplete publish)" if incomplete else ""))
            return version
        if alias is None or alias == LATEST:
            latest = self.latest(name)
            if latest is None:
                raise RegistryError(f"registry://{name}: no published versions in {self.root_url}")
            return latest
        aliases = self.aliases(name)
        if alias not in aliases:
            raise RegistryError(f"registry://{name}@{alias}: no such alias (has: "
                                f"{', '.join(sorted(aliases)) or 'none'}, and the computed 'latest')")
        return self.lookup(name, version=aliases[alias])

    def show(self, name: str, version: int | None = None, alias: str | None = None) -> dict[str, Any]:
        """version.json of one version, plus the aliases that point at it."""
        version = self.lookup(name, version, alias)
        info = self._read_version_json(name, version)
        pointing = sorted(a for a, v in self.aliases(name).items() if v == version)
        if version == self.latest(name):
            pointing.append(LATEST)
        return {**info, "aliases": pointing}

    def _read_version_json(self, name: str, version: int) -> dict[str, Any]:
        path = posixpath.join(self._version_path(name, version), VERSION_FILE)
        try:
            with self.fs.open(path, "rb") as f:
                info = json.loads(f.read())
        except FileNotFoundError:
            raise RegistryError(f"registry://{name}/{version}: no {VERSION_FILE}; not a complete version") from None
        except json.JSONDecodeError as exc:
            raise RegistryError(f"registry://{name}/{version}: {VERSION_FILE} is not valid JSON ({exc})") from None
        if not isinstance(info, dict) or info.get("format_version") != FORMAT_VERSION \
                or info.get("version") != version or info.get("name") != name:
            raise RegistryError(f"registry://{name}/{version}: {VERSION_FILE} does not describe this version "
                                f"(format {info.get('format_version')!r}, name {info.get('name')!r}, "
                                f"version {info.get('version')!r})")
        files = info.get("files")
        # Only the layout's own names: a name from this file becomes a path when the version is fetched.
        if not isinstance(files, dict) or set(files) != set(CHECKPOINT_FILES) or not all(
                isinstance(e, dict) and isinstance(e.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", e["sha256"])
                and type(e.get("bytes")) is int and e["bytes"] >= 0 for e in files.values()):
            raise RegistryError(f"registry://{name}/{version}: {VERSION_FILE} 'files' must map exactly "
                                f"{', '.join(CHECKPOINT_FILES)} to {{sha256, bytes}}; got {sorted(files or [])!r}"[:300])
        if self.trust:
            try:
                check_signature(info, self.trust, f"registry://{name}/{version} ({VERSION_FILE})")
            except SignatureError as exc:
                raise RegistryError(str(exc)) from None
        return info

    # --- verification -------------------------------------------------------------------------
    def _check_folder(self, fs, folder: str, files: dict[str, dict]) -> list[str]:
        problems = []
        for rel, entry in sorted(files.items()):
            path = posixpath.join(folder, rel)
            if not fs.exists(path):
                problems.append(f"{rel}: missing")
                continue
            digest, size = hash_file(fs, path)
            if digest != entry["sha256"] or size != entry["bytes"]:
                problems.append(f"{rel}: sha256/size mismatch (recorded {entry['sha256'][:12]}/{entry['bytes']} B, "
                                f"found {digest[:12]}/{size} B)")
        present = {posixpath.relpath(p, folder) for p in fs.find(folder)}
        extra = sorted(present - set(files) - {VERSION_FILE, CLAIM_FILE})
        problems.extend(f"{rel}: not part of the version" for rel in extra)
        return problems

    def verify(self, name: str, version: int | None = None) -> dict[int, list[str]]:
        """Recompute every sha256; {version: problems} for one version or, by default, all."""
        versions = [self.lookup(name, version)] if version is not None else self.versions(name)
        if not versions:
            raise RegistryError(f"registry://{name}: no published versions in {self.root_url}")
        report = {}
        for v in versions:
            try:
                info = self._read_version_json(name, v)
            except RegistryError as exc:
                report[v] = [str(exc)]
                continue
            report[v] = self._check_folder(self.fs, self._version_path(name, v), info["files"])
        return report

    def resolve(self, uri: str) -> str:
        """`registry://NAME@ALIAS` or `registry://NAME/VERSION` -> verified local checkpoint folder.

        The folder is a plain contract-2 checkpoint in the cache (no version.json, which checkpoint
        loaders would reject as a foreign file): hard links into a local registry when possible,
        otherwise a download. It is fetched once and re-verified on every call; any mismatch is refused.
        """
        if not uri.startswith(SCHEME):
            raise RegistryError(f"{uri!r} is not a registry URI (registry://NAME@ALIAS or registry://NAME/VERSION)")
        name, version, alias = parse_ref(uri, "uri")
        version = self.lookup(name, version, alias)
        files = self._read_version_json(name, version)["files"]
        where = f"registry://{name}/{version} in {self.root_url}"
        local = LocalFileSystem()
        root_key = hashlib.sha256(self.root_url.encode()).hexdigest()[:16]
        target = os.path.join(self.cache_dir, root_key, name, f"{version:06d}")
        if os.path.isdir(target) and not self._check_folder(local, target, files):
            return target
        shutil.rmtree(target, ignore_errors=True)  # absent or damaged: fetch afresh
        tmp = f"{target}.tmp-{uuid.uuid4().hex}"
        src = self._version_path(name, version)
        for rel in files:
            self._fetch(posixpath.join(src, rel), os.path.join(tmp, rel))
        problems = self._check_folder(local, tmp, files)
        if problems:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RegistryError(f"{where} fails verification, refusing to use it: {'; '.join(problems)}")
        try:
            os.rename(tmp, target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # a concurrent resolve placed it first
            if self._check_folder(local, target, files):
                raise RegistryError(f"cache copy {target} of {where} is damaged; delete it and retry") from None
        return target

    def _fetch(self, src: str, dst: str) -> None:
        """One file into the cache; a missing source is left for verification to report."""
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if not self.fs.exists(src):
            return
        if self.is_local:
            try:
                os.link(src, dst)  # versions are immutable: share the bytes, verification still reads them
                return
            except OSError:
                pass  # another filesystem (or no hard links): copy below
        copy_hashing(self.fs, src, LocalFileSystem(), dst)

    # --- writing ------------------------------------------------------------------------------
    def publish(self, ckpt_url: str, name: str, alias: str | None = None,
                lineage: dict[str, Any] | None = None, sign_key=None) -> int:
        """Copy a checkpoint (without train_state/) into a new immutable version; returns its number.
        sign_key: an Ed25519 private key (cluster.signing) that signs version.json."""
        validate_name(name, "name")
        if alias is not None:
            self._check_alias_name(alias)
        reserved = sorted({"format_version", "name", "version", "files", "signature"} & set(lineage or {}))
        if reserved:
            raise RegistryError(f"lineage: keys {', '.join(reserved)} are set by the registry itself")
        src_fs, src = fsspec.core.url_to_fs(str(ckpt_url).rstrip("/"))
        sums_path = posixpath.join(src, SUMS_FILE)
        if not src_fs.exists(sums_path):
            raise RegistryError(f"{ckpt_url}: no {SUMS_FILE}; not a complete checkpoint")
        try:
            with src_fs.open(sums_path, "rb") as f:
                sums = parse_sums(f.read(), f"{ckpt_url}/{SUMS_FILE}")
        except CheckpointError as exc:
            raise RegistryError(str(exc)) from None
        sums = {rel: d for rel, d in sums.items() if rel.split("/")[0] != TRAIN_STATE_DIR}
        missing = [rel for rel in REQUIRED_FILES if rel not in sums]
        if missing:
            raise RegistryError(f"{ckpt_url}/{SUMS_FILE}: does not list {', '.join(missing)}")
        with src_fs.open(posixpath.join(src, CONFIG_FILE), "rb") as f:
            config = json.loads(f.read())

        staging = self._path(name, STAGING_DIR, uuid.uuid4().hex)
        files: dict[str, dict[str, Any]] = {}
        try:
            for rel, expected in sorted(sums.items()):
                digest, size = copy_hashing(src_fs, posixpath.join(src, rel), self.fs, posixpath.join(staging, rel))
                if digest != expected:
                    raise RegistryError(f"{ckpt_url}/{rel}: sha256 {digest[:12]} does not match {SUMS_FILE} "
                                        f"({expected[:12]}); the checkpoint is damaged, not publishing")
                files[rel] = {"sha256": digest, "bytes": size}
            # SHA256SUMS without train_state/ lines, so that the published folder checks out on load.
            sums_bytes = format_sums(sums)
            with self.fs.open(posixpath.join(staging, SUMS_FILE), "wb") as f:
                f.write(sums_bytes)
            files[SUMS_FILE] = {"sha256": hashlib.sha256(sums_bytes).hexdigest(), "bytes": len(sums_bytes)}
            version = self._claim(name)
            folder = self._version_path(name, version)
            for rel in files:
                dst = posixpath.join(folder, rel)
                self.fs.makedirs(posixpath.dirname(dst), exist_ok=True)
                self.fs.mv(posixpath.join(staging, rel), dst)
            info = self._version_info(name, version, str(ckpt_url), config, files, lineage or {})
            if sign_key is not None:
                info["signature"] = sign(info, sign_key)
            body = (json.dumps(info, indent=2, sort_keys=True) + "\n").encode()
            if not create_exclusive(self.fs, posixpath.join(folder, VERSION_FILE), body):
                raise RegistryError(f"registry://{name}/{version}: {VERSION_FILE} appeared under our claim; "
                                    f"the registry at {self.root_url} is being written by something else")
        finally:
            if self.fs.exists(staging):
                self.fs.rm(staging, recursive=True)
        if alias is not None:
            self.set_alias(name, alias, version)
        return version

    def _claim(self, name: str) -> int:
        """The next free number, owned exclusively through its `.claim` file."""
        numbers = self._numbered_dirs(name)
        version = (numbers[-1] if numbers else 0) + 1
        stamp = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "created": _utc_now()}).encode()
        for _ in range(10_000):
            folder = self._version_path(name, version)
            self.fs.makedirs(folder, exist_ok=True)
            if create_exclusive(self.fs, posixpath.join(folder, CLAIM_FILE), stamp):
                return version
            version += 1
        raise RegistryError(f"{name}: could not claim a version number in {self.root_url}")

    def _version_info(self, name: str, version: int, source: str, config: dict, files: dict,
                      lineage: dict[str, Any]) -> dict[str, Any]:
        block = config.get("megaclass") or {}
        dataset = block.get("dataset") if isinstance(block.get("dataset"), dict) else {}
        info = {
            "format_version": FORMAT_VERSION,
            "name": name,
            "version": version,
            "created": _utc_now(),
            "source_url": source,
            "run": block.get("run") or block.get("run_name") or os.environ.get("MEGACLASS_RUN_NAME")
            or posixpath.basename(posixpath.dirname(source.rstrip("/"))),
            "dataset_manifest_sha256": block.get("dataset_manifest_sha256") or dataset.get("manifest_sha256"),
            "config": block.get("config") or block.get("training_config"),
            "code_revision": block.get("code_revision") or code_revision(),
            "metrics": block.get("metrics") or {},
            "step": block.get("step"),
            "epoch": block.get("epoch"),
            "architecture": config.get("architecture"),
            "num_classes": config.get("num_classes"),
            "files": files,
        }
        info.update(lineage)
        return info

    def _check_alias_name(self, alias: str) -> None:
        validate_name(alias, "alias")
        if alias == LATEST:
            raise RegistryError("alias: 'latest' is computed (the highest complete version) and cannot be set")

    def set_alias(self, name: str, alias: str, version: int, expected: int | None = None) -> dict[str, int]:
        """Point `alias` at `version`; with `expected`, only if it currently points at `expected`
        (0 = only if the alias does not exist yet). Returns the new alias table."""
        validate_name(name, "name")
        self._check_alias_name(alias)
        self.lookup(name, version=version)
        with self._aliases_lock(name):
            aliases = self.aliases(name)
            if expected is not None and aliases.get(alias, 0) != expected:
                raise AliasConflict(f"alias {name}@{alias}: expected {expected or 'unset'}, but it is "
                                    f"{aliases.get(alias) or 'unset'}; not changed")
            aliases[alias] = version
            atomic_write_json(self.root_url + "/" + posixpath.join(name, ALIASES_FILE), aliases)
        return aliases

    def _aliases_lock(self, name: str):
        return FileLock(self.fs, self._path(name, ALIASES_FILE + ".lock"), stale_s=ALIAS_LOCK_STALE_S)


def resolve_checkpoint_uri(uri_or_path: str, registry_root: str | None = None, trust: list | None = None) -> str:
    """A registry URI -> verified local checkpoint folder; anything else is returned unchanged, unless
    `trust` (Ed25519 public keys) is given: a plain folder carries no signature and is refused."""
    if not str(uri_or_path).startswith(SCHEME):
        if trust:
            raise RegistryError(f"{uri_or_path}: only registry versions are signed; with --trust the checkpoint "
                                "must be a registry:// URI")
        return str(uri_or_path)
    return Registry(registry_root, trust=trust).resolve(str(uri_or_path))
