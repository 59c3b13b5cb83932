"""`megaclass simulate [--chaos] [--detection] [--storage s3] [--nodes 2]`: the whole pipeline on this machine.

`make demo` runs it with the defaults (local storage, a local Ray per command).
"""

from __future__ import annotations

import argparse
import json

from cluster.simulate import Simulation, SimulationConfig
from cluster.commands import add_config_arguments, config_from_args, print_options

NAME = "simulate"
HELP = "run web -> ingest -> pretrain -> publish -> finetune -> evaluate locally, for real"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="megaclass-simulation", help="folder for every artifact")
    parser.add_argument("--chaos", action="store_true",
                        help="SIGKILL one ingestion task and one training worker mid-run")
    parser.add_argument("--detection", action="store_true",
                        help="also train and evaluate a detector on the published backbone (COCO JSON data)")
    parser.add_argument("--storage", choices=("local", "s3"), default=None,
                        help="local: everything in the workdir; s3: dataset, runs and registry in an S3 API server "
                             "(moto) started for the simulation")
    parser.add_argument("--nodes", type=int, default=None,
                        help="Ray nodes (default 1: a local Ray per command; 2+: a cluster started for the simulation)")
    add_config_arguments(parser, "YAML with simulation options (see --list-options)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    if args.list_options:
        return print_options(SimulationConfig)
    cfg = config_from_args(SimulationConfig, args, extra={"chaos": True if args.chaos else None,
                                                          "detection": True if args.detection else None,
                                                          "storage": args.storage, "nodes": args.nodes})
    report = Simulation(cfg, args.workdir).run()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        from cluster.simulation_report import format_report
        print(format_report(report))
    return 0 if report["ok"] else 1
