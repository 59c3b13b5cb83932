"""`megaclass cluster render`: the RayJob and cluster-launcher YAML parse and carry the run's shape."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from cluster.cli import main

CONFIG = """\
# tiny pretrain config for rendering tests
data:
  url: s3://data/web-100k
  num_workers: 6
model:
  arch: resnet50d
checkpoint:
  url: s3://runs/default
scaling:
  num_workers: 1
  max_failures: 5
  cpus_per_worker: 7
"""


@pytest.fixture()
def rendered(tmp_path):
    config = tmp_path / "pretrain.yaml"
    config.write_text(CONFIG)
    out = tmp_path / "out"
    assert main(["cluster", "render", "--config", str(config), "--name", "r50-web", "--nodes", "8",
                 "--gpus-per-node", "8", "--image", "ghcr.io/x/megaclass:1", "--storage-url", "s3://bucket/mc",
                 "--out", str(out)]) == 0
    return out


def _set_values(entrypoint: str) -> dict[str, str]:
    argv = shlex.split(entrypoint)
    return dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--set")


def test_rayjob(rendered):
    config_map, job = list(yaml.safe_load_all((rendered / "rayjob.yaml").read_text()))
    assert config_map["kind"] == "ConfigMap" and yaml.safe_load(config_map["data"]["pretrain.yaml"]) == yaml.safe_load(CONFIG)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:4] == ["megaclass", "pretrain", "--config", "/megaclass/config/pretrain.yaml"]
    assert _set_values(spec["entrypoint"]) == {
        "scaling.num_workers": "64", "scaling.use_gpu": "true", "scaling.max_failures": "5",
        "scaling.cpus_per_worker": "7", "checkpoint.url": "s3://bucket/mc/runs/r50-web"}
    assert spec["backoffLimit"] == 2 and spec["shutdownAfterJobFinishes"] is True
    head = spec["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    (workers,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 8
    (container,) = workers["template"]["spec"]["containers"]
    assert container["image"] == "ghcr.io/x/megaclass:1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert int(container["resources"]["limits"]["cpu"]) == 8 * 7 + 2
    assert {"name": "PILLOW_BLOCKS_MAX", "value": "64"} in container["env"]
    volumes = {v["name"]: v for v in workers["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"


def test_cluster_launcher_and_submit_script(rendered):
    launcher = yaml.safe_load((rendered / "cluster.yaml").read_text())
    assert launcher["cluster_name"] == "megaclass-r50-web" and launcher["max_workers"] == 8
    assert launcher["docker"]["image"] == "ghcr.io/x/megaclass:1"
    worker = launcher["available_node_types"]["gpu_worker"]
    assert worker["min_workers"] == worker["max_workers"] == 8 and worker["resources"]["GPU"] == 8
    assert launcher["available_node_types"]["head"]["resources"]["CPU"] == 0
    assert launcher["head_node_type"] == "head"
    submit = (rendered / "submit.sh").read_text()
    assert "ray up -y" in submit and "megaclass submit --address http://127.0.0.1:8265 --name r50-web" in submit
    assert "--set checkpoint.url=s3://bucket/mc/runs/r50-web" in submit


def _walk(node):
    """Every mapping in a parsed YAML document."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def test_rendered_clusters_use_token_auth_and_no_open_dashboard(rendered):
    config_map, job = list(yaml.safe_load_all((rendered / "rayjob.yaml").read_text()))
    cluster_spec = job["spec"]["rayClusterSpec"]
    assert cluster_spec["authOptions"] == {"mode": "token"}  # KubeRay: Secret + env on every pod and the submitter
    major, minor = (int(x) for x in cluster_spec["rayVersion"].split(".")[:2])
    assert (major, minor) >= (2, 52)  # KubeRay refuses token auth for older Ray
    head = cluster_spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "$(MY_POD_IP)"
    (head_container,) = head["template"]["spec"]["containers"]
    assert {"name": "MY_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in head_container["env"]
    for doc in (config_map, job):
        for mapping in _walk(doc):
            assert mapping.get("name") not in ("RAY_AUTH_TOKEN",) or "value" not in mapping  # never inlined
            assert "0.0.0.0" not in [str(v) for v in mapping.values()]
        for mapping in _walk(doc.get("metadata", {})):
            assert all(len(v) <= 63 for k, v in mapping.items() if k == "name")

    launcher = yaml.safe_load((rendered / "cluster.yaml").read_text())
    starts = launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]
    for command in (c for c in starts if "ray start" in c):
        assert command.startswith("RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=/tmp/megaclass/ray_auth_token ray start")
    head_start = next(c for c in starts if "--head" in c)
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in (rendered / "cluster.yaml").read_text()
    assert launcher["file_mounts"] == {"/tmp/megaclass/ray_auth_token": "~/.ray/auth_token"}
    assert "-e RAY_AUTH_MODE=token" in launcher["docker"]["run_options"]
    submit = (rendered / "submit.sh").read_text()
    assert submit.index("ray get-auth-token --generate") < submit.index("ray up -y")


@pytest.mark.parametrize("name", ["R50", "r50_web", "r50-", "-r50", "9lives", "a" * 47, "r50\n"])
def test_render_refuses_names_that_are_not_rfc1123_labels(tmp_path, capsys, name):
    config = tmp_path / "pretrain.yaml"
    config.write_text(CONFIG)
    code = main(["cluster", "render", "--config", str(config), f"--name={name}", "--nodes", "1", "--image", "img",
                 "--out", str(tmp_path / "o")])
    assert code == 2 and "--name" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_render_refuses_a_bad_namespace(tmp_path, capsys):
    config = tmp_path / "pretrain.yaml"
    config.write_text(CONFIG)
    assert main(["cluster", "render", "--config", str(config), "--name", "ok", "--nodes", "1", "--image", "img",
                 "--namespace", "Prod_NS", "--out", str(tmp_path / "o")]) == 2
    assert "--namespace" in capsys.readouterr().err


def test_render_rejects_bad_name_and_warns_on_local_paths(tmp_path, capsys, caplog):
    config = tmp_path / "pretrain.yaml"
    config.write_text("data:\n  url: /home/me/data\ncheckpoint:\n  url: runs/x\n")
    base = ["cluster", "render", "--config", str(config), "--nodes", "2", "--image", "img", "--out", str(tmp_path / "o")]
    assert main(base + ["--name", "bad/name"]) == 2
    assert "--name" in capsys.readouterr().err
    assert main(base + ["--name", "ok"]) == 0
    assert "data.url" in caplog.text and "checkpoint.url" in caplog.text
    job = list(yaml.safe_load_all((tmp_path / "o" / "rayjob.yaml").read_text()))[1]
    assert _set_values(job["spec"]["entrypoint"])["checkpoint.url"] == "runs/x"
    assert _set_values(job["spec"]["entrypoint"])["scaling.max_failures"] == "3"


def test_shipped_config_renders_to_a_valid_pretrain_config(tmp_path):
    from data_pipeline.config import load_config
    from pretrain.config import PretrainConfig

    shipped = Path(__file__).resolve().parents[1] / "configs" / "pretrain_resnet50d.yaml"
    assert main(["cluster", "render", "--config", str(shipped), "--name", "r50", "--nodes", "2",
                 "--image", "img", "--storage-url", "s3://b", "--out", str(tmp_path)]) == 0
    job = list(yaml.safe_load_all((tmp_path / "rayjob.yaml").read_text()))[1]
    overrides = [f"{k}={v}" for k, v in _set_values(job["spec"]["entrypoint"]).items()]
    cfg = load_config(PretrainConfig, shipped, overrides)  # what `megaclass pretrain` will resolve on the cluster
    assert cfg.scaling.num_workers == 16 and cfg.scaling.use_gpu and cfg.checkpoint.url == "s3://b/runs/r50"
