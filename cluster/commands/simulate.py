"""`megaclass simulate [--chaos] [--storage s3] [--nodes 2]`: the whole pipeline on this machine.

`make demo` runs it with the defaults (local storage, a local Ray per command).
"""

from __future__ import annotations

import argparse
import json

from cluster.simulate import Simulation, SimulationConfig
from data_pipeline.config import load_config

NAME = "simulate"
HELP = "run web -> ingest -> pretrain -> publish -> finetune -> evaluate locally, for real"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="megaclass-simulation", help="folder for every artifact")
    parser.add_argument("--chaos", action="store_true",
                        help="SIGKILL one ingestion task and one training worker mid-run")
    parser.add_argument("--config", help="YAML with simulation options (see --set keys)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override an option, e.g. web.upstream_classes=50")
    parser.add_argument("--storage", choices=("local", "s3"), default=None,
                        help="local: everything in the workdir; s3: dataset, runs and registry in an S3 API server "
                             "(moto) started for the simulation")
    parser.add_argument("--nodes", type=int, default=None,
                        help="Ray nodes (default 1: a local Ray per command; 2+: a cluster started for the simulation)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + (["chaos=true"] if args.chaos else []) \
        + ([f"storage={args.storage}"] if args.storage else []) + ([f"nodes={args.nodes}"] if args.nodes else [])
    cfg = load_config(SimulationConfig, args.config, overrides)
    report = Simulation(cfg, args.workdir).run()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        from cluster.simulation_report import format_report
        print(format_report(report))
    return 0 if report["ok"] else 1
