"""`megaclass jobs`: status, logs, stop and list of Ray jobs (those `megaclass submit` started, or any).

    megaclass jobs status RUN-20260101-120000-ab12 --address http://HEAD:8265
    megaclass jobs logs ID --follow
    megaclass jobs stop ID
    megaclass jobs list [--name RUN]

Exit status: 1 when the job server refuses or the job does not exist; `status` exits 0 whatever the
job's state (read it from the output or --json).
"""

from __future__ import annotations

import argparse
import json
import sys

from cluster import jobs

NAME = "jobs"
HELP = "status, logs, stop and list of Ray jobs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", default=None, help="Ray dashboard URL (default $RAY_ADDRESS)")
    common.add_argument("--json", action="store_true", help="print JSON")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, text in (("status", "state of one job"), ("logs", "logs of one job"), ("stop", "stop one job")):
        p = actions.add_parser(action, parents=[common], help=text)
        p.add_argument("submission_id", metavar="ID")
        if action == "logs":
            p.add_argument("--follow", action="store_true", help="stream until the job ends")
    p = actions.add_parser("list", parents=[common], help="jobs on the cluster, oldest first")
    p.add_argument("--name", default=None, help="only the attempts of this run")


def _run(args: argparse.Namespace) -> int:
    client = jobs.create_client(args.address)
    if args.action == "status":
        info = jobs.status(client, args.submission_id)
        print(json.dumps(info, indent=2) if args.json else
              f"{info['submission_id']}: {info['status']}" + (f" ({info['message']})" if info["message"] else ""))
    elif args.action == "logs":
        if args.follow:
            state = jobs.follow(client, args.submission_id, lambda text: (sys.stdout.write(text), sys.stdout.flush()))
            print(f"job {args.submission_id}: {state}", file=sys.stderr)
        else:
            sys.stdout.write(jobs.logs(client, args.submission_id))
    elif args.action == "stop":
        stopped = jobs.stop(client, args.submission_id)
        print(f"{args.submission_id}: " + ("stop requested" if stopped else "not running"))
    elif args.action == "list":
        rows = jobs.list_jobs(client, args.name)
        print(json.dumps(rows, indent=2) if args.json else
              "\n".join(f"{r['submission_id']:48s} {r['status']:10s} {r['run'] or '-'}" for r in rows))
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except jobs.JobError as exc:
        print(f"megaclass jobs: error: {exc}", file=sys.stderr)
        return 1
