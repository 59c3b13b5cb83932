"""The report of `megaclass simulate`: read back from the artifacts each stage wrote.

Numbers come from the files a user would look at (manifest.json, metrics.jsonl, the evaluation
report), not from the simulation's own bookkeeping, so the report checks the artifacts too.
"""

from __future__ import annotations

import json
import posixpath
from typing import TYPE_CHECKING

import fsspec

from pretrain.rundir import EVAL_TOP1, EVENT, IMAGES_PER_S, LOSS, STEP, read_metrics

if TYPE_CHECKING:
    from cluster.simulate import Simulation

DETECTION_ARTIFACTS = ("detection", "detector", "detection_evaluation")  # listed only with --detection


def _join(base, *parts: str) -> str:
    """A path or URL under `base` (a local Path or an s3:// URL: the simulation's stores)."""
    return posixpath.join(str(base), *parts)


def _read_text(url: str) -> str | None:
    fs, path = fsspec.core.url_to_fs(url, skip_instance_cache=True)  # written by other processes just now
    return fs.cat_file(path).decode() if fs.exists(path) else None


def _last(records: list[dict], key: str):
    for record in reversed(records):
        if record.get(key) is not None:
            return record[key]
    return None


def _ingest(sim: "Simulation", seconds: float) -> dict:
    manifest = json.loads(_read_text(_join(sim.paths["dataset"], "manifest.json")))
    totals = manifest["totals"]
    rows = sum(t["rows"] for t in totals.values())
    ok = sum(t["ok"] for t in totals.values())
    reasons: dict[str, int] = {}
    for t in totals.values():
        for reason, count in t["reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + count
    return {
        "rows_in": rows, "ok": ok,
        "failed": sum(t["failed"] for t in totals.values()),
        "skipped": sum(t["skipped"] for t in totals.values()),
        "reasons": reasons,
        "balanced": all(t["ok"] + t["failed"] + t["skipped"] == t["rows"] for t in totals.values()),
        "images_per_s": round(ok / seconds, 1),
        "shards": sum(len(s["shards"]) for s in manifest["splits"].values()),
    }


def _training(run_dir) -> dict:
    records = read_metrics(str(run_dir))
    steps = [r for r in records if LOSS in r]
    config = json.loads(_read_text(_join(run_dir, "final", "config.json")) or "{}")
    block = config.get("megaclass", {})
    return {
        "final_step": block.get("step", _last(steps, STEP)),
        "max_steps": (block.get("training_config") or block.get("config") or {}).get("train", {}).get("max_steps"),
        "loss_first": steps[0][LOSS] if steps else None,
        "loss_last": _last(steps, LOSS),
        "top1": _last(records, EVAL_TOP1),
        "images_per_s": _last(records, IMAGES_PER_S),
        "resumes": [r for r in records if r.get(EVENT) == "resume"],
    }


def build_report(sim: "Simulation", total_s: float) -> dict:
    stages = {s.name: s for s in sim.stages}
    ingest = _ingest(sim, stages["ingest"].seconds)
    pretrain = _training(sim.paths["run"])
    finetune = _training(sim.paths["finetune"])
    evaluation = json.loads(_read_text(_join(sim.paths["evaluation"], "report.json")))
    scratch_text = _read_text(_join(sim.paths["evaluation-scratch"], "report.json"))
    scratch_top1 = json.loads(scratch_text).get("top1") if scratch_text else None
    report = {
        "seconds": {name: round(s.seconds, 1) for name, s in stages.items()} | {"total": round(total_s, 1)},
        "ingest": ingest,
        "pretrain": pretrain,
        "finetune": finetune,
        "downstream": {"top1": evaluation.get("top1"), "top5": evaluation.get("top5"),
                       "num_samples": evaluation.get("num_samples"), "scratch_top1": scratch_top1,
                       "gain_points": None if scratch_top1 is None or evaluation.get("top1") is None
                       else round(100 * (evaluation["top1"] - scratch_top1), 1)},
        "artifacts": {name: str(path) for name, path in sim.paths.items()
                      if sim.cfg.detection or name not in DETECTION_ARTIFACTS}
        | {"published": _join(sim.paths["registry"], "sim-backbone"),
           "logs": str(sim.workdir / "logs")},
        "chaos": {name: s.details["chaos"] for name, s in stages.items() if "chaos" in s.details},
    }
    if "evaluate-detection" in stages:
        det = json.loads((sim.paths["detection_evaluation"] / "report.json").read_text())
        report["detection"] = {"map": det.get("map"), "map_50": det.get("map_50"), "map_75": det.get("map_75"),
                               "num_images": det.get("num_images"), "detector": det.get("detector"),
                               "final_step": _training(sim.paths["detector"])["final_step"]}
    checks = {
        "rows balance (ok + failed + skipped == rows)": ingest["balanced"] and ingest["rows_in"] == stages["ingest"].details.get("rows"),
        "pretraining reached its final step": pretrain["final_step"] is not None
        and (pretrain["max_steps"] in (None, 0) or pretrain["final_step"] >= pretrain["max_steps"]),
        "downstream model evaluated": report["downstream"]["top1"] is not None,
        "scratch baseline evaluated (same budget)": report["downstream"]["scratch_top1"] is not None,
    }
    if "detection" in report:
        checks["detector trained and evaluated (COCO mAP reported)"] = report["detection"]["map"] is not None
    if report["chaos"]:
        killed = {name: bool(c["killed"]) for name, c in report["chaos"].items()}
        what = "the second Ray node" if sim.cfg.nodes > 1 else "an ingestion worker"
        checks[f"chaos: {what} was killed and ingestion retried its tasks"] = killed.get("ingest", False) \
            and ingest["balanced"]
        what = "the second Ray node" if sim.cfg.nodes > 1 else "a training worker"
        checks[f"chaos: {what} was killed and the run resumed"] = killed.get("pretrain", False) \
            and bool(pretrain["resumes"])
    report["checks"] = checks
    report["ok"] = all(checks.values())
    return report


def _fmt(value, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


def format_report(report: dict) -> str:
    ing, pre, fin, down = report["ingest"], report["pretrain"], report["finetune"], report["downstream"]
    secs = report["seconds"]
    lines = [
        "== megaclass simulation report ==",
        f"{'stage':<10}{'seconds':>9}  what happened",
        f"{'ingest':<10}{secs.get('ingest', 0):>9.1f}  rows in {ing['rows_in']}: ok {ing['ok']}, failed {ing['failed']}, "
        f"skipped {ing['skipped']} in {ing['shards']} shards; {ing['images_per_s']} images/s end to end",
        f"{'':<21}reasons: " + (", ".join(f"{k} {v}" for k, v in sorted(ing["reasons"].items())) or "none"),
        f"{'pretrain':<10}{secs.get('pretrain', 0):>9.1f}  step {_fmt(pre['final_step'])}/{_fmt(pre['max_steps'])}, "
        f"loss {_fmt(pre['loss_first'], '.3f')} -> {_fmt(pre['loss_last'], '.3f')}, "
        f"upstream held-out top-1 {_fmt(pre['top1'], '.3f')}, {_fmt(pre['images_per_s'], '.1f')} images/s",
        f"{'publish':<10}{secs.get('publish', 0):>9.1f}  {report['artifacts']['published']}",
        f"{'finetune':<10}{secs.get('finetune', 0):>9.1f}  step {_fmt(fin['final_step'])}, "
        f"{_fmt(fin['images_per_s'], '.1f')} images/s",
        f"{'evaluate':<10}{secs.get('evaluate', 0):>9.1f}  downstream top-1 {_fmt(down['top1'], '.3f')}, "
        f"top-5 {_fmt(down['top5'], '.3f')} on {_fmt(down['num_samples'])} images",
        f"{'':<21}from scratch (--scratch, same budget): top-1 {_fmt(down['scratch_top1'], '.3f')}; "
        f"gain from the pretrained backbone {_fmt(down['gain_points'], '+.1f')} points",
    ]
    if "detection" in report:
        det = report["detection"]
        lines.append(f"{'detection':<10}{secs.get('detection', 0) + secs.get('evaluate-detection', 0):>9.1f}  "
                     f"{det['detector']} step {_fmt(det['final_step'])}: mAP {_fmt(det['map'], '.3f')}, "
                     f"mAP@.5 {_fmt(det['map_50'], '.3f')} on {_fmt(det['num_images'])} images")
    lines.append(f"{'total':<10}{secs['total']:>9.1f}")
    for name, chaos in report["chaos"].items():
        for kill in chaos["killed"]:
            lines.append(f"chaos: {name}: SIGKILL pid {kill['pid']} ({kill['process']}) at {kill['at_s']} s"
                         + (f", back after {kill['restarted_after_s']} s" if "restarted_after_s" in kill else ""))
        if not chaos["killed"]:
            lines.append(f"chaos: {name}: no process matching {chaos['pattern']!r} was found to kill")
    for resume in pre["resumes"]:
        lines.append(f"chaos: pretrain resumed from step {resume.get('step')} ({resume.get('checkpoint', '')})")
    lines.append("artifacts:")
    width = max((len(name) for name in report["artifacts"]), default=0) + 2
    lines.extend(f"  {name:<{width}}{path}" for name, path in report["artifacts"].items())
    lines.append("checks:")
    lines.extend(f"  [{'ok' if passed else 'FAILED'}] {name}" for name, passed in report["checks"].items())
    return "\n".join(lines)
