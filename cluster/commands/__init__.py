"""The `megaclass` subcommands, one module each (see cluster.cli). The options every configurable
command shares live here: `--config FILE.yaml`, `--set section.field=value`, `--list-options`, and
the one mapping from a command's plain flags to config keys.

Precedence, for every command: defaults < --config FILE < the command's flags < --set.
"""

from __future__ import annotations

import argparse
from typing import Any, Mapping

from data_pipeline.config import ConfigError, describe, load_config


def add_config_arguments(parser: argparse.ArgumentParser, config_help: str) -> None:
    parser.add_argument("--config", help=config_help)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one option, e.g. train.max_steps=100 (repeatable; see --list-options)")
    parser.add_argument("--list-options", action="store_true",
                        help="print every option (section.field, type, default, range, doc) and exit")


def print_options(cls: type) -> int:
    print("\n".join(describe(cls)))
    return 0


def config_from_args(cls: type, args: argparse.Namespace, flags: Mapping[str, str] = {},
                     extra: Mapping[str, Any] = {}) -> Any:
    """The config of `cls` from --config, the flags (attribute name -> config key), `extra` keys, --set."""
    values = {key: getattr(args, attr) for attr, key in flags.items()} | dict(extra)
    return load_config(cls, args.config, args.set, flags=values)


def check_local_gpus(scaling: Any, ray_address: str | None) -> None:
    """A run on this machine (no --ray-address, no $RAY_ADDRESS) can only use its own GPUs: asking a
    local Ray for more would wait for them forever, so refuse before Ray starts, naming the field."""
    import os

    if not scaling.use_gpu or ray_address or os.environ.get("RAY_ADDRESS"):
        return
    import torch

    available = torch.cuda.device_count()
    if available < scaling.num_workers:
        raise ConfigError(f"scaling.use_gpu: {scaling.num_workers} worker(s) need as many GPUs and this machine has "
                          f"{available}; set scaling.use_gpu=false, fewer scaling.num_workers, or --ray-address")
