"""`megaclass cluster render`: Ray cluster-launcher YAML + KubeRay RayJob for a multi-node pretrain run.

    megaclass cluster render --config configs/pretrain_resnet50d.yaml --name r50-web \\
        --nodes 8 --gpus-per-node 8 --image ghcr.io/me/megaclass:0.1.0 --storage-url s3://bucket/megaclass \\
        --out deploy/r50-web
    kubectl apply -f deploy/r50-web/rayjob.yaml        # KubeRay
    sh deploy/r50-web/submit.sh                        # or: ray up + megaclass submit

Writes OUT/cluster.yaml, OUT/rayjob.yaml (ConfigMap + RayJob) and OUT/submit.sh; see docs/manifests.md.
"""

from __future__ import annotations

import argparse

from cluster.manifests import RenderOptions, write_manifests

NAME = "cluster"
HELP = "render Ray cluster-launcher and KubeRay RayJob manifests for a multi-node run"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = actions.add_parser("render", help="write cluster.yaml, rayjob.yaml and submit.sh from a pretrain config")
    d = RenderOptions(name="x", nodes=1, gpus_per_node=1, image="x")
    p.add_argument("--config", required=True, help="pretrain config YAML")
    p.add_argument("--name", required=True, help="run name: names the cluster, the RayJob and the run dir")
    p.add_argument("--nodes", type=int, required=True, help="GPU worker nodes")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per worker node (default 8)")
    p.add_argument("--image", required=True, help="container image with megaclass installed")
    p.add_argument("--storage-url", default=None,
                   help="shared storage root; the run dir becomes STORAGE/runs/NAME (default: config checkpoint.url)")
    p.add_argument("--max-failures", type=int, default=None,
                   help="Ray Train worker-group restarts (default: config scaling.max_failures, else 3)")
    p.add_argument("--job-retries", type=int, default=d.job_retries,
                   help=f"KubeRay resubmissions of the whole job, each resuming (default {d.job_retries})")
    p.add_argument("--head-cpu", default=d.head_cpu, help=f"head pod CPU (default {d.head_cpu})")
    p.add_argument("--head-memory", default=d.head_memory, help=f"head pod memory (default {d.head_memory})")
    p.add_argument("--cpus-per-gpu", type=int, default=None,
                   help="CPUs per GPU worker (default: config scaling.cpus_per_worker, else 8)")
    p.add_argument("--memory-per-gpu-gi", type=int, default=d.memory_per_gpu_gi,
                   help=f"worker pod memory per GPU in GiB (default {d.memory_per_gpu_gi})")
    p.add_argument("--shm-per-gpu-gi", type=int, default=d.shm_per_gpu_gi,
                   help=f"/dev/shm per GPU in GiB, for loader workers (default {d.shm_per_gpu_gi})")
    p.add_argument("--namespace", default=d.namespace, help=f"Kubernetes namespace (default {d.namespace})")
    p.add_argument("--region", default=d.region, help=f"cluster-launcher AWS region (default {d.region})")
    p.add_argument("--head-instance-type", default=d.head_instance_type)
    p.add_argument("--worker-instance-type", default=d.worker_instance_type)
    p.add_argument("--out", required=True, help="output folder (any fsspec URL)")


def run(args: argparse.Namespace) -> int:
    opts = RenderOptions(
        name=args.name, nodes=args.nodes, gpus_per_node=args.gpus_per_node, image=args.image,
        storage_url=args.storage_url, max_failures=args.max_failures, job_retries=args.job_retries,
        head_cpu=args.head_cpu, head_memory=args.head_memory, cpus_per_gpu=args.cpus_per_gpu,
        memory_per_gpu_gi=args.memory_per_gpu_gi, shm_per_gpu_gi=args.shm_per_gpu_gi, namespace=args.namespace,
        region=args.region, head_instance_type=args.head_instance_type,
        worker_instance_type=args.worker_instance_type)
    written = write_manifests(args.out, args.config, opts)
    for key in ("cluster_launcher", "rayjob", "submit"):
        print(f"{key:16} {written[key]}")
    return 0
