"""Contract 2, the checkpoint (format version 1): written by pretrain, read by finetune and the registry.

    CKPT/config.json        timm hub schema (written by timm's save_config_for_hf) + "megaclass" block
    CKPT/model.safetensors  the whole model in timm's state-dict naming (sharded head gathered)
    CKPT/classes.parquet    the label vocabulary: id:int32, name:string
    CKPT/train_state/       run checkpoints only: torch.distributed.checkpoint (DCP) files holding tensors
                            only, plus state.json for counters (pretrain.train_state, finetune.train_state)
    CKPT/SHA256SUMS         "sha256  relative/path" for every other file; written last

`timm.create_model("local-dir:CKPT", pretrained=True)` loads it as it is.

Atomicity. A checkpoint is built in a sibling staging dir `.staging-NAME`, SHA256SUMS last (the
completion marker: a dir without it is incomplete, ignored by `list_checkpoints` and refused by
`verify`). On a local filesystem the staging dir is then renamed into place. Object stores have no
rename: the complete staging dir is copied over CKPT (server-side copies, SHA256SUMS last) and
removed after. While CKPT is being replaced its SHA256SUMS is absent, and readers take the complete
staging dir instead, so rewriting a checkpoint at an existing URL never leaves a moment without a
valid one; an interrupted replacement is finished by the next `begin_checkpoint` of that URL.
Loading verifies every file against SHA256SUMS and refuses missing, truncated, altered or foreign
(unlisted) files with a CheckpointError naming the file. Weights are read with safetensors only.
SHA256SUMS proves integrity, not authorship (whoever can write the folder can write the sums), so
train_state/ is read as if a stranger wrote it: DCP's index (.metadata, a pickle) goes through an
exact allowlist of DCP's own plain classes, every entry must be a tensor (a "bytes" entry would be
unpickled by DCP with weights_only=False, so it is refused), tensors load with weights_only=True,
and data file names must be DCP's own, in the folder.

    url = save_checkpoint(run + "/final", state_dict=sd, arch="resnet50d", num_classes=C, ...)
    ckpt = load_checkpoint(url); model = create_model_from_checkpoint(ckpt)
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import posixpath
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import timm
import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors, save as save_safetensors
from timm.models._hub import save_config_for_hf  # timm exports it only from the private module
from torch import nn
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from data_pipeline.dataset import is_local
from pretrain.staging import commit, readable_url, staging_url  # noqa: F401 (staging_url: part of this API)

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CLASSES_FILE = "classes.parquet"
SUMS_FILE = "SHA256SUMS"
TRAIN_STATE_DIR = "train_state"
CHECKPOINT_FILES = (CONFIG_FILE, WEIGHTS_FILE, CLASSES_FILE, SUMS_FILE)  # all of a checkpoint without train_state/
# The only other files a checkpoint may hold: directly inside train_state/, no '..', no sub-folders.
TRAIN_STATE_FILE_RE = re.compile(r"train_state/(?!\.\.?$)[A-Za-z0-9._-]{1,128}")
CLASSES_SCHEMA = pa.schema([("id", pa.int32()), ("name", pa.string())])
STEP_DIR_RE = re.compile(r"^step-(\d{8,})$")
STATE_JSON_FILE = "state.json"  # train_state/ counters that are not tensors
DCP_DATA_FILE_RE = re.compile(r"__\d+_\d+\.distcp")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, altered, foreign or of an unknown format/arch."""


@dataclass
class LoadedCheckpoint:
    url: str
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    class_names: list[str]
    arch: str
    num_classes: int
    pretrained_cfg: dict[str, Any]
    megaclass: dict[str, Any]

    @property
    def task(self) -> str:
        """'classification' (a timm model), or 'detection' (megaclass.detector says which detector)."""
        return str(self.megaclass.get("task", "classification"))

    @property
    def model_args(self) -> dict[str, Any]:
        """Constructor kwargs timm needs to rebuild the architecture (e.g. a preset's act_layer)."""
        return {k: v for k, v in self.config.get("model_args", {}).items() if k != "num_classes"}


def _join(base: str, *parts: str) -> str:
    return posixpath.join(str(base).rstrip("/"), *parts)


def _fs(url: str):
    return fsspec.core.url_to_fs(str(url))


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


# -- writing --------------------------------------------------------------------------------------

def begin_checkpoint(url: str) -> str:
    """Empty the staging location of `url` and return it (call once, before any rank writes train_state).

    A complete staging dir is a replacement that was interrupted after it was written: it is
    committed first, so that the valid checkpoint it holds is not lost.
    """
    staging = staging_url(url)
    fs, path = _fs(staging)
    if fs.exists(_join(path, SUMS_FILE)):
        commit(fs, path, _fs(url)[1].rstrip("/"))
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.makedirs(path, exist_ok=True)
    return staging


def _timm_config(arch: str, num_classes: int, model_args: dict[str, Any], pretrained_cfg: dict[str, Any],
                 class_names: list[str], megaclass: dict[str, Any]) -> bytes:
    """config.json bytes from timm's own exporter, applied to the architecture built on the meta device."""
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **model_args)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CONFIG_FILE
        save_config_for_hf(model, str(path), data_config=dict(pretrained_cfg),
                                       model_config={"label_names": list(class_names), "megaclass": megaclass})
        config = json.loads(path.read_bytes())
    # The architecture's default pretrained_cfg describes timm's published weights, not ours.
    for key in ("hf_hub_id", "license", "origin_url", "paper_ids", "paper_name", "notes"):
        config["pretrained_cfg"].pop(key, None)
    config["pretrained_cfg"]["tag"] = "megaclass"
    return (json.dumps(config, indent=2) + "\n").encode()


def _write(fs, path: str, data: bytes) -> None:
    with fs.open(path, "wb") as f:
        f.write(data)


def _sha256(fs, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(url: str) -> str:
    """sha256 hex digest of one file at any fsspec URL (streamed)."""
    fs, path = _fs(url)
    return _sha256(fs, path)


def _relative_files(fs, root: str) -> list[str]:
    root = root.rstrip("/")
    return sorted(posixpath.relpath(p, root) for p in fs.find(root))


def save_checkpoint(url: str, *, state_dict: dict[str, torch.Tensor], arch: str, num_classes: int,
                    class_names: list[str], pretrained_cfg: dict[str, Any], megaclass: dict[str, Any],
                    write_train_state: Callable[[str], None] | None = None,
                    model_args: dict[str, Any] | None = None, staging: str | None = None,
                    known_sums: dict[str, str] | None = None) -> str:
    """Write a contract-2 checkpoint at `url` atomically; returns `url`.

    state_dict: the full model in timm naming (backbone + classifier). pretrained_cfg: input_size,
    mean, std, interpolation, crop_pct. megaclass: step, epoch, dataset manifest sha256, config,
    metrics (format_version is added). write_train_state(dir) writes train_state/ into a local dir.
    staging: a URL from `begin_checkpoint(url)` that already holds train_state/ (written by every
    rank); default: a fresh one. known_sums: {relative path: sha256} of files already in staging,
    hashed by whoever wrote them (each rank its train_state/ shard); only files neither in it nor
    written here are read back to be hashed.
    """
    if len(class_names) != num_classes:
        raise CheckpointError(f"{url}: {len(class_names)} class names for {num_classes} classes")
    staging = staging or begin_checkpoint(url)
    fs, stage_path = _fs(staging)
    model_args = dict(model_args or {})
    model_args.pop("num_classes", None)
    block = {"format_version": FORMAT_VERSION, **megaclass}
    known = dict(known_sums or {})

    def write_hashed(rel: str, data: bytes) -> None:  # hashed as written, never read back
        known[rel] = hashlib.sha256(data).hexdigest()
        _write(fs, _join(stage_path, rel), data)

    write_hashed(CONFIG_FILE, _timm_config(arch, num_classes, model_args, pretrained_cfg, class_names, block))
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    write_hashed(WEIGHTS_FILE, save_safetensors(tensors))
    table = pa.table({"id": pa.array(range(num_classes), pa.int32()), "name": pa.array(class_names, pa.string())},
                     schema=CLASSES_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_hashed(CLASSES_FILE, buf.getvalue())
    if write_train_state is not None:
        if is_local(fs):
            write_train_state(_join(stage_path, TRAIN_STATE_DIR))
        else:  # the callback writes locally; upload it next to the other files
            with tempfile.TemporaryDirectory() as tmp:
                write_train_state(tmp)
                fs.put(tmp.rstrip("/") + "/", _join(stage_path, TRAIN_STATE_DIR), recursive=True)
    sums = {rel: known[rel] if rel in known else _sha256(fs, _join(stage_path, rel))
            for rel in _relative_files(fs, stage_path) if rel != SUMS_FILE}
    stray = sorted(rel for rel in sums if not is_checkpoint_file(rel))
    if stray:  # a reader would refuse it: fail now, at the writer
        raise CheckpointError(f"{_join(staging, stray[0])}: not a file of the checkpoint layout")
    _write(fs, _join(stage_path, SUMS_FILE), format_sums(sums))  # last: marks the checkpoint complete
    commit(fs, stage_path, _fs(url)[1].rstrip("/"))
    return url


# -- reading --------------------------------------------------------------------------------------

def is_checkpoint_file(rel: str) -> bool:
    """True for a relative path of the contract-2 layout (so a listed path can never leave the folder)."""
    return rel in CHECKPOINT_FILES[:-1] or bool(TRAIN_STATE_FILE_RE.fullmatch(rel))


def format_sums(sums: dict[str, str]) -> bytes:
    """SHA256SUMS content: `sha256sum` lines, sorted by path."""
    return "".join(f"{digest}  {rel}\n" for rel, digest in sorted(sums.items())).encode()


def parse_sums(data: bytes, where: str) -> dict[str, str]:
    """SHA256SUMS content -> {relative path: sha256}; anything but lines format_sums writes, naming a
    file of the layout once, is refused with a CheckpointError naming `where` and the line."""
    sums: dict[str, str] = {}
    for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        digest, sep, rel = line.partition("  ")
        if not sep or not re.fullmatch(r"[0-9a-f]{64}", digest) or not is_checkpoint_file(rel) or rel in sums:
            raise CheckpointError(f"{where}: line {number} is not '<sha256>  <file of the checkpoint layout>': "
                                  f"{line[:80]!r}")
        sums[rel] = digest
    return sums


def _read_sums(fs, root: str, url: str) -> dict[str, str]:
    sums_path = _join(root, SUMS_FILE)
    if not fs.exists(sums_path):
        raise CheckpointError(f"{_join(url, SUMS_FILE)}: missing (not a checkpoint, or an incomplete one)")
    return parse_sums(fs.cat_file(sums_path), _join(url, SUMS_FILE))


def verify_checkpoint(url: str) -> dict[str, Any]:
    """Check every file against SHA256SUMS (no missing, altered or unlisted files); returns config.json."""
    fs, root = _fs(readable_url(url))
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise CheckpointError(f"{url}: no such checkpoint directory")
    sums = _read_sums(fs, root, url)
    for required in (CONFIG_FILE, WEIGHTS_FILE, CLASSES_FILE):
        if required not in sums:
            raise CheckpointError(f"{_join(url, required)}: not listed in {SUMS_FILE}")
    present = set(_relative_files(fs, root)) - {SUMS_FILE}
    foreign = sorted(present - set(sums))
    if foreign:
        raise CheckpointError(f"{_join(url, foreign[0])}: foreign file (not listed in {SUMS_FILE})")
    for rel, digest in sorted(sums.items()):
        if rel not in present:
            raise CheckpointError(f"{_join(url, rel)}: missing (listed in {SUMS_FILE})")
        if _sha256(fs, _join(root, rel)) != digest:
            raise CheckpointError(f"{_join(url, rel)}: sha256 mismatch (truncated or altered)")
    return _read_config(fs, root, url)


def _upgrade(config: dict[str, Any], url: str) -> dict[str, Any]:
    """Bring an older format's config.json to the current one (only version 1 exists so far)."""
    block = config.get("megaclass")
    if not isinstance(block, dict) or "format_version" not in block:
        raise CheckpointError(f"{_join(url, CONFIG_FILE)}: foreign config (no megaclass.format_version)")
    if block["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{_join(url, CONFIG_FILE)}: format version {block['format_version']} "
                              f"is not supported (this code reads {FORMAT_VERSION})")
    return config


def _read_config(fs, root: str, url: str) -> dict[str, Any]:
    try:
        config = json.loads(fs.cat_file(_join(root, CONFIG_FILE)))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{_join(url, CONFIG_FILE)}: not valid JSON ({exc})") from None
    config = _upgrade(config, url)
    arch = config.get("architecture")
    if not isinstance(arch, str) or not timm.is_model(arch):
        raise CheckpointError(f"{_join(url, CONFIG_FILE)}: unknown architecture {arch!r}")
    return config


def load_checkpoint(url: str, *, verify: bool = True) -> LoadedCheckpoint:
    """Read (and by default verify) a checkpoint; weights via safetensors, nothing unpickled."""
    fs, root = _fs(readable_url(url))
    root = root.rstrip("/")
    config = verify_checkpoint(url) if verify else _read_config(fs, root, url)
    weights_path = _join(root, WEIGHTS_FILE)
    try:
        state_dict = load_safetensors(fs.cat_file(weights_path))
    except (FileNotFoundError, SafetensorError) as exc:
        raise CheckpointError(f"{_join(url, WEIGHTS_FILE)}: unreadable ({exc})") from None
    with fs.open(_join(root, CLASSES_FILE), "rb") as f:
        table = pq.read_table(f)
    names = table.sort_by("id").column("name").to_pylist()
    num_classes = int(config["num_classes"])
    if len(names) != num_classes:
        raise CheckpointError(f"{_join(url, CLASSES_FILE)}: {len(names)} classes, config.json says {num_classes}")
    return LoadedCheckpoint(url=url, config=config, state_dict=state_dict, class_names=names,
                            arch=config["architecture"], num_classes=num_classes,
                            pretrained_cfg=config.get("pretrained_cfg", {}), megaclass=config["megaclass"])


def create_model_from_checkpoint(ckpt: LoadedCheckpoint, num_classes: int | None = None, **timm_kwargs) -> nn.Module:
    """The timm model with the checkpoint's weights (pretrained=False: nothing is downloaded).

    With another num_classes the classifier is freshly initialised and every other weight must load.
    A detection checkpoint is refused here: its weights are a detector's, not a timm classifier's.
    """
    if ckpt.task != "classification":
        detector = ckpt.megaclass.get("detector", {}).get("name", "?")
        raise CheckpointError(f"{ckpt.url}: a {ckpt.task} checkpoint ({detector} on {ckpt.arch}), not a "
                              "classification model; use it with detection data, or start from a backbone checkpoint")
    num_classes = ckpt.num_classes if num_classes is None else num_classes
    kwargs = {**ckpt.model_args, **timm_kwargs}
    model = timm.create_model(ckpt.arch, pretrained=False, num_classes=num_classes, **kwargs)
    state = dict(ckpt.state_dict)
    if num_classes != ckpt.num_classes:
        head = {k for k in model.state_dict() if k.rsplit(".", 1)[0] == classifier_name(model)}
        state = {k: v for k, v in state.items() if k.rsplit(".", 1)[0] != classifier_name(model)}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if set(missing) != head or unexpected:
            raise CheckpointError(f"{ckpt.url}: weights do not fit {ckpt.arch}: missing {sorted(set(missing) - head)}, "
                                  f"unexpected {sorted(unexpected)}")
    else:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{_join(ckpt.url, WEIGHTS_FILE)}: does not fit {ckpt.arch}: {exc}") from None
    return model


def classifier_name(model: nn.Module) -> str:
    """Dotted module name of the model's classifier (timm's `get_classifier()`)."""
    classifier = model.get_classifier()
    for name, module in model.named_modules():
        if module is classifier:
            return name
    raise CheckpointError(f"{type(model).__name__}: classifier module not found")


# -- run dirs -------------------------------------------------------------------------------------

def checkpoint_files(url: str) -> list[str]:
    """Relative paths of every file of a checkpoint, SHA256SUMS included (for the registry to copy)."""
    fs, root = _fs(readable_url(url))
    return sorted([*_read_sums(fs, root.rstrip("/"), url), SUMS_FILE])


def list_checkpoints(run_url: str) -> list[str]:
    """Complete run checkpoints (step-N/ with SHA256SUMS) of a run dir, oldest first."""
    fs, root = _fs(run_url)
    fs.invalidate_cache(root)  # object-store listings are cached per process; other ranks and runs write here
    if not fs.isdir(root):
        return []
    found = []
    for entry in fs.ls(root, detail=False):
        name = posixpath.basename(entry.rstrip("/"))
        match = STEP_DIR_RE.fullmatch(name)
        if match and fs.exists(_join(_fs(readable_url(_join(run_url, name)))[1], SUMS_FILE)):
            found.append((int(match.group(1)), _join(run_url, name)))
    return [url for _, url in sorted(found)]


def latest_checkpoint(run_url: str) -> str | None:
    found = list_checkpoints(run_url)
    return found[-1] if found else None


def prune_checkpoints(run_url: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` run checkpoints; returns the deleted URLs."""
    doomed = list_checkpoints(run_url)[:-keep] if keep > 0 else []
    for url in doomed:
        discard_checkpoint(url)
    return doomed


def discard_checkpoint(url: str) -> None:
    """Delete the checkpoint at `url` if there is one, SHA256SUMS first (a half-deleted dir never looks complete)."""
    fs, path = _fs(url)
    if fs.exists(_join(path, SUMS_FILE)):
        fs.rm(_join(path, SUMS_FILE))
    if fs.exists(path):
        fs.rm(path, recursive=True)


# -- train_state/: DCP tensors + state.json, read as untrusted input ------------------------------

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
# Exactly the globals DCP's own index pickles (torch 2.4-2.14); anything else is refused by name.
_DCP_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                *((_DCP_METADATA, name) for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                                     "TensorStorageMetadata", "ChunkStorageMetadata", "BytesStorageMetadata",
                                                     "_MEM_FORMAT_ENCODING"))}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # Exact pairs only: pickle resolves dotted names, so a module prefix would admit e.g. "os.system".
        if (module, name) in _DCP_GLOBALS or (module == "torch" and "." not in name
                                              and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which a DCP index never holds")


def _check_dcp_metadata(metadata: Any, where: str) -> Metadata:
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{where}: not a DCP index ({type(metadata).__name__})")
    for key, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):  # BytesStorageMetadata: DCP would unpickle it freely
            raise CheckpointError(f"{where}: entry {key!r} is {type(entry).__name__}, not a tensor")
    for info in (metadata.storage_data or {}).values():
        if not isinstance(getattr(info, "relative_path", None), str) \
                or not DCP_DATA_FILE_RE.fullmatch(info.relative_path) or getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{where}: data file {getattr(info, 'relative_path', None)!r} is not a plain "
                                  "DCP file of this folder")
    return metadata


class SafeDCPReader(FsspecReader):
    """A DCP storage reader for train_state/ dirs that someone else may have written (see the module doc)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        where = str(path)
        try:
            with self.fs.create_stream(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except FileNotFoundError:
            raise CheckpointError(f"{where}: missing") from None
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: refused ({exc})") from None
        metadata = _check_dcp_metadata(metadata, where)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read_state_metadata(url: str) -> Metadata:
    """The checked DCP index of a train_state/ dir: raises CheckpointError naming the file. Call it
    before dcp.load, which would wrap the error in its own exception type."""
    return SafeDCPReader(url).read_metadata()


def save_state(url: str, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """One process writes a train_state/ dir: `tensors` through DCP, `info` (JSON types) as state.json."""
    dcp.save({k: v.detach().cpu() for k, v in tensors.items()}, storage_writer=FsspecWriter(url), no_dist=True)
    fs, path = _fs(url)
    _write(fs, _join(path, STATE_JSON_FILE), (json.dumps(info, indent=1, allow_nan=False) + "\n").encode())


def load_state(url: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, info) written by save_state; nothing is unpickled but the checked DCP index."""
    fs, path = _fs(url)
    where = _join(url, STATE_JSON_FILE)
    try:
        info = json.loads(fs.cat_file(_join(path, STATE_JSON_FILE)))
    except FileNotFoundError:
        raise CheckpointError(f"{where}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: expected a JSON object")
    tensors = {key: torch.empty(entry.size, dtype=entry.properties.dtype)
               for key, entry in read_state_metadata(url).state_dict_metadata.items()}
    dcp.load(tensors, storage_reader=SafeDCPReader(url), no_dist=True)
    return tensors, info
