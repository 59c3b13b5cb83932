"""Run by tests/test_detection_ranks.py under torchrun (2 gloo ranks): a detection fine-tune in which
every rank records, per step, the image keys of its batch, its loss and a digest of its weights.

    python -m torch.distributed.run --standalone --nproc-per-node=2 tests/detection_ranks.py OUT --set k=v ...

Writes OUT/rank-R.json: world_size, the run's summary as this rank returned it, and the steps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path

from data_pipeline.config import load_config
from finetune.detection import train as detection_train
from finetune.detection.config import DetectionConfig
from pretrain.dist import cleanup, init_distributed


def weights_digest(model) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def main(out_dir: str, overrides: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank %(process)d %(name)s: %(message)s")
    dist = init_distributed("gloo", use_gpu=False)
    steps = []
    train_step = detection_train.train_step

    def recording_train_step(model, optimizer, batch, **kwargs):
        losses = train_step(model, optimizer, batch, **kwargs)
        steps.append({"keys": list(batch.keys), "loss": losses["loss"], "weights": weights_digest(model)})
        return losses

    detection_train.train_step = recording_train_step
    summary = detection_train.finetune_detection(load_config(DetectionConfig, None, overrides), dist=dist)
    record = {"world_size": dist.world_size, "summary": summary, "steps": steps}
    Path(out_dir, f"rank-{dist.rank}.json").write_text(json.dumps(record))
    cleanup(dist)


if __name__ == "__main__":
    main(sys.argv[1], [a for flag, a in zip(sys.argv[2::2], sys.argv[3::2]) if flag == "--set"])
