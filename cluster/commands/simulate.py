"""`megaclass simulate [--chaos]`: the whole pipeline on this machine (what `make demo` runs)."""

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
    parser.add_argument("--detection", action="store_true",
                        help="also train and evaluate a detector on the published backbone (COCO JSON data)")
    parser.add_argument("--config", help="YAML with simulation options (see --set keys)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override an option, e.g. web.upstream_classes=50")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + (["chaos=true"] if args.chaos else []) + (["detection=true"] if args.detection else [])
    cfg = load_config(SimulationConfig, args.config, overrides)
    report = Simulation(cfg, args.workdir).run()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        from cluster.simulation_report import format_report
        print(format_report(report))
    return 0 if report["ok"] else 1
