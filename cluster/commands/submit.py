"""`megaclass submit`: run any megaclass subcommand on a Ray cluster as a Ray job.

    megaclass submit --address http://HEAD:8265 --name r50-web --follow -- pretrain --config configs/x.yaml

Everything after `--` is the subcommand, exactly as it would run locally. The working dir (default:
the current directory, normally the project root) is shipped with the job; `--config` files must
lie inside it. `--name` is the run: resubmitting the same name resumes the same run dir (pretrain
and finetune get `--set checkpoint.url=RUNS_ROOT/NAME` unless the run dir is set explicitly).
The Ray auth token is read from $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.
Exit status with --follow: 0 when the job succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone

from cluster import jobs

NAME = "submit"
HELP = "run a megaclass subcommand on a Ray cluster (Ray Jobs API)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None,
                        help="Ray dashboard URL, e.g. http://HEAD:8265 (default $RAY_ADDRESS)")
    parser.add_argument("--name", default=None,
                        help="run name, stable across resubmissions (default: SUBCOMMAND-UTCSTAMP, a new run)")
    parser.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    parser.add_argument("--working-dir", default=None, help="folder shipped with the job (default: current dir)")
    parser.add_argument("--runs-root", default=None,
                        help=f"where run dirs live on the cluster (any fsspec URL; default {jobs.DEFAULT_RUNS_ROOT} "
                             "on the node running the job, or $MEGACLASS_RUNS_ROOT); use shared storage for multi-node")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the job (repeatable)")
    parser.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help="extra gitignore-style pattern not to ship (repeatable)")
    parser.add_argument("--python", default="python", help="python executable on the cluster (default: python)")
    # dest must not be "command": the CLI keeps the subcommand's own name there.
    parser.add_argument("forwarded", nargs=argparse.REMAINDER, metavar="-- SUBCOMMAND ...")


def _known_subcommands() -> set[str]:
    from cluster.cli import _load_commands

    return {module.NAME for module in _load_commands()}


def run(args: argparse.Namespace) -> int:
    import os

    from data_pipeline.config import ConfigError

    argv = args.forwarded[1:] if args.forwarded[:1] == ["--"] else args.forwarded
    if not argv:
        raise ConfigError("submit: no subcommand after '--' (e.g. megaclass submit --address URL -- pretrain ...)")
    if argv[0] not in _known_subcommands() or argv[0] == NAME:
        raise ConfigError(f"submit: {argv[0]!r} is not a megaclass subcommand that can be submitted")
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    run_name = args.name or f"{argv[0]}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
    jobs.validate_run_name(run_name)
    try:
        client = jobs.create_client(args.address)
        submission_id = jobs.submit(args.address, argv, run=run_name, working_dir=args.working_dir,
                                    runs_root=args.runs_root or os.environ.get("MEGACLASS_RUNS_ROOT"),
                                    env=env, excludes=args.exclude, python=args.python, client=client)
    except jobs.JobError as exc:
        print(f"megaclass submit: error: {exc}", file=sys.stderr)
        return 1
    print(f"submitted {submission_id} (run {run_name}); follow with: "
          f"megaclass jobs logs {submission_id} --follow --address {client.get_address()}", file=sys.stderr)
    print(submission_id)
    if not args.follow:
        return 0
    try:
        state = jobs.follow(client, submission_id, lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    except KeyboardInterrupt:
        print(f"\ndetached; the job keeps running (megaclass jobs stop {submission_id} to stop it)", file=sys.stderr)
        return 130
    print(f"job {submission_id}: {state}", file=sys.stderr)
    return 0 if state == "SUCCEEDED" else 1
