"""The package graph of docs/design.md, checked with `ast`: imports flow one way and Ray stays in cluster/."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data_pipeline", "pretrain", "finetune", "cluster")
# What each package may import of ours (docs/design.md, "Packages and who may import whom").
ALLOWED = {
    "data_pipeline": {"data_pipeline"},
    "pretrain": {"pretrain", "data_pipeline"},
    "finetune": {"finetune", "pretrain", "data_pipeline"},
    "cluster": set(PACKAGES),
}
# finetune reads the checkpoint format (contract 2) and shares the one module that knows ranks, the
# run-dir module (the same layout and metric names in both stages) and the config sections they share.
FINETUNE_MAY_USE_FROM_PRETRAIN = {"pretrain.checkpoint", "pretrain.dist", "pretrain.rundir", "pretrain.config"}


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def _package_files():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield package, path


def test_packages_import_one_way():
    violations = []
    for package, path in _package_files():
        for name in _imports(path):
            top = name.split(".")[0]
            if top in PACKAGES and top not in ALLOWED[package]:
                violations.append(f"{path.relative_to(ROOT)} imports {name}")
            if package == "finetune" and top == "pretrain" and name not in FINETUNE_MAY_USE_FROM_PRETRAIN:
                violations.append(f"{path.relative_to(ROOT)} imports {name} (only {sorted(FINETUNE_MAY_USE_FROM_PRETRAIN)})")
    assert violations == []


def test_ray_only_in_cluster():
    offenders = [str(path.relative_to(ROOT)) for package, path in _package_files()
                 if package != "cluster" and any(n.split(".")[0] == "ray" for n in _imports(path))]
    assert offenders == []


def test_no_file_over_500_lines():
    long_files = [f"{path.relative_to(ROOT)} ({n})" for _, path in _package_files()
                  if (n := len(path.read_text().splitlines())) > 500]
    assert long_files == []
