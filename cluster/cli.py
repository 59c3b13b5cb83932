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


def _load_commands(only: str | None = None) -> list:
    """The subcommand modules; just `only`'s when it names one (each module imports what it needs,
    and some of them torch: `megaclass ingest` should not wait seconds for the others)."""
    names = COMMAND_MODULES
    if only is not None:
        names = [name for name in COMMAND_MODULES if name == only or (only == "cluster" and name == "cluster_render")]
    modules = []
    for name in names:
        try:
            modules.append(importlib.import_module(f"cluster.commands.{name}"))
        except ModuleNotFoundError as exc:
            if exc.name != f"cluster.commands.{name}":
                raise
    return modules if modules or only is None else _load_commands()


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with `argv`, only the subcommand it names is loaded (all of them otherwise)."""
    parser = argparse.ArgumentParser(prog="megaclass", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    words = [a for a in (argv or []) if not a.startswith("-")]
    for module in _load_commands(words[0] if words else None):
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.verbose:  # the AWS SDK logs where it found its endpoint and credentials at every new client
        for name in ("botocore", "aiobotocore", "s3fs"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return int(args._run(args) or 0)
    except ConfigError as exc:
        print(f"megaclass {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
