"""Detection fine-tuning on 2 gloo ranks under torchrun: the ranks read disjoint batches, hold the same
weights after every step (DDP averages the gradients), take the same decisions and finish together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.synthetic_detection import detection_classes, write_coco_set
from pretrain.checkpoint import load_checkpoint
from tests.conftest import free_port
from tests.test_finetune import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_detection_finetune_on_two_ranks(tmp_path):
    classes = detection_classes(2)
    train = write_coco_set(tmp_path / "train", classes, 8, seed=1, size=(40, 40))
    val = write_coco_set(tmp_path / "val", classes, 2, seed=2, size=(40, 40))
    run, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    overrides = [f"finetune.checkpoint_url={make_checkpoint(tmp_path / 'ckpt')}", f"data.url={train}",
                 f"data.val_url={val}", f"checkpoint.url={run}", f"data.cache_url={tmp_path / 'cache'}",
                 "scaling.num_workers=2", "data.num_workers=0", "train.global_batch_size=4", "train.max_steps=3",
                 "train.eval_every_steps=3", "train.patience=0", "optim.warmup_steps=1", "log.every_steps=1",
                 "log.tensorboard=false", "model.fpn_channels=16", "train.num_threads=1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--master-port={free_port()}", "--nproc-per-node=2",
           str(ROOT / "tests" / "detection_ranks.py"), str(out), *(a for o in overrides for a in ("--set", o))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["summary"] == ranks[1]["summary"]  # the same validation results and stopping decisions
    assert ranks[0]["summary"]["steps"] == 3
    steps = [r["steps"] for r in ranks]
    assert len(steps[0]) == len(steps[1]) == 3
    for a, b in zip(*steps):
        assert len(a["keys"]) == len(b["keys"]) == 2 and not set(a["keys"]) & set(b["keys"])  # a half batch each
        assert a["weights"] == b["weights"]  # bit for bit: DDP averaged the gradients
    assert steps[0][0]["weights"] != steps[0][-1]["weights"]  # and they trained
    final = load_checkpoint(str(run / "final"))
    assert final.task == "detection" and final.megaclass["step"] == 3
