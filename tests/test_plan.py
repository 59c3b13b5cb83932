"""`megaclass plan` at the seed's scale: 65M images, 100k classes, resnet50d on 64 GPUs."""

from __future__ import annotations

import json

import pytest

from cluster.cli import main
from cluster.plan import PlanInputs, format_plan, make_plan

SEED_SCALE = PlanInputs(images=65_000_000, classes=100_000, arch="resnet50d", nodes=8, gpus_per_node=8,
                        batch_size_per_gpu=256, per_gpu_images_per_s=3000, cores_per_node=96)


def test_seed_scale_numbers():
    plan = make_plan(SEED_SCALE)
    assert plan["num_features"] == 2048 and 23e6 < plan["backbone_params"] < 24e6  # timm on the meta device
    assert plan["head_params"] == 2048 * 100_000 + 100_000 == 204_900_000
    assert plan["head_bytes_unsharded"] == 204_900_000 * 16  # 3.28 GB (BENCHMARKS.md: 3,278 MB measured)
    assert plan["classes_per_rank"] == 1563
    assert plan["head_bytes_per_rank"] == 1563 * 2049 * 16  # ~1/64 of the unsharded head
    assert abs(plan["head_bytes_per_rank"] * 64 / plan["head_bytes_unsharded"] - 1) < 0.001
    assert plan["global_batch_size"] == 16_384 and plan["steps_per_epoch"] == 65_000_000 // 16_384
    assert plan["storage_bytes"] == 65_000_000 * 20_500  # ~1.3 TB at the measured 20.5 kB per stored image
    assert plan["samples_per_shard"] == 48_780 and plan["num_shards"] == 1333
    assert plan["epoch_s"] == pytest.approx(65e6 / (3000 * 64))
    cpu_s = 65e6 / (114 * 8 * 96)
    net_s = 65e6 * 118_000 / (8 * 1.25e9)
    assert plan["ingest_s"] == pytest.approx(max(cpu_s, net_s)) and plan["ingest_bound"] == "network"
    text = format_plan(plan)
    assert "204.9M params" in text and "3.28 GB" in text and "51.24 MB per rank" in text
    assert "megaclass ingest SOURCE OUT --shard-size 48780" in text


def test_cpu_bound_ingestion_and_fallback_features():
    plan = make_plan(PlanInputs(images=1_000_000, classes=1000, nodes=1, cores_per_node=4,
                                node_network_bytes_per_s=1e10), num_features=1280, backbone_params=None)
    assert plan["ingest_bound"] == "cpu" and plan["ingest_s"] == pytest.approx(1e6 / (114 * 4))
    assert plan["head_params"] == 1280 * 1000 + 1000 and plan["backbone_bytes_per_rank"] is None
    assert "n/a" in format_plan(plan)


def test_cli_prints_plan_and_json(capsys):
    argv = ["plan", "--images", "65000000", "--classes", "100000", "--arch", "resnet50d",
            "--nodes", "8", "--gpus-per-node", "8", "--per-gpu-images-per-s", "2500"]
    assert main(argv) == 0
    assert "sharded over 64 ranks" in capsys.readouterr().out
    assert main(argv + ["--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["world_size"] == 64 and plan["cluster_images_per_s"] == 2500 * 64


def test_cli_rejects_bad_input(capsys):
    assert main(["plan", "--images", "10", "--classes", "0"]) == 2
    assert "--classes" in capsys.readouterr().err
    assert main(["plan", "--images", "10", "--classes", "5", "--arch", "no_such_model_xyz"]) == 2
    assert "no_such_model_xyz" in capsys.readouterr().err
