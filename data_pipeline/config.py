"""Typed configuration: frozen dataclass trees resolved from defaults < YAML file < `--set k=v`.

Every entry point (ingest, pretrain, finetune, ...) declares one tree of small frozen dataclass
sections. Each field carries a one-line doc in `field(metadata={"doc": ...})`. This module turns
a YAML file and `section.field=value` overrides into an instance, rejecting unknown keys and
ill-typed values with a `ConfigError` that names the field. It lives in the bottom package so
that every stage can use it without importing another stage.

    cfg = load_config(PretrainConfig, "cfg.yaml", ["train.max_steps=10", "model.arch=resnet18"])
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import fsspec
import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration or command-line mistake, raised before any work starts."""


def doc(text: str, default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
        le: float | None = None, lt: float | None = None, **kwargs: Any) -> Any:
    """A dataclass field with a one-line doc (shown by `describe`) and optional numeric bounds.

    `ge`/`gt`/`le`/`lt` (>=, >, <=, <) are checked on every load, before `validate()`, and a value
    outside them fails with a ConfigError naming the field and the range.
    """
    bounds = {name: value for name, value in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if value is not None}
    metadata = {"doc": text, "bounds": bounds}
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


_BOUND_CHECKS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
                 "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def _check_bounds(value: Any, bounds: Mapping[str, float], where: str) -> None:
    if not bounds or not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if not all(_BOUND_CHECKS[name][1](value, bound) for name, bound in bounds.items()):
        wanted = " and ".join(f"{_BOUND_CHECKS[name][0]} {bound}" for name, bound in bounds.items())
        raise ConfigError(f"{where}: must be {wanted}, got {value!r}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one value against a field annotation; raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} does not match {_type_name(tp)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        return tuple(_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a section (mapping), got {value!r}")
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if value.strip().lower().count("e") else int(value)
            except (ValueError, OverflowError):  # OverflowError: "1e400" is inf, not an integer
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        # inf/nan (also "1e400", which overflows to inf) would pass every `>= 0` check and poison the run.
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"unknown config key '{where}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        where = f"{prefix}.{f.name}" if prefix else f.name
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], where)
        elif dataclasses.is_dataclass(hints[f.name]):  # a section left at its defaults is validated too
            kwargs[f.name] = _build(hints[f.name], {}, where)
    try:
        obj = cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from None
    for f in dataclasses.fields(cls):
        _check_bounds(getattr(obj, f.name), f.metadata.get("bounds", {}), f"{prefix}.{f.name}" if prefix else f.name)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """`["a.b=1", "c=x"]` -> nested dict with YAML-parsed values."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: '{part}' is not a section")
        node[parts[-1]] = value
    return tree


def merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `update` wins."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def read_yaml(url: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from a local path or fsspec URL; errors name the file."""
    try:
        with fsspec.open(str(url), "r") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {url}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {url} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {url}: top level must be a mapping")
    return dict(data)


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
                base: Mapping[str, Any] | None = None, flags: Mapping[str, Any] | None = None) -> T:
    """Defaults < `base` < YAML file at `path` < `flags` < `overrides`; returns a validated frozen instance.

    `flags` maps dotted keys to command-line flag values ({"data.url": "/d"}); None means not given.
    """
    data: dict[str, Any] = dict(base or {})
    if path:
        data = merge(data, read_yaml(path))
    for key, value in (flags or {}).items():
        if value is not None:
            *sections, name = key.split(".")
            data = merge(data, functools.reduce(lambda inner, part: {part: inner}, reversed(sections), {name: value}))
    data = merge(data, parse_overrides(overrides))
    return _build(cls, data)


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build a config from a plain dict (for example one saved with a run)."""
    return _build(cls, data)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, YAML/JSON-serialisable dict (tuples become lists)."""
    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def replace(cfg: T, overrides: Sequence[str]) -> T:
    """A copy of `cfg` with `--set`-style overrides applied and re-validated."""
    return _build(type(cfg), merge(to_dict(cfg), parse_overrides(overrides)))


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per leaf field: `section.field (type, default): doc`."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.extend(describe(tp, name + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        bounds = ", ".join(f"{_BOUND_CHECKS[k][0]} {v}" for k, v in f.metadata.get("bounds", {}).items())
        lines.append(f"{name} ({_type_name(tp)}, default {default!r}{', ' + bounds if bounds else ''}): "
                     f"{f.metadata.get('doc', '')}")
    return lines


def finite_float(text: str) -> float:
    """argparse `type=` for numeric flags: a finite float ("inf", "nan", "1e400" are refused)."""
    import argparse
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def require(condition: bool, field_name: str, message: str) -> None:
    """Raise ConfigError('field: message') unless `condition`; for `validate()` methods."""
    if not condition:
        raise ConfigError(f"{field_name}: {message}")
