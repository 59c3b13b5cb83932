"""Job submission: the entrypoint we build, and real jobs on a real token-authenticated Ray head.

The head is cluster.localcluster's LocalRayCluster with one node: `ray start --head` on 127.0.0.1 with
RAY_AUTH_MODE=token, its own HOME and temp dir, torn down by signalling exactly the processes of its session.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import pytest

from cluster import jobs
from cluster.cli import main
from cluster.localcluster import LocalRayCluster
from data_pipeline.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_entrypoint_gives_resumable_commands_a_stable_run_dir(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("train:\n  max_steps: 5\n")
    entry = jobs.build_entrypoint(["pretrain", "--config", "cfg.yaml"], "r50", None, base=tmp_path)
    assert entry == "python -m cluster pretrain --config cfg.yaml --set checkpoint.url=$HOME/megaclass/runs/r50"
    entry = jobs.build_entrypoint(["finetune", "--config", "cfg.yaml"], "ft", "s3://b/runs", base=tmp_path)
    assert entry.endswith("--set checkpoint.url=s3://b/runs/ft")
    # The user's choice wins: an explicit --set, or an absolute run dir in the config file.
    entry = jobs.build_entrypoint(["pretrain", "--set", "checkpoint.url=/data/x"], "r", None, base=tmp_path)
    assert entry.count("checkpoint.url") == 1
    cfg.write_text("checkpoint:\n  url: gs://bucket/run\n")
    assert "checkpoint.url" not in jobs.build_entrypoint(["pretrain", "--config", "cfg.yaml"], "r", None,
                                                         base=tmp_path)
    assert jobs.build_entrypoint(["plan", "--help"], "r", None) == "python -m cluster plan --help"
    assert jobs.build_entrypoint(["registry", "list", "--registry", "a b"], "r", None).endswith("'a b'")


def test_config_files_must_be_shipped(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    (project / "configs" / "a.yaml").write_text("{}\n")
    (tmp_path / "outside.yaml").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    assert jobs.ship_configs(["pretrain", "--config", "project/configs/a.yaml"], project) == \
        ["pretrain", "--config", "configs/a.yaml"]
    assert jobs.ship_configs(["pretrain", "--config=project/configs/a.yaml"], project) == \
        ["pretrain", "--config=configs/a.yaml"]
    with pytest.raises(ConfigError, match="--config: outside.yaml is outside the working dir"):
        jobs.ship_configs(["pretrain", "--config", "outside.yaml"], project)
    with pytest.raises(ConfigError, match="--config: nope.yaml does not exist"):
        jobs.ship_configs(["pretrain", "--config", "nope.yaml"], project)


def test_auth_token_lookup(tmp_path, monkeypatch):
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert jobs.auth_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert jobs.auth_token() == "from-home"
    (tmp_path / "tok").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert jobs.auth_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert jobs.auth_token() == "from-env"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert jobs.auth_token() is None


def test_submit_refuses_bad_input(capsys):
    assert main(["submit", "--address", "http://127.0.0.1:1", "--", "nonsense"]) == 2
    assert "megaclass submit: error: submit: 'nonsense' is not a megaclass subcommand" in capsys.readouterr().err
    assert main(["submit", "--address", "http://127.0.0.1:1", "--name", "../x", "--", "registry", "list"]) == 2


@pytest.fixture(scope="module")
def ray_head():
    """A token-authenticated one-node Ray cluster on 127.0.0.1; yields (dashboard URL, token)."""
    with LocalRayCluster(num_nodes=1) as cluster:
        yield cluster.dashboard_url, cluster.token


def _wait_terminal(client, submission_id: str, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    while (state := jobs.status(client, submission_id)["status"]) not in jobs.TERMINAL:
        assert time.monotonic() < deadline, f"job {submission_id} still {state}"
        time.sleep(0.5)
    return state


@pytest.mark.slow
def test_submit_follow_status_logs_stop(ray_head, monkeypatch, capsys, tmp_path):
    url, token = ray_head
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.chdir(ROOT)
    registry = tmp_path / "reg"

    # A subcommand as a job: shipped working dir, followed to the end, exit status from the job state.
    assert main(["submit", "--address", url, "--name", "smoke", "--follow", "--",
                 "registry", "list", "--registry", str(registry)]) == 0
    out, err = capsys.readouterr()
    submission_id = out.splitlines()[0]
    assert submission_id.startswith("smoke-") and f"no models in {registry}" in out
    assert f"job {submission_id}: SUCCEEDED" in err

    client = jobs.create_client(url)
    info = client.get_job_info(submission_id)
    assert info.runtime_env["env_vars"]["MEGACLASS_RUN_NAME"] == "smoke"
    assert info.runtime_env["working_dir"].startswith("gcs://")  # uploaded, not a path on this machine
    assert ".venv/" in info.runtime_env["excludes"]
    assert info.entrypoint == f"python -m cluster registry list --registry {registry}"
    assert main(["jobs", "status", submission_id, "--address", url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "SUCCEEDED"
    assert main(["jobs", "logs", submission_id, "--address", url]) == 0
    assert f"no models in {registry}" in capsys.readouterr().out

    # A failing subcommand is a failed job, and a resubmission under the same name is a new attempt.
    assert main(["submit", "--address", url, "--name", "smoke", "--follow", "--",
                 "registry", "show", "missing", "--registry", str(registry)]) == 1
    out, err = capsys.readouterr()
    assert "registry://missing: no published versions" in out and "FAILED" in err
    assert main(["jobs", "list", "--address", url, "--name", "smoke", "--json"]) == 0
    attempts = json.loads(capsys.readouterr().out)
    assert [a["status"] for a in attempts] == ["SUCCEEDED", "FAILED"]
    assert len({a["submission_id"] for a in attempts}) == 2

    # A driver that passes its own runtime_env to ray.init (as ingest does) joins the cluster inside
    # the job even when an env var name appears in both.
    code = ("import os, ray; ray.init(runtime_env={'env_vars': {'MEGACLASS_RUN_NAME': 'x', 'B': '2'}}); "
            "print('WORKER', ray.get(ray.remote(lambda: (os.environ['B'], os.path.isfile('cluster/jobs.py')))"
            ".options(num_cpus=0).remote()))")
    env = {**jobs.JOB_ENV, "MEGACLASS_RUN_NAME": "smoke"}
    driver_id = client.submit_job(entrypoint=f'python -c "{code}"', runtime_env=jobs.job_runtime_env(ROOT, env))
    assert _wait_terminal(client, driver_id) == "SUCCEEDED", client.get_job_logs(driver_id)
    assert "WORKER ('2', True)" in client.get_job_logs(driver_id)

    # Stop a long-running job.
    long_id = client.submit_job(entrypoint="sleep 120", submission_id=f"sleeper-{secrets.token_hex(2)}")
    deadline = time.monotonic() + 30
    while jobs.status(client, long_id)["status"] != "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert main(["jobs", "stop", long_id, "--address", url]) == 0
    assert "stop requested" in capsys.readouterr().out
    assert _wait_terminal(client, long_id, 30) == "STOPPED"


@pytest.mark.slow
def test_missing_token_is_refused_clearly(ray_head, monkeypatch, capsys, tmp_path):
    url, _ = ray_head
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["jobs", "list", "--address", url]) == 1
    err = capsys.readouterr().err
    assert "cannot reach the Ray job server" in err and "no Ray auth token found" in err
