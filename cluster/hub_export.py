"""A registry version as a Hugging Face Hub model folder, and (optionally) its upload.

    path = export_for_hub(Registry(), "registry://resnet-web@production", "hub/resnet-web")
    push_to_hub(path, "you/resnet-web")      # needs a token: `hf auth login` or $HF_TOKEN

The folder holds what timm's Hub loader reads (config.json in timm's schema, model.safetensors),
the label table (classes.parquet; the names are also config.json's label_names), a README.md model
card with the version's lineage, and SHA256SUMS over all of them (`sha256sum -c SHA256SUMS`). It is
a folder for the Hub, not a megaclass checkpoint: megaclass's own loaders take the registry URI, whose
checkpoints hold no model card. `timm.create_model("local-dir:DIR", pretrained=True)` loads it, and after a push `timm.create_model("hf-hub:REPO_ID", pretrained=True)`.
The folder is built aside and renamed into place: it appears complete or not at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import yaml
from fsspec.implementations.local import LocalFileSystem

from cluster.registry import SCHEME, Registry, RegistryError, parse_ref
from cluster.storage import copy_hashing
from data_pipeline.config import ConfigError
from pretrain.checkpoint import CLASSES_FILE, CONFIG_FILE, SUMS_FILE, WEIGHTS_FILE

CARD_FILE = "README.md"
EXPORTED_FILES = (CONFIG_FILE, WEIGHTS_FILE, CLASSES_FILE)
LABELS_IN_CARD = 20


def _inert(text: Any) -> str:
    """A stranger's string (a label, a run name) for a fenced text block: no fence can be closed."""
    return str(text).replace("`", "'").replace("\n", " ")


def _cell(value: Any) -> str:
    return _inert(value).replace("|", "\\|")


def model_card(info: dict[str, Any], config: dict[str, Any], uri: str, sums: dict[str, str],
               repo_id: str | None = None) -> str:
    """README.md: Hub metadata, how to load, labels, lineage, metrics, training config, file sums."""
    name, version = info["name"], info["version"]
    labels = config.get("label_names") or []
    pcfg = config.get("pretrained_cfg") or {}
    lines = [
        "---",
        "library_name: timm",
        "pipeline_tag: image-classification",
        "tags:",
        "- image-classification",
        "- timm",
        "- megaclass",
        "---",
        "",
        f"# {_inert(name)} (version {version})",
        "",
        f"A `{_inert(config.get('architecture'))}` image classifier with {len(labels)} classes, trained with "
        f"megaclass and exported from `{_inert(uri)}`.",
        "",
        "## Use",
        "",
        "```python",
        "import timm",
        f'model = timm.create_model("hf-hub:{repo_id or "REPO_ID"}", pretrained=True).eval()   # or "local-dir:FOLDER"',
        "cfg = timm.data.resolve_data_config({}, model=model)",
        "transform = timm.data.create_transform(**cfg)",
        "labels = model.pretrained_cfg.get('label_names')  # class id -> name",
        "```",
        "",
        f"Input: {pcfg.get('input_size')}, mean {pcfg.get('mean')}, std {pcfg.get('std')}, "
        f"interpolation {pcfg.get('interpolation')}, crop_pct {pcfg.get('crop_pct')}.",
        "",
        "## Labels",
        "",
        f"{len(labels)} classes: `classes.parquet` (id, name) and `label_names` in config.json, by class id."
        + (f" The first {LABELS_IN_CARD}:" if len(labels) > LABELS_IN_CARD else ""),
        "",
        "```text",
        *[f"{i:>6}  {_inert(label)}" for i, label in enumerate(labels[:LABELS_IN_CARD])],
        "```",
        "",
        "## Lineage",
        "",
        "| field | value |",
        "| --- | --- |",
    ]
    lineage = {"registry version": f"registry://{name}/{version}", "aliases": ", ".join(info.get("aliases", [])) or "-",
               "created": info.get("created"), "run": info.get("run"), "code revision": info.get("code_revision"),
               "dataset manifest sha256": info.get("dataset_manifest_sha256"), "step": info.get("step"),
               "epoch": info.get("epoch"), "published from": info.get("source_url")}
    lines += [f"| {key} | {_cell(value)} |" for key, value in lineage.items()]
    metrics = info.get("metrics") or {}
    lines += ["", "## Metrics", ""]
    if metrics:
        lines += ["| metric | value |", "| --- | --- |", *[f"| {_cell(k)} | {_cell(v)} |" for k, v in sorted(metrics.items())]]
    else:
        lines.append("No metrics were recorded with this version.")
    lines += ["", "## Training config", "", "```yaml",
              yaml.safe_dump(info.get("config") or {}, sort_keys=True).replace("`", "'").rstrip(),
              "```", "", "## Files", "",
              "sha256 of each file as published in the registry (also in SHA256SUMS, which covers this card too):", "",
              "| file | sha256 |", "| --- | --- |", *[f"| {rel} | `{digest}` |" for rel, digest in sorted(sums.items())], ""]
    return "\n".join(lines)


def _check_target(out_dir: str) -> Path:
    if "://" in out_dir:
        raise ConfigError(f"--hf: {out_dir!r} must be a local folder (the Hub uploads from one)")
    target = Path(out_dir).expanduser().resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"--hf: {target} exists and is not an empty folder")
    return target


def export_for_hub(registry: Registry, uri: str, out_dir: str, repo_id: str | None = None) -> Path:
    """Write the Hub folder of a registry version at `out_dir` (new or empty); returns its path.

    `repo_id` (where it will be pushed) only fills in the card's loading example."""
    target = _check_target(out_dir)
    if not uri.startswith(SCHEME):
        raise ConfigError(f"URI: {uri!r} is not a registry URI (registry://NAME@ALIAS or registry://NAME/VERSION)")
    name, version, alias = parse_ref(uri, "uri")
    version = registry.lookup(name, version, alias)  # pin the number: an alias may move while we copy
    source = Path(registry.resolve(f"{SCHEME}{name}/{version}"))
    info = registry.show(name, version)
    local = LocalFileSystem()
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    try:
        sums = {}
        for rel in EXPORTED_FILES:
            digest, size = copy_hashing(local, str(source / rel), local, str(staging / rel))
            recorded = info["files"].get(rel, {})
            if (digest, size) != (recorded.get("sha256"), recorded.get("bytes")):
                raise RegistryError(f"registry://{name}/{version}: {rel} changed while exporting")
            sums[rel] = digest
        config = json.loads((staging / CONFIG_FILE).read_text())
        card = model_card(info, config, uri, sums, repo_id).encode("utf-8")
        (staging / CARD_FILE).write_bytes(card)
        all_sums = {**sums, CARD_FILE: hashlib.sha256(card).hexdigest()}
        (staging / SUMS_FILE).write_text("".join(f"{d}  {rel}\n" for rel, d in sorted(all_sums.items())))
        if target.exists():
            target.rmdir()  # checked empty above
        os.rename(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def check_push(repo_id: str) -> None:
    """Refuse a push that cannot work (no token, malformed repo id) before anything is written."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ConfigError(f"--push: {repo_id!r} is not a Hub repo id ({str(exc).splitlines()[0]})") from None
    if "/" not in repo_id:
        raise ConfigError(f"--push: {repo_id!r} must be OWNER/NAME")
    if not get_token():
        raise ConfigError("--push: no Hugging Face token (run `hf auth login` or set HF_TOKEN)")


def push_to_hub(folder: Path, repo_id: str, private: bool = False, message: str | None = None) -> str:
    """Upload the folder to a Hub model repo (created if absent); returns the commit URL."""
    from huggingface_hub import HfApi  # only when pushing: exporting needs no network and no token

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                               commit_message=message or f"megaclass export of {folder.name}")
    return str(getattr(commit, "commit_url", commit))
