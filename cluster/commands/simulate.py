"""`megaclass simulate [--chaos] [--detection]`: the whole pipeline on this machine (what `make demo` runs)."""

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
    add_config_arguments(parser, "YAML with simulation options (see --list-options)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    if args.list_options:
        return print_options(SimulationConfig)
    cfg = config_from_args(SimulationConfig, args, extra={"chaos": True if args.chaos else None,
                                                          "detection": True if args.detection else None})
    report = Simulation(cfg, args.workdir).run()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        from cluster.simulation_report import format_report
        print(format_report(report))
    return 0 if report["ok"] else 1
