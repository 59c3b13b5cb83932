"""The detection side of `megaclass finetune/evaluate/predict/export` (not a subcommand of its own).

finetune dispatches here on `--task detection`; evaluate, predict and export dispatch on the
checkpoint's `megaclass.task`, so the same commands serve classifiers and detectors. Mixing a
classifier with detection data (or the reverse) is one error line that names both sides.
"""

from __future__ import annotations

import argparse
import json

from cluster.commands import check_local_gpus
from data_pipeline.config import from_dict, merge, to_dict
from data_pipeline.dataset import DatasetError


def checkpoint_task(url: str) -> str:
    """'classification' or 'detection', from a verified checkpoint's config.json."""
    from pretrain.checkpoint import verify_checkpoint

    return str(verify_checkpoint(url)["megaclass"].get("task", "classification"))


def is_detection_data(url: str) -> bool:
    """A COCO JSON, or a dataset whose manifest says task: detection."""
    import fsspec

    from data_pipeline.dataset import MANIFEST_FILE, exists, join
    from data_pipeline.detection import TASK, dataset_task, is_coco_json

    fs, path = fsspec.core.url_to_fs(url)
    if fs.isfile(path):
        return is_coco_json(url)
    return exists(join(url, MANIFEST_FILE)) and dataset_task(url) == TASK


def reject_detection_data(url: str, what: str) -> None:
    """For classification commands: detection data is one clear error rather than a confusing one later."""
    if url and is_detection_data(url):
        raise DatasetError(f"{what} {url}: detection data (COCO boxes); classification needs class-labelled "
                           "data, or use --task detection")


def build_detection_config(args: argparse.Namespace):
    from cluster.commands import config_from_args
    from cluster.commands.finetune import FLAGS
    from finetune.detection.config import DetectionConfig

    return config_from_args(DetectionConfig, args, FLAGS, {"scaling.num_workers": 1 if args.no_ray else None})


def run_finetune(args: argparse.Namespace, resolve_model_uri) -> int:
    from finetune.detection.train import check_detection_inputs, finetune_detection

    cfg = build_detection_config(args)
    cfg.check_runnable()
    check_local_gpus(cfg.scaling, args.ray_address)
    resolved = {"finetune": {"checkpoint_url": resolve_model_uri(cfg.finetune.checkpoint_url, args.registry, args.trust),
                             "source_uri": cfg.finetune.source_uri or cfg.finetune.checkpoint_url}}
    cfg = from_dict(type(cfg), merge(to_dict(cfg), resolved))
    # Ingest COCO JSON here, once: workers receive dataset URLs; bad input fails in one line, before Ray.
    data = check_detection_inputs(cfg)
    cfg = from_dict(type(cfg), merge(to_dict(cfg), {"data": {"url": data.train_url,
                                                             "val_url": data.val_url if cfg.data.val_url else ""}}))
    if args.no_ray:
        summary = finetune_detection(cfg)
    else:
        from cluster.runtime import ray_session, run_torch_trainer

        with ray_session(args.ray_address):
            summary = run_torch_trainer("finetune.detection.train:finetune_detection_from_dict", to_dict(cfg),
                                        num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                        max_failures=cfg.scaling.max_failures, storage_url=cfg.checkpoint.url,
                                        name="ray", cpus_per_worker=cfg.scaling.cpus_per_worker)
    final = summary.get("final_url", cfg.checkpoint.url.rstrip("/") + "/final")
    best = summary.get("best_map")
    print(f"final model: {final}" + (f" (val mAP {best:.4f})" if isinstance(best, float) else ""))
    return 0


def run_evaluate(args: argparse.Namespace, model_url: str) -> int:
    from finetune.detection.evaluate import evaluate_detection, format_detection_report

    report = evaluate_detection(model_url, args.data, split=args.split, out_dir=args.out,
                                batch_size=args.batch_size, num_workers=args.workers)
    print(json.dumps(report, indent=2) if args.json else format_detection_report(report))
    if args.out:
        print(f"report: {args.out.rstrip('/')}/report.json")
    return 0


def run_predict(args: argparse.Namespace, model_url: str) -> int:
    from finetune.detection.predict import predict_detection

    results = predict_detection(model_url, args.images, out_dir=args.out, min_score=args.min_score)
    print("\n".join(json.dumps(r) for r in results))
    return 1 if any("error" in r for r in results) else 0


def run_export(args: argparse.Namespace, model_url: str) -> int:
    from finetune.detection.export import export_detector_onnx

    report = export_detector_onnx(model_url, args.onnx)
    print(f"wrote {report['onnx']} ({report['detector']}, input one image {report['input_size']} in 0..1); parity vs "
          f"PyTorch on {report['parity_images']} images: outputs before post-processing within "
          f"{report['max_raw_diff']:.3g}; {report['compared_detections']} detections compared, max abs box diff "
          f"{report['max_abs_box_diff']:.3g} px, score diff {report['max_abs_score_diff']:.3g}; "
          f"{report['tied_detections']} tied at the score threshold or the detections_per_image cut, not compared")
    return 0
