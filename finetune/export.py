"""Export a checkpoint to ONNX and check it against PyTorch with onnxruntime.

    megaclass export MODEL --onnx OUT.onnx          (OUT: a local path or any fsspec URL, e.g. s3://b/m.onnx)

Uses torch's default exporter (torch.export based since torch 2.9; it needs onnxscript) with a
dynamic batch dimension, then runs the same random batch through PyTorch and onnxruntime on CPU
and reports the max abs difference of the logits; above `tolerance` the export fails.

The model's preprocessing travels with it: the ONNX file's metadata_props hold
`megaclass.preprocessing` (input_size, mean, std, interpolation, crop_pct from the checkpoint's
pretrained_cfg: what evaluation uses) and `megaclass.train_augmentation` (the data.* augmentation
the weights were trained with), both JSON; the report returns them too.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import fsspec
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem

from finetune.evaluate import preprocessing
from finetune.model import load_model

log = logging.getLogger(__name__)
PARITY_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """The ONNX file could not be produced or disagrees with PyTorch."""


def export_onnx(model_url: str, onnx_path: str, *, image_size: int = 0, parity_batch: int = 3,
                tolerance: float = PARITY_TOLERANCE, seed: int = 0) -> dict:
    """Write `onnx_path` (input 'input' float NCHW normalized, output 'logits'); returns the parity report."""
    import onnxruntime as ort

    model, ckpt = load_model(model_url)
    size, _, _, _ = preprocessing(ckpt.pretrained_cfg, image_size)
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    fs, out = fsspec.core.url_to_fs(str(onnx_path))
    local = isinstance(fs, LocalFileSystem)
    # Built and checked in a temp dir beside a local target (the final rename is atomic) or in the
    # system temp dir for any other URL (one upload of a checked file; an object PUT is atomic).
    if local:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=str(Path(out).parent) if local else None, prefix=".onnx-") as tmp:
        staged = Path(tmp) / Path(out).name
        torch.onnx.export(model, (example,), str(staged), input_names=["input"], output_names=["logits"],
                          dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}},
                          dynamo=True, external_data=False, verbose=False)
        preproc = export_preprocessing(ckpt, size)
        _add_metadata(staged, {"megaclass.preprocessing": json.dumps(preproc["preprocessing"], sort_keys=True),
                               "megaclass.train_augmentation": json.dumps(preproc["train_augmentation"],
                                                                          sort_keys=True)})
        # A batch size other than the traced one also checks that the batch dimension is really dynamic.
        x = torch.randn(parity_batch, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
        with torch.no_grad():
            expected = model(x).numpy()
        session = ort.InferenceSession(str(staged), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        max_abs_diff = float(np.abs(got - expected).max())
        if max_abs_diff < tolerance:  # a model that fails the check is never written to the target
            if local:
                os.replace(staged, out)
            else:
                fs.put_file(str(staged), out)
    out = str(onnx_path)
    report = {"onnx": str(out), "arch": ckpt.arch, "num_classes": len(ckpt.class_names),
              "input_size": [3, size, size], "mean": list(ckpt.pretrained_cfg.get("mean", ())),
              "std": list(ckpt.pretrained_cfg.get("std", ())), "parity_batch": parity_batch,
              "max_abs_diff": max_abs_diff, "tolerance": tolerance, "ok": max_abs_diff < tolerance, **preproc}
    if not report["ok"]:
        raise ExportError(f"{out}: ONNX logits differ from PyTorch by {max_abs_diff:.3g} (tolerance {tolerance:g}); "
                          "nothing written")
    return report


def export_preprocessing(ckpt, size: int) -> dict:
    """What a consumer of the exported model must do to an image, and how the weights were trained."""
    cfg = ckpt.pretrained_cfg
    preprocessing = {"input_size": [3, size, size], "mean": list(cfg.get("mean", ())), "std": list(cfg.get("std", ())),
                     "interpolation": cfg.get("interpolation", "bilinear"), "crop_pct": cfg.get("crop_pct", 0.875),
                     "crop_mode": cfg.get("crop_mode", "center")}
    augmentation = ckpt.megaclass.get("augmentation") or {}
    return {"preprocessing": preprocessing, "train_augmentation": augmentation}


def _add_metadata(path: Path, props: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
