"""Ray Jobs: run any `megaclass` subcommand on a cluster, follow it, stop it.

`megaclass submit --address http://HEAD:8265 --name RUN -- pretrain --config cfg.yaml` becomes a Ray
job whose entrypoint is `python -m cluster pretrain --config cfg.yaml --set checkpoint.url=ROOT/RUN`,
run in the shipped working directory (normally this project, .venv/.git/run outputs excluded). From
the project root `python -m cluster` picks the shipped copy of the code, so what runs is what was
submitted; from any other folder it runs the megaclass installed on the cluster. The run name is stable across attempts and each attempt
gets its own submission id (`RUN-YYYYmmdd-HHMMSS-xxxx`): resubmitting the same name after a failure
or preemption points the trainer at the same run dir, and it resumes from its latest checkpoint.

Authentication: Ray 2.60 heads run with token authentication (`RAY_AUTH_MODE=token`). Ray's client
only attaches the token when the submitting process is itself in token mode, so a laptop with a
token but without that variable would be refused. We read the token the way Ray stores it
($RAY_AUTH_TOKEN, else the file at $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token) and always send
it as `Authorization: Bearer ...`; a head without authentication ignores the header.
"""

from __future__ import annotations

import asyncio
import os
import posixpath
import re
import secrets
import shlex
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from data_pipeline.config import ConfigError, read_yaml

# Never shipped: environments, VCS data and outputs can be gigabytes (Ray caps a package at ~512 MiB).
# Ray also honours .gitignore and .rayignore in the working dir; these apply even without them.
DEFAULT_EXCLUDES = (".venv/", "venv/", ".git/", "__pycache__/", "*.egg-info/", ".pytest_cache/",
                    "runs/", "demo/", "registry/", ".bench/", "build/", "*.pyc")
# Subcommands that write a run dir and resume from it: they get a stable checkpoint.url.
RESUMABLE = ("pretrain", "finetune")
RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Expanded by the job's shell on the cluster, so it names a folder on the node running the driver.
DEFAULT_RUNS_ROOT = "$HOME/megaclass/runs"
# Drivers (ingest, pretrain) pass their own runtime_env to ray.init (worker allocator settings);
# without this, Ray refuses to merge it with the job's whenever an env var name appears in both.
JOB_ENV = {"RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}


class JobError(RuntimeError):
    """The job server refused a request, could not be reached, or the job does not exist."""


def auth_token() -> str | None:
    """The cluster token as Ray stores it; None when there is none or auth is explicitly disabled."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if path.is_file():
        return path.read_text().strip() or None
    return None


def _client_errors() -> tuple[type[BaseException], ...]:
    """What Ray's job SDK raises for HTTP failures: RuntimeError (404, 5xx), ConnectionError,
    AuthenticationError (401/403, a RayError)."""
    from ray.exceptions import RayError

    return (RuntimeError, ConnectionError, RayError)


def create_client(address: str | None):
    """A JobSubmissionClient for the dashboard at `address` (http://HOST:8265), token attached."""
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("--address: required (the Ray dashboard, e.g. http://HEAD:8265), or set RAY_ADDRESS")
    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        return JobSubmissionClient(address, headers=headers)
    except _client_errors() as exc:
        hint = "" if token else " (no Ray auth token found: set RAY_AUTH_TOKEN or write ~/.ray/auth_token)"
        raise JobError(f"cannot reach the Ray job server at {address}: {exc}{hint}") from None


def validate_run_name(run: str) -> str:
    """The run name becomes a folder name and part of the submission id: no separators, no '..'."""
    if not RUN_NAME_RE.fullmatch(run) or ".." in run:
        raise ConfigError(f"--name: {run!r} is not a valid run name (letters, digits, '.', '_', '-'; "
                          f"starts with a letter or digit; at most 64 characters)")
    return run


def new_submission_id(run: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{run}-{stamp}-{secrets.token_hex(2)}"


def _option_value(argv: Sequence[str], option: str) -> list[tuple[int, str]]:
    """(index of the value, value) for every `option VALUE` or `option=VALUE` in argv."""
    found = []
    for i, arg in enumerate(argv):
        if arg == option and i + 1 < len(argv):
            found.append((i + 1, argv[i + 1]))
        elif arg.startswith(option + "="):
            found.append((i, arg[len(option) + 1:]))
    return found


def ship_configs(argv: list[str], working_dir: Path) -> list[str]:
    """Rewrite local `--config` paths (relative to the current dir) relative to the working dir,
    which is what reaches the cluster; a config outside it is an error."""
    out = list(argv)
    for index, value in _option_value(argv, "--config"):
        if "://" in value:
            continue  # an fsspec URL: read from wherever it lives
        path = Path(value).resolve()
        if not path.is_file():
            raise ConfigError(f"--config: {value} does not exist")
        try:
            rel = path.relative_to(working_dir)
        except ValueError:
            raise ConfigError(f"--config: {value} is outside the working dir {working_dir} and would not be "
                              f"shipped; move it there or pass --working-dir") from None
        out[index] = rel.as_posix() if out[index] == value else f"--config={rel.as_posix()}"
    return out


def _config_sets_checkpoint_url(argv: Sequence[str], base: Path) -> bool:
    """True when the user chose the run dir: `--set checkpoint.url=...`, or an absolute path or URL
    in the config file (a relative one would land in the per-attempt working dir and not resume)."""
    if any(v.startswith("checkpoint.url=") for _, v in _option_value(argv, "--set")):
        return True
    for _, value in _option_value(argv, "--config"):
        path = base / value
        if "://" in value or not path.is_file():
            continue
        url = (read_yaml(path).get("checkpoint") or {}).get("url")
        if isinstance(url, str) and ("://" in url or url.startswith("/")):
            return True
    return False


def build_entrypoint(argv: Sequence[str], run: str, runs_root: str | None, python: str = "python",
                     base: Path = Path(".")) -> str:
    """The shell command the job runs: this project's CLI with a stable run dir for resumable commands.
    `base` is the local working dir that config paths in argv are relative to."""
    words = [shlex.quote(w) for w in [python, "-m", "cluster", *argv]]
    if argv and argv[0] in RESUMABLE and not _config_sets_checkpoint_url(argv, base):
        if runs_root:
            words += ["--set", shlex.quote(f"checkpoint.url={posixpath.join(runs_root, run)}")]
        else:
            words += ["--set", f"checkpoint.url={DEFAULT_RUNS_ROOT}/{run}"]  # run is validated: no quoting needed
    return " ".join(words)


def job_runtime_env(working_dir: Path, env_vars: dict[str, str], excludes: Sequence[str] = ()) -> dict[str, Any]:
    """The runtime_env of a submitted job: the working dir (shipped, minus excludes) and env vars."""
    return {"working_dir": str(working_dir), "excludes": list(DEFAULT_EXCLUDES) + list(excludes),
            "env_vars": dict(env_vars)}


def submit(address: str | None, argv: Sequence[str], *, run: str, working_dir: str | None = None,
           runs_root: str | None = None, env: dict[str, str] | None = None,
           excludes: Sequence[str] = (), python: str = "python", client=None) -> str:
    """Submit `megaclass ARGV...` as a Ray job; returns the submission id."""
    if not argv:
        raise ConfigError("submit: no subcommand given (usage: megaclass submit --address URL -- SUBCOMMAND ...)")
    validate_run_name(run)
    root = Path(working_dir or os.getcwd()).resolve()
    if not root.is_dir():
        raise ConfigError(f"--working-dir: {root} is not a directory")
    shipped = ship_configs(list(argv), root)
    entrypoint = build_entrypoint(shipped, run, runs_root, python, base=root)
    submission_id = new_submission_id(run)
    env = {**JOB_ENV, **(env or {}), "MEGACLASS_RUN_NAME": run, "MEGACLASS_SUBMISSION_ID": submission_id}
    runtime_env = job_runtime_env(root, env, excludes)
    client = client or create_client(address)
    try:
        return client.submit_job(entrypoint=entrypoint, submission_id=submission_id, runtime_env=runtime_env,
                                 metadata={"megaclass_run": run, "megaclass_command": argv[0]})
    except _client_errors() as exc:
        raise JobError(f"job server refused the submission: {exc}") from None


def _call(what: str, fn: Callable, *args) -> Any:
    try:
        return fn(*args)
    except _client_errors() as exc:
        raise JobError(f"{what}: {exc}") from None


def status(client, submission_id: str) -> dict[str, Any]:
    info = _call(f"job {submission_id}", client.get_job_info, submission_id)
    return {"submission_id": submission_id, "status": str(info.status.value), "message": info.message,
            "entrypoint": info.entrypoint, "metadata": info.metadata or {},
            "start_time": info.start_time, "end_time": info.end_time}


def logs(client, submission_id: str) -> str:
    return _call(f"job {submission_id}", client.get_job_logs, submission_id)


def stop(client, submission_id: str) -> bool:
    return bool(_call(f"job {submission_id}", client.stop_job, submission_id))


def list_jobs(client, run: str | None = None) -> list[dict[str, Any]]:
    jobs = _call("list jobs", client.list_jobs)
    rows = [{"submission_id": j.submission_id, "status": str(j.status.value),
             "run": (j.metadata or {}).get("megaclass_run"), "start_time": j.start_time,
             "entrypoint": j.entrypoint} for j in jobs if j.submission_id]
    return sorted((r for r in rows if run is None or r["run"] == run), key=lambda r: r["start_time"] or 0)


def follow(client, submission_id: str, write: Callable[[str], None], poll_s: float = 1.0) -> str:
    """Stream the job's logs through `write` until it ends; returns the final status."""
    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            write(chunk)

    try:
        asyncio.run(tail())
    except RuntimeError as exc:  # the log socket dropped (head restart, proxy): the status poll decides
        write(f"[megaclass] log stream ended early ({exc}); waiting for the job status\n")
    while True:
        state = status(client, submission_id)["status"]
        if state in TERMINAL:
            return state
        time.sleep(poll_s)
