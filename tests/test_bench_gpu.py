"""bench/gpu.py at toy size on CPU under torchrun with 2 gloo ranks, so the GPU benchmark never rots:
every part runs and reports its figure and ratio (the figures themselves mean nothing on CPU)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_bench_runs_every_part_under_torchrun(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "bench" / "gpu.py"), "--toy", "--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    figures, ratios = result["figures"], result["ratios"]
    assert figures["world_size"] == 2 and figures["device"] == "cpu" and result["toy"]
    assert figures["D_head_rows_per_rank"] == 50  # 100 classes over 2 ranks
    assert "C_host_syncs" not in figures  # counted on CUDA only
    for key in ("B/A", "E/A", "F", "G", "cost_ema", "cost_clip", "cost_mixup", "D_collectives/step"):
        assert math.isfinite(ratios[key]), (key, ratios)
    for key in ("A_eager_img_s", "B_img_s", "B_alone_img_s", "E_loader_img_s", "G_checkpoint_s", "G_eval_s"):
        assert figures[key] > 0, (key, figures)
    assert "B/A" in done.stdout and "E_loader_img_s" in done.stdout
