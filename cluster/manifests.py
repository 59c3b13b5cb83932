"""Multi-node manifests from one pretrain config: a Ray cluster-launcher YAML and a KubeRay RayJob.

    write_manifests("out/", "configs/pretrain_resnet50d.yaml",
                    RenderOptions(name="r50-web", nodes=8, gpus_per_node=8, image="REGISTRY/megaclass:0.1.0",
                                  storage_url="s3://bucket/megaclass"))

Both run the same entrypoint as a laptop run, with the cluster shape passed as overrides:
`megaclass pretrain --config CFG --set scaling.num_workers=NODES*GPUS --set scaling.use_gpu=true
--set scaling.max_failures=M --set checkpoint.url=STORAGE/runs/NAME`. The run dir is derived from
the run name, so resubmitting (a RayJob retry, or `megaclass submit --name NAME`) resumes from its
checkpoints. The config is read as a plain mapping: rendering does not depend on the trainer's code.

Both start Ray with token authentication and never put the token in a manifest. The RayJob sets
`authOptions.mode: token` (KubeRay >= 1.5, Ray >= 2.52): KubeRay keeps the token in a Secret it
creates and gives it (RAY_AUTH_MODE, RAY_AUTH_TOKEN from the Secret) to the head, the workers and
the job submitter. Launcher nodes read it from a file that `ray up` copies from the user's
~/.ray/auth_token. The dashboard and its Jobs API answer only with the token, and never listen on
0.0.0.0: on the launcher head it binds 127.0.0.1 (reached through `ray dashboard`, an SSH tunnel);
in the head pod it binds the pod IP, which the KubeRay operator (polling job status with the token)
and `kubectl port-forward` reach.
"""

from __future__ import annotations

import logging
import re
import shlex
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from cluster.runtime import WORKER_ENV as RAY_WORKER_ENV
from data_pipeline.config import ConfigError, read_yaml
from data_pipeline.dataset import atomic_write_bytes, is_local, join

log = logging.getLogger(__name__)

CONFIG_MOUNT_DIR = "/megaclass/config"
CONFIG_FILE_NAME = "pretrain.yaml"
# The trainers' allocator settings, set in every container.
WORKER_ENV = {**RAY_WORKER_ENV, "RAY_USAGE_STATS_ENABLED": "0"}
# Where `ray up` puts the user's token on launcher nodes (a file_mounts target, read via RAY_AUTH_TOKEN_PATH).
LAUNCHER_TOKEN_PATH = "/tmp/megaclass/ray_auth_token"
LAUNCHER_AUTH_ENV = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": LAUNCHER_TOKEN_PATH}
LAUNCHER_DASHBOARD_HOST = "127.0.0.1"
POD_IP_ENV = "MY_POD_IP"  # the head pod's IP (downward API), which kubelet substitutes into `ray start`
RFC1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
# Names rendered from --name ("megaclass-NAME-config" is the longest) must stay within 63 characters.
MAX_NAME_LENGTH = 63 - len("megaclass--config")


@dataclass(frozen=True)
class RenderOptions:
    name: str
    nodes: int
    gpus_per_node: int
    image: str
    storage_url: str | None = None      # run dir = STORAGE/runs/NAME (default: the config's checkpoint.url)
    max_failures: int | None = None     # Ray Train worker-group restarts (default: the config's, else 3)
    job_retries: int = 2                # whole-job resubmissions by KubeRay (each resumes from checkpoints)
    head_cpu: str = "8"
    head_memory: str = "32Gi"
    cpus_per_gpu: int | None = None     # default: the config's scaling.cpus_per_worker, else 8
    memory_per_gpu_gi: int = 64
    shm_per_gpu_gi: int = 16            # /dev/shm for DataLoader workers' shared-memory batches
    namespace: str = "default"
    region: str = "us-west-2"
    head_instance_type: str = "m6i.4xlarge"
    worker_instance_type: str = "p4d.24xlarge"

    def validate(self) -> None:
        if not RFC1123_LABEL.fullmatch(self.name) or not self.name[0].isalpha() or len(self.name) > MAX_NAME_LENGTH:
            raise ConfigError(f"--name {self.name!r}: lowercase letters, digits and '-', starting with a letter, "
                              f"not ending with '-', at most {MAX_NAME_LENGTH} characters (it names Kubernetes "
                              "objects: RFC 1123 labels)")
        if not RFC1123_LABEL.fullmatch(self.namespace):
            raise ConfigError(f"--namespace {self.namespace!r}: not an RFC 1123 label (lowercase letters, digits, "
                              "'-', at most 63 characters, no '-' at either end)")
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ConfigError(f"--nodes and --gpus-per-node must be >= 1 (got {self.nodes}, {self.gpus_per_node})")
        if not self.image:
            raise ConfigError("--image: a container image with megaclass installed is required")


def _section(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    value = cfg.get(name) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: expected a section (mapping), got {value!r}")
    return value


def _node_local(url: str) -> bool:
    """A path only this machine sees: the local file system, or memory:// (one process)."""
    return is_local(url) or url.startswith("memory://")


def run_url(cfg: dict[str, Any], opts: RenderOptions) -> str:
    if opts.storage_url:
        return join(opts.storage_url, "runs", opts.name)
    url = _section(cfg, "checkpoint").get("url")
    if not url:
        raise ConfigError("checkpoint.url: not set in the config; pass --storage-url")
    return str(url)


def pretrain_overrides(cfg: dict[str, Any], opts: RenderOptions) -> list[str]:
    """`--set` overrides that turn the config into this cluster's run."""
    scaling = _section(cfg, "scaling")
    max_failures = opts.max_failures if opts.max_failures is not None else int(scaling.get("max_failures") or 3)
    return [f"scaling.num_workers={opts.nodes * opts.gpus_per_node}", "scaling.use_gpu=true",
            f"scaling.max_failures={max_failures}", f"scaling.cpus_per_worker={_cpus_per_gpu(cfg, opts)}",
            f"checkpoint.url={run_url(cfg, opts)}"]


def pretrain_command(config_path: str, overrides: list[str]) -> str:
    parts = ["megaclass", "pretrain", "--config", config_path]
    for item in overrides:
        parts += ["--set", item]
    return shlex.join(parts)


# CPUs per node beyond the training workers': Ray Train's coordinator actor asks for one, and the
# node's raylet and object store need a little, so a fully booked node cannot deadlock the run.
SPARE_CPUS_PER_NODE = 2


def _node_cpus(cfg: dict[str, Any], opts: RenderOptions) -> int:
    return opts.gpus_per_node * _cpus_per_gpu(cfg, opts) + SPARE_CPUS_PER_NODE


def _cpus_per_gpu(cfg: dict[str, Any], opts: RenderOptions) -> int:
    if opts.cpus_per_gpu is not None:
        return opts.cpus_per_gpu
    return max(1, int(float(_section(cfg, "scaling").get("cpus_per_worker") or 8)))


def _check_urls(cfg: dict[str, Any], opts: RenderOptions) -> list[str]:
    """Warnings for paths every node cannot see (fine only on a shared filesystem)."""
    warnings = []
    for field, url in (("data.url", _section(cfg, "data").get("url")), ("checkpoint.url", run_url(cfg, opts))):
        if url and _node_local(str(url)):
            warnings.append(f"{field} {url!r} is a local path: every node must see it (shared filesystem), "
                            "or use s3://, gs://, ...")
    return warnings


def render_cluster_launcher(cfg: dict[str, Any], opts: RenderOptions) -> dict[str, Any]:
    """`ray up` YAML (AWS provider, Docker image): a CPU head and `nodes` GPU workers, fixed size."""
    env_flags = [f"-e {k}={v}" for k, v in {**WORKER_ENV, **LAUNCHER_AUTH_ENV}.items()]
    auth = " ".join(f"{k}={v}" for k, v in LAUNCHER_AUTH_ENV.items())
    shm = opts.shm_per_gpu_gi * opts.gpus_per_node
    return {
        "cluster_name": f"megaclass-{opts.name}",
        "max_workers": opts.nodes,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 10,
        "provider": {"type": "aws", "region": opts.region, "cache_stopped_nodes": False},
        "auth": {"ssh_user": "ubuntu"},
        # The token file, copied from the machine running `ray up` (never written into this YAML).
        "file_mounts": {LAUNCHER_TOKEN_PATH: "~/.ray/auth_token"},
        "docker": {"image": opts.image, "container_name": "megaclass", "pull_before_run": True,
                   "run_options": ["--ulimit nofile=65536:65536", f"--shm-size={shm}g", *env_flags]},
        "available_node_types": {
            "head": {
                "resources": {"CPU": 0},  # no training or loader work on the head: it runs GCS and the job driver
                "node_config": {"InstanceType": opts.head_instance_type},
            },
            "gpu_worker": {
                "min_workers": opts.nodes,
                "max_workers": opts.nodes,
                "resources": {"GPU": opts.gpus_per_node, "CPU": _node_cpus(cfg, opts)},
                "node_config": {"InstanceType": opts.worker_instance_type},
            },
        },
        "head_node_type": "head",
        "head_start_ray_commands": [
            "ray stop",
            f"{auth} ray start --head --port=6379 --dashboard-host={LAUNCHER_DASHBOARD_HOST} --object-manager-port=8076 "
            "--autoscaling-config=~/ray_bootstrap_config.yaml",
        ],
        "worker_start_ray_commands": ["ray stop",
                                      f"{auth} ray start --address=$RAY_HEAD_IP:6379 --object-manager-port=8076"],
    }


def _container(name: str, image: str, resources: dict[str, Any], ports: list[dict] | None = None,
               extra_env: list[dict[str, Any]] = ()) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": name,
        "image": image,
        "env": [{"name": k, "value": v} for k, v in WORKER_ENV.items()] + list(extra_env),
        "resources": {"limits": dict(resources), "requests": dict(resources)},
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_MOUNT_DIR, "readOnly": True},
                         {"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if ports:
        container["ports"] = ports
    return container


def _volumes(config_map: str, shm_gi: int) -> list[dict[str, Any]]:
    return [{"name": "config", "configMap": {"name": config_map}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_gi}Gi"}}]


def render_rayjob(cfg: dict[str, Any], config_text: str, opts: RenderOptions) -> list[dict[str, Any]]:
    """[ConfigMap with the config file, RayJob] for KubeRay (apiVersion ray.io/v1)."""
    config_map = f"megaclass-{opts.name}-config"
    entrypoint = pretrain_command(f"{CONFIG_MOUNT_DIR}/{CONFIG_FILE_NAME}", pretrain_overrides(cfg, opts))
    gpus, cpus = opts.gpus_per_node, _node_cpus(cfg, opts)
    head_ports = [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
                  {"containerPort": 10001, "name": "client"}]
    pod_ip = [{"name": POD_IP_ENV, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    head = {
        # The pod IP, not KubeRay's default 0.0.0.0; num-cpus 0 keeps training off the head.
        "rayStartParams": {"dashboard-host": f"$({POD_IP_ENV})", "num-cpus": "0"},
        "template": {"spec": {
            "containers": [_container("ray-head", opts.image, {"cpu": opts.head_cpu, "memory": opts.head_memory},
                                      head_ports, pod_ip)],
            "volumes": _volumes(config_map, 1),
        }},
    }
    worker = {
        "groupName": "gpu",
        "replicas": opts.nodes,
        "minReplicas": opts.nodes,
        "maxReplicas": opts.nodes,
        "rayStartParams": {},
        "template": {"spec": {
            "containers": [_container("ray-worker", opts.image, {
                "cpu": str(cpus), "memory": f"{opts.memory_per_gpu_gi * gpus}Gi", "nvidia.com/gpu": gpus})],
            "volumes": _volumes(config_map, opts.shm_per_gpu_gi * gpus),
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        }},
    }
    try:
        ray_version = metadata.version("ray")
    except metadata.PackageNotFoundError:
        ray_version = "2.60.0"
    return [
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": config_map, "namespace": opts.namespace},
         "data": {CONFIG_FILE_NAME: config_text}},
        {"apiVersion": "ray.io/v1", "kind": "RayJob",
         "metadata": {"name": f"megaclass-{opts.name}", "namespace": opts.namespace,
                      "labels": {"app.kubernetes.io/name": "megaclass", "megaclass/run": opts.name}},
         "spec": {
             "entrypoint": entrypoint,
             "submissionMode": "K8sJobMode",
             # a retry is a new submission of the same run: it resumes from checkpoint.url
             "backoffLimit": opts.job_retries,
             "shutdownAfterJobFinishes": True,
             "ttlSecondsAfterFinished": 3600,
             "rayClusterSpec": {"rayVersion": ray_version,
                                # KubeRay creates the token Secret and hands the token to every pod.
                                "authOptions": {"mode": "token"},
                                "headGroupSpec": head, "workerGroupSpecs": [worker]},
         }},
    ]


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the embedded config file) as readable `|` blocks."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_representer)


def _dump(documents: list[dict[str, Any]]) -> str:
    return yaml.dump_all(documents, Dumper=_Dumper, sort_keys=False, width=120)


def write_manifests(out_dir: str, config_path: str, opts: RenderOptions) -> dict[str, Any]:
    """Render both manifests (and submit.sh for the launcher path) into `out_dir`; returns paths + warnings."""
    opts.validate()
    cfg = read_yaml(config_path)
    config_text = Path(config_path).read_text() if "://" not in str(config_path) else yaml.safe_dump(cfg)
    warnings = _check_urls(cfg, opts)
    for warning in warnings:
        log.warning(warning)
    launcher = render_cluster_launcher(cfg, opts)
    rayjob = render_rayjob(cfg, config_text, opts)
    cluster_file, rayjob_file, submit_file = (join(out_dir, n) for n in ("cluster.yaml", "rayjob.yaml", "submit.sh"))
    header = f"# megaclass run {opts.name}: {opts.nodes} nodes x {opts.gpus_per_node} GPUs, from {config_path}\n"
    atomic_write_bytes(cluster_file, (header + _dump([launcher])).encode())
    atomic_write_bytes(rayjob_file, (header + _dump(rayjob)).encode())
    submit = "\n".join([
        "#!/bin/sh",
        f"# Launcher path for run {opts.name}: start the cluster, forward the dashboard, submit the run.",
        "# Resubmitting the same --name resumes from the run's checkpoints. Tear down: ray down -y cluster.yaml",
        "set -e",
        "# The cluster's token: ray up copies ~/.ray/auth_token to every node; megaclass submit sends it.",
        "test -s ~/.ray/auth_token || ray get-auth-token --generate >/dev/null",
        'ray up -y "$(dirname "$0")/cluster.yaml"',
        'ray dashboard "$(dirname "$0")/cluster.yaml" &',
        "sleep 5",
        "megaclass submit --address http://127.0.0.1:8265 --name " + shlex.quote(opts.name) + " --follow -- "
        + pretrain_command(str(config_path), pretrain_overrides(cfg, opts)).removeprefix("megaclass "),
        "",
    ])
    atomic_write_bytes(submit_file, submit.encode())
    return {"cluster_launcher": cluster_file, "rayjob": rayjob_file, "submit": submit_file, "warnings": warnings}
