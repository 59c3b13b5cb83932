"""Detection: COCO ingest with every bad input, the hand-checked COCO metric, the backbone transplant,
and one detector trained end to end through the CLI (resume, evaluate, predict, export) from a tiny
checkpoint made here. timm's test_resnet at 32 px, a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

from cluster.cli import main as cli_main
from cluster.synthetic_detection import detection_classes, write_coco_set
from data_pipeline.dataset import iter_shard, split_shards
from data_pipeline.detection import read_coco_source
from data_pipeline.source import SourceError
from finetune.detection.data import ingest_coco
from finetune.detection.evaluate import coco_metrics
from finetune.detection.model import DetectorSpec, create_detector, load_detector
from pretrain.checkpoint import CheckpointError, create_model_from_checkpoint, load_checkpoint
from tests.conftest import noise_jpeg, solid_jpeg
from tests.test_finetune import ARCH, make_checkpoint


def write_json(path: Path, doc) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(path)


# -- ingest: bad input is recorded, never a crash -------------------------------------------------

def test_coco_ingest_clips_drops_and_records(tmp_path):
    root = tmp_path / "coco"
    (root / "img").mkdir(parents=True)
    (root / "img" / "big.jpg").write_bytes(noise_jpeg(1, 512, 384))      # stored as 341x256
    (root / "img" / "empty.jpg").write_bytes(solid_jpeg(64, 64))
    (root / "img" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "secret.jpg").write_bytes(solid_jpeg(64, 64))
    doc = {"categories": [{"id": 7, "name": "zebra"}, {"id": 3, "name": "apple"}],
           "images": [{"id": 10, "file_name": "img/big.jpg"}, {"id": 11, "file_name": "img/empty.jpg"},
                      {"id": 12, "file_name": "img/missing.jpg"}, {"id": 13, "file_name": "img/broken.jpg"},
                      {"id": 14, "file_name": "../secret.jpg"}],
           "annotations": [
               {"id": 1, "image_id": 10, "category_id": 7, "bbox": [12, 24, 96, 48]},        # kept as is
               {"id": 2, "image_id": 10, "category_id": 3, "bbox": [480, 360, 64, 48]},      # clipped
               {"id": 3, "image_id": 10, "category_id": 3, "bbox": [5, 5, 0, 10]},           # degenerate
               {"id": 4, "image_id": 10, "category_id": 3, "bbox": [600, 10, 20, 20]},       # outside: dropped
               {"id": 5, "image_id": 10, "category_id": 7, "bbox": [0, 0, 300, 300], "iscrowd": 1}]}
    manifest = ingest_coco(write_json(root / "ann.json", doc), str(tmp_path / "ds"))

    assert manifest["task"] == "detection"
    totals = manifest["totals"]["train"]
    assert (totals["rows"], totals["ok"], totals["failed"], totals["skipped"]) == (5, 2, 2, 1)
    assert totals["reasons"]["unsafe_path"] == 1 and sum(totals["reasons"].values()) == 3
    assert manifest["detection"]["train"] == {"boxes": 2, "crowd": 1, "clipped": 1, "degenerate": 2}
    [(shard, _)] = split_shards(str(tmp_path / "ds"), "train")
    samples = {json.loads(s["json"])["image_id"]: (s, json.loads(s["json"])) for s in iter_shard(shard)}
    sample, meta = samples[10]
    assert sample["cls"] == b"-1"
    sx, sy = 341 / 512, 256 / 384  # stored shorter side 256: 512x384 -> 341x256
    # classes sorted by name: apple = 0, zebra = 1
    assert meta["labels"] == [1, 0, 1] and meta["iscrowd"] == [0, 0, 1] and meta["ann_ids"] == [1, 2, 5]
    assert meta["boxes"][0] == pytest.approx([12 * sx, 24 * sy, 108 * sx, 72 * sy], abs=1e-3)
    assert meta["boxes"][1] == pytest.approx([480 * sx, 360 * sy, 512 * sx, 384 * sy], abs=1e-3)
    assert {i["ann_id"]: i["issue"] for i in meta["box_issues"]} == {2: "clipped", 3: "degenerate_dropped",
                                                                      4: "degenerate_dropped"}
    assert samples[11][1]["boxes"] == []  # an image without annotations is a valid negative


@pytest.mark.parametrize("doc, field", [
    ("{not json", "not valid JSON"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": []}, "categories"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1, "name": "a"}],
      "annotations": [{"image_id": 1, "category_id": 2, "bbox": [0, 0, 1, 1]}]}, "annotations[0].category_id"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1, "name": "a"}],
      "annotations": [{"image_id": 9, "category_id": 1, "bbox": [0, 0, 1, 1]}]}, "annotations[0].image_id"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1, "name": "a"}],
      "annotations": [{"image_id": 1, "category_id": 1, "bbox": [0, 0, "w", 1]}]}, "annotations[0].bbox"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}],
      "categories": [{"id": 1, "name": "a"}], "annotations": []}, "images[1].id"),
])
def test_malformed_coco_is_one_error_naming_the_field(tmp_path, doc, field):
    with pytest.raises(SourceError, match=field.replace("[", r"\[").replace("]", r"\]")):
        read_coco_source(write_json(tmp_path / "bad.json", doc))


def test_cli_bad_coco_exits_2_before_work(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    bad = write_json(tmp_path / "a" / "train.json", {"images": [{"id": 1, "file_name": "x.jpg"}],
                                                     "categories": [{"id": 1, "name": "a"}],
                                                     "annotations": [{"image_id": 1, "category_id": 5, "bbox": [0, 0, 2, 2]}]})
    code = cli_main(["finetune", "--task", "detection", "--checkpoint", ckpt, "--train", bad, "--val", bad,
                     "--out", str(tmp_path / "run"), "--no-ray", "--set", f"data.cache_url={tmp_path / 'cache'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "annotations[0].category_id: 5 is not declared" in err[0]
    assert not (tmp_path / "run").exists()


# -- the metric against a hand-checked case --------------------------------------------------------

def test_coco_metrics_hand_checked():
    # class 0: two boxes, one found exactly (0.9), one false positive (0.8), one missed -> recall 0.5 at
    # precision 1: AP = 51/101 at every IoU. A detection on the crowd region (0.95) is ignored, as in COCO.
    # class 1: found with IoU 0.625 -> matched at IoU .50/.55/.60 only: AP 3/10, AP50 1, AP75 0.
    truth = {"boxes": torch.tensor([[0., 0, 10, 10], [20, 20, 30, 30], [40, 40, 60, 60], [0, 30, 10, 40]]),
             "labels": torch.tensor([0, 0, 0, 1]), "iscrowd": torch.tensor([0, 0, 1, 0], dtype=torch.uint8)}
    det = {"boxes": torch.tensor([[0., 0, 10, 10], [45, 0, 55, 10], [40, 40, 60, 60], [0, 30, 10, 36.25]]),
           "scores": torch.tensor([0.9, 0.8, 0.95, 0.7]), "labels": torch.tensor([0, 0, 0, 1])}
    report = coco_metrics([truth], [det], ["a", "b"], image_size=64)
    half = 51 / 101
    assert report["per_class"]["a"]["ap"] == pytest.approx(half, abs=1e-6)
    assert report["per_class"]["b"]["ap"] == pytest.approx(0.3, abs=1e-6)
    assert report["per_class"]["b"]["ap_50"] == pytest.approx(1.0)
    assert report["map"] == pytest.approx((half + 0.3) / 2, abs=1e-6)
    assert report["map_50"] == pytest.approx((half + 1.0) / 2, abs=1e-6)
    assert report["map_75"] == pytest.approx(half / 2, abs=1e-6)
    assert report["num_boxes"] == 3


# -- model: the backbone is the checkpoint's ---------------------------------------------------------

@pytest.mark.parametrize("detector", ["faster_rcnn", "fcos"])
def test_detector_backbone_is_the_checkpoints(tmp_path, detector):
    ckpt = load_checkpoint(make_checkpoint(tmp_path / "c"))
    spec = DetectorSpec(detector, num_classes=2, image_size=32, fpn_channels=32)
    model, spec = create_detector(spec, ckpt.arch, backbone_state=ckpt.state_dict)
    body = model.backbone.body.state_dict()
    assert body and all(torch.equal(v, ckpt.state_dict[k]) for k, v in body.items())
    scratch, _ = create_detector(spec, ckpt.arch)
    first = next(k for k in body if k.endswith("conv1.weight") or k.endswith("conv1.0.weight"))
    assert not torch.equal(scratch.backbone.body.state_dict()[first], ckpt.state_dict[first])
    features = timm.create_model(ARCH, features_only=True, out_indices=spec.out_indices)
    assert set(body) == set(features.state_dict())
    broken = dict(ckpt.state_dict)
    broken.pop("layer2.0.conv1.weight")
    with pytest.raises(CheckpointError, match="layer2.0.conv1.weight"):
        create_detector(spec, ckpt.arch, backbone_state=broken)


# -- end to end through the CLI ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def detection_run(tmp_path_factory):
    """A Faster R-CNN trained 2 steps, then resumed to 4, through `megaclass finetune --task detection`."""
    root = tmp_path_factory.mktemp("det")
    classes = detection_classes(3)
    train = write_coco_set(root / "train", classes, 16, seed=1, size=(48, 48))
    val = write_coco_set(root / "val", classes, 6, seed=2, size=(48, 48))
    ckpt = make_checkpoint(root / "ckpt")
    run = root / "run"
    common = ["finetune", "--task", "detection", "--checkpoint", ckpt, "--train", str(train), "--val", str(val),
              "--out", str(run), "--no-ray", "--set", "data.num_workers=0", "--set", "train.global_batch_size=4",
              "--set", "train.eval_every_steps=2", "--set", "checkpoint.every_steps=2", "--set", "optim.warmup_steps=1",
              "--set", "log.every_steps=1", "--set", "log.tensorboard=false", "--set", "train.patience=0",
              "--set", f"data.cache_url={root / 'cache'}", "--set", "model.fpn_channels=16",
              "--set", "model.score_thresh=0.0"]
    assert cli_main(common + ["--set", "train.max_steps=2"]) == 0
    first = (run / "metrics.jsonl").read_text().splitlines()
    assert cli_main(common + ["--set", "train.max_steps=4"]) == 0  # resumes from step-00000002
    return {"root": root, "run": run, "ckpt": ckpt, "val": str(val), "first_records": len(first)}


@pytest.mark.slow
def test_detection_finetune_resume_and_checkpoint(detection_run):
    run = detection_run["run"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4]
    resumes = [r for r in records if r.get("event") == "resume"]
    assert [r["step"] for r in resumes] == [2]  # the second invocation resumed from step-2, not restarted
    assert sorted(p.name for p in run.glob("step-*")) == ["step-00000002", "step-00000004"]
    assert any("eval_map" in r for r in records[detection_run["first_records"]:])
    final = load_checkpoint(str(run / "final"))
    assert final.task == "detection" and final.megaclass["detector"]["name"] == "faster_rcnn"
    assert final.class_names == sorted(f"{s}-{c}" for s, c in detection_classes(3))
    assert final.megaclass["finetuned_from"]["scratch"] is False
    with pytest.raises(CheckpointError, match="a detection checkpoint"):  # a detector is no classifier
        create_model_from_checkpoint(final)
    with pytest.raises(CheckpointError, match="a classification checkpoint"):  # and the reverse
        load_detector(detection_run["ckpt"])
    model, _, spec = load_detector(str(run / "final"))
    assert spec.image_size == 32 and sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.slow
def test_detection_evaluate_predict_export(detection_run, capsys):
    root, final = detection_run["root"], str(detection_run["run"] / "final")
    assert cli_main(["evaluate", final, detection_run["val"], "--out", str(root / "eval"), "--workers", "0"]) == 0
    report = json.loads((root / "eval" / "report.json").read_text())
    assert {"map", "map_50", "map_75", "per_class"} <= set(report) and 0.0 <= report["map"] <= report["map_50"] <= 1.0
    assert set(report["per_class"]) == set(load_checkpoint(final).class_names) and report["num_images"] == 6
    assert (root / "eval" / "predictions.png").read_bytes()[:4] == b"\x89PNG"

    capsys.readouterr()
    images = sorted((root / "val" / "images").glob("*.jpg"))[:2]
    (root / "junk.jpg").write_bytes(b"not an image")
    code = cli_main(["predict", final, *map(str, images), str(root / "junk.jpg"), "--out", str(root / "pred"),
                     "--min-score", "0"])
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert code == 1 and len(lines) == 3 and "not an image" in lines[2]["error"]
    assert lines[0]["width"] == 48 and lines[0]["detections"]
    det = lines[0]["detections"][0]
    assert det["label"] in load_checkpoint(final).class_names and 0 <= det["box"][0] <= det["box"][2] <= 48
    assert len(list((root / "pred").glob("*.png"))) == 2

    assert cli_main(["export", final, "--onnx", str(root / "det.onnx")]) == 0
    out = capsys.readouterr().out
    assert "parity vs PyTorch" in out and (root / "det.onnx").stat().st_size > 0
    assert "; 0 detections compared" not in out  # score_thresh 0: the parity check compared real boxes
