"""The `megaclass` command: one console script, one subcommand per stage.

Each subcommand lives in `cluster/commands/<name>.py` and exposes `NAME`, `HELP`,
`add_arguments(parser)` and `run(args) -> int`. `main(argv)` is callable from tests.
Config and CLI mistakes (`ConfigError`) print one line naming the field and exit 2
before any work starts.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from data_pipeline.config import ConfigError

# Subcommand modules, in the order `megaclass --help` lists them.
COMMAND_MODULES = (
    "ingest", "pretrain", "finetune", "evaluate", "predict", "export",
    "registry", "submit", "jobs", "cluster_render", "simulate", "plan", "report",
)


def _load_commands() -> list:
    modules = []
    for name in COMMAND_MODULES:
        try:
            modules.append(importlib.import_module(f"cluster.commands.{name}"))
        except ModuleNotFoundError as exc:
            if exc.name != f"cluster.commands.{name}":
                raise
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megaclass", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _load_commands():
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args._run(args) or 0)
    except ConfigError as exc:
        print(f"megaclass {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
