"""A reduced `megaclass simulate --chaos`, end to end: every stage for real, two processes killed.

The SIGKILLed Ray Train worker is the test of a training run surviving a dead worker: the second
worker group resumes from the newest step checkpoint, the metrics continue without a gap or a
repeat, retention keeps the newest checkpoints, and the sharded head restores exactly.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import timm
import torch

from cluster.cli import main
from cluster.chaos import ProcessKiller, find_processes
from pretrain.checkpoint import create_model_from_checkpoint, list_checkpoints, load_checkpoint
from pretrain.rundir import read_metrics

REDUCED = [
    "web.upstream_classes=12", "web.images_per_class=8", "web.downstream_classes=3",
    "web.downstream_train_per_class=4", "web.downstream_val_per_class=3", "shard_size=16",
    "pretrain_overrides=[model.arch=test_resnet,train.max_steps=12,checkpoint.every_steps=4,log.every_steps=4,data.image_size=32,"
    "train.global_batch_size=16]",
    "finetune_overrides=[train.max_steps=4,train.eval_every_steps=2,data.image_size=32,train.global_batch_size=8]",
]


@pytest.mark.slow
def test_reduced_simulation_with_chaos(tmp_path, capsys):
    workdir = tmp_path / "sim"
    code = main(["simulate", "--workdir", str(workdir), "--chaos", "--json",
                 *(arg for item in REDUCED for arg in ("--set", item))])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report["checks"]
    assert all(report["checks"].values())

    ingest = report["ingest"]
    web_rows = 12 * 8
    assert ingest["rows_in"] == web_rows + 5  # + 4 broken URLs + 1 duplicate
    assert ingest["ok"] == web_rows and ingest["failed"] == 4 and ingest["skipped"] == 1
    assert ingest["reasons"] == {"duplicate_url": 1, "http_404": 1, "not_an_image": 1, "too_small": 1, "truncated": 1}

    # chaos: one ingestion task and one training worker were SIGKILLed, and both stages still finished
    assert len(report["chaos"]["ingest"]["killed"]) == 1
    assert len(report["chaos"]["pretrain"]["killed"]) == 1
    assert report["pretrain"]["final_step"] == 12 and report["pretrain"]["resumes"]
    assert report["pretrain"]["resumes"][0]["step"] in (4, 8)
    check_pretrain_survived_worker_kill(workdir / "runs" / "pretrain")
    evaluation = json.loads((workdir / "evaluation" / "report.json").read_text())
    correct = sum(v["correct"] for v in evaluation["per_class"].values())
    assert report["downstream"]["top1"] == correct / evaluation["num_samples"] and evaluation["num_samples"] > 0
    down = report["downstream"]
    assert down["gain_points"] == round(100 * (down["top1"] - down["scratch_top1"]), 1)
    assert json.loads((workdir / "runs" / "finetune-scratch" / "final" / "config.json").read_text()
                      )["megaclass"]["finetuned_from"]["scratch"] is True
    assert (workdir / "registry" / "sim-backbone" / "versions" / "000001" / "version.json").exists()
    assert (workdir / "evaluation" / "report.json").exists()
    assert "detector" not in report["artifacts"] and report["artifacts"]["published"].endswith("sim-backbone")


def check_pretrain_survived_worker_kill(run) -> None:
    records = read_metrics(str(run))
    assert [r["step"] for r in records if "event" not in r] == [4, 8, 12]  # no gap, no step twice
    resumed = [r["step"] for r in records if r.get("event") == "resume"]
    assert len(resumed) == 1 and resumed[0] in (4, 8)
    assert len({r["pid"] for r in records}) == 2  # rank 0 of a second worker group finished the run
    assert [os.path.basename(u) for u in list_checkpoints(str(run))] == ["step-00000008", "step-00000012"]
    ckpt = load_checkpoint(f"{run}/final")
    assert ckpt.megaclass["step"] == 12 and ckpt.megaclass["world_size"] == 2
    x = torch.randn(2, 3, 32, 32)
    model = timm.create_model(f"local-dir:{run}/final", pretrained=True).eval()
    assert torch.equal(model(x), create_model_from_checkpoint(ckpt).eval()(x))

    # The two-rank sharded head of the oldest kept checkpoint, loaded at world size 1, equals the
    # gathered head published with it.
    from timm.optim import create_optimizer_v2

    from pretrain.dist import DistInfo
    from pretrain.head import ShardedClassifierHead
    from pretrain.train_state import load_train_state
    ckpt_url = list_checkpoints(str(run))[0]
    published = load_checkpoint(ckpt_url).state_dict
    backbone = timm.create_model(ckpt.arch, num_classes=0)
    head = ShardedClassifierHead(backbone.num_features, published["fc.bias"].numel(), DistInfo(), init_seed=123)
    optimizer = create_optimizer_v2(torch.nn.ModuleDict({"b": backbone, "h": head}), opt="adamw", lr=0.1)
    progress = load_train_state(f"{ckpt_url}/train_state", backbone=backbone, head=head, optimizer=optimizer,
                                ema=None, dist=DistInfo())
    assert progress.world_size == 2 and progress.step == 8
    assert torch.equal(head.weight, published["fc.weight"]) and torch.equal(head.bias, published["fc.bias"])


def test_process_killer_kills_only_what_the_stage_started(tmp_path):
    """A matching process that the stage did not start (someone else's, started earlier, so with the
    lower pid) is never touched; the stage's matching grandchild is killed, once."""
    import subprocess
    import sys
    marker = f"megaclass-chaos-probe-{tmp_path.name}"
    sleeper = f"import time; time.sleep(60) # {marker}"
    outsider = subprocess.Popen([sys.executable, "-c", sleeper])
    stage = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; "
                              f"raise SystemExit(subprocess.Popen([sys.executable, '-c', {sleeper!r}]).wait())"])
    try:
        deadline = time.monotonic() + 20
        while not find_processes(marker, stage.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        (child, _), = find_processes(marker, stage.pid)
        killer = ProcessKiller(marker, poll_s=0.05)
        killer.start(stage.pid)
        assert stage.wait(timeout=10) != 0  # its child was SIGKILLed
        killer.stop()
        assert [k["pid"] for k in killer.killed] == [child]
        assert outsider.poll() is None  # the outsider is untouched
    finally:
        for proc in (outsider, stage):
            proc.kill()
            proc.wait()


def test_workdir_that_is_not_a_simulation_is_refused(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["simulate", "--workdir", str(tmp_path)]) == 2
    assert "not empty and not a previous simulation" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_node_killer_runs_as_a_stage_killer():
    """The simulation drives a NodeKiller exactly like a ProcessKiller: start(stage pid), stop(), report()."""
    from cluster.localcluster import NodeKiller

    class FakeCluster:
        def __init__(self):
            self.killed, self.started = [], []

        def kill_node(self, index):
            self.killed.append(index)
            return [4242, 4243]

        def start_node(self, index):
            self.started.append(index)

    cluster = FakeCluster()
    killer = NodeKiller(cluster, 1, lambda: True, restart_after_s=0.0, poll_s=0.01)
    killer.start(12345)
    deadline = time.monotonic() + 10
    while not cluster.started and time.monotonic() < deadline:
        time.sleep(0.01)
    killer.stop()
    assert cluster.killed == [1] and cluster.started == [1]
    (record,) = killer.report()["killed"]
    assert record["pid"] == 4242 and record["restarted_after_s"] >= 0
