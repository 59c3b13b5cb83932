"""The run dir's metrics log: local append, remote pieces, records past a resume dropped, TensorBoard synced."""

from __future__ import annotations

import json

import fsspec
import pytest

from pretrain.rundir import EVAL_TOP1, LOSS, METRICS_FILE, METRICS_PARTS_DIR, TENSORBOARD_DIR, RunDir, read_metrics


def _steps(url: str) -> list[int]:
    return [r["step"] for r in read_metrics(url)]


@pytest.mark.parametrize("where", ["local", "memory"])
def test_resume_drops_records_past_the_resumed_step(tmp_path, where):
    url = str(tmp_path / "run") if where == "local" else f"memory://rundir-{tmp_path.name}/run"
    run = RunDir(url, is_main=True, tensorboard=False, piece_records=2)
    for step in range(1, 6):
        run.log(step, {LOSS: 1.0 / step})
    # the run dies here (no close); a new one resumes from the checkpoint of step 3
    assert _steps(url) == [1, 2, 3, 4, 5]
    run = RunDir(url, is_main=True, start_step=3, tensorboard=False, piece_records=2)
    run.log(4, {LOSS: 0.2, EVAL_TOP1: 0.5})
    run.close()
    assert _steps(url) == [1, 2, 3, 4]
    assert read_metrics(url)[-1][EVAL_TOP1] == 0.5


def test_remote_run_writes_bounded_pieces_then_one_file(tmp_path):
    url = f"memory://rundir-{tmp_path.name}/run"
    fs = fsspec.filesystem("memory")
    run = RunDir(url, is_main=True, tensorboard=True, piece_records=2, tensorboard_sync_s=0.0)
    for step in range(1, 6):
        run.log(step, {LOSS: 1.0 / step})
    parts = sorted(fs.ls(f"{url}/{METRICS_PARTS_DIR}", detail=False))
    sizes = [len(fs.cat_file(p).decode().splitlines()) for p in parts]
    assert sizes == [2, 2, 1] and not fs.exists(f"{url}/{METRICS_FILE}")  # no whole-file rewrite per log
    assert fs.ls(f"{url}/{TENSORBOARD_DIR}", detail=False)  # events synced while running, not skipped
    run.close()
    assert not fs.exists(f"{url}/{METRICS_PARTS_DIR}") or not fs.ls(f"{url}/{METRICS_PARTS_DIR}")
    joined = [json.loads(line) for line in fs.cat_file(f"{url}/{METRICS_FILE}").decode().splitlines()]
    assert [r["step"] for r in joined] == [1, 2, 3, 4, 5]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    local = tmp_path / "tb"
    fs.get(f"{url}/{TENSORBOARD_DIR}/", str(local), recursive=True)
    events = EventAccumulator(str(local))
    events.Reload()
    assert [e.step for e in events.Scalars(LOSS)] == [1, 2, 3, 4, 5]


def test_only_rank_zero_writes(tmp_path):
    run = RunDir(str(tmp_path / "run"), is_main=False, tensorboard=True)
    run.log(1, {LOSS: 1.0})
    run.write_config({"a": 1})
    run.close()
    assert not (tmp_path / "run").exists()
