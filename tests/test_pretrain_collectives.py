"""Every rank issues the same collectives: one 2-rank torchrun launch (gloo, TORCH_DISTRIBUTED_DEBUG=DETAIL)
trains a matrix of small runs (tests/collective_matrix.py) and each must finish with the same loss on both
ranks and bit-identical backbone replicas."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipeline import ALLOCATOR_ENV
from tests.collective_matrix import CELLS
from tests.dataset_factory import make_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    root = tmp_path_factory.mktemp("collectives")
    dataset = make_dataset(root / "ds", {"train": [40, 24], "val": [8]}, num_classes=6, image_size=32)
    env = {**os.environ, **ALLOCATOR_ENV, "TORCH_DISTRIBUTED_DEBUG": "DETAIL", "OMP_NUM_THREADS": "1"}
    # --standalone: a free local rendezvous port. A desynchronised collective raises under DETAIL; the
    # timeout only guards against a hang that it would not catch.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "tests.collective_matrix", dataset, str(root)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    results = [json.loads((root / f"rank-{r}.json").read_text()) if (root / f"rank-{r}.json").exists() else {}
               for r in range(2)]
    return done, results


@pytest.mark.slow
@pytest.mark.parametrize("cell", list(CELLS))
def test_cell_completes_with_same_loss_on_every_rank(matrix, cell):
    done, results = matrix
    assert all(cell in r for r in results), done.stderr[-3000:]
    assert not any("error" in r[cell] for r in results), [r[cell].get("error") for r in results]
    rank0, rank1 = (r[cell]["steps"] for r in results)
    expected_steps = CELLS[cell].get("train.max_steps", 3)
    assert rank0[-1]["step"] == expected_steps and [s["step"] for s in rank0] == [s["step"] for s in rank1]
    for a, b in zip(rank0, rank1):
        assert a.get("loss") == b.get("loss"), (cell, a, b)
        assert a.get("replica_spread", 0.0) == 0.0 and b.get("replica_spread", 0.0) == 0.0, (cell, a, b)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_preempting_one_rank_stops_all_and_resume_is_exact(matrix):
    _, results = matrix
    for r in results:
        events = [s for s in r["resume"]["steps"] if s.get("event") == "preempted"]
        assert events == [{"event": "preempted", "step": 3, "preempted": True}]
        resumed = [s for s in r["resume"]["steps"] if "loss" in s]
        straight = [s for s in r["straight"]["steps"] if "loss" in s]
        assert [s["step"] for s in resumed] == [1, 2, 3, 4]
        assert [s["loss"] for s in resumed] == [s["loss"] for s in straight]
