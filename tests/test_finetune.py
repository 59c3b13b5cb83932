"""Fine-tuning end to end from a tiny checkpoint made here: model surgery, each mode, resume, early
stopping, evaluate, predict, ONNX parity, and the CLI. timm's test_resnet at 32 px, a few steps each."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch

from cluster.cli import main as cli_main
from cluster.synthetic import split_classes, write_image_folder
from data_pipeline.config import load_config
from finetune.config import FinetuneConfig
from finetune.model import backbone_mismatches, classifier_name, create_finetune_model, set_backbone_frozen, set_train_mode
from pretrain.checkpoint import load_checkpoint, save_checkpoint
from pretrain.rundir import read_metrics
from tests.conftest import noise_jpeg
from tests.dataset_factory import make_dataset

ARCH = "test_resnet"
PRETRAINED_CFG = {"input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                  "interpolation": "bilinear", "crop_pct": 1.0}


def make_checkpoint(url: str | Path, num_classes: int = 5, arch: str = ARCH, seed: int = 0) -> str:
    """A contract-2 checkpoint of a randomly initialised model whose BN statistics are not the defaults."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # non-trivial buffers, so a copy is checkable
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.9, 1.1)
    names = [f"up{i:04d}" for i in range(num_classes)]
    return save_checkpoint(str(url), state_dict=model.state_dict(), arch=arch, num_classes=num_classes,
                           class_names=names, pretrained_cfg=PRETRAINED_CFG,
                           megaclass={"step": 10, "epoch": 1, "metrics": {}})


def make_downstream(root: Path, num_classes: int = 3) -> str:
    return make_dataset(root, {"train": [24, 24], "val": [12]}, num_classes=num_classes, image_size=32)


def make_config(ckpt: str, data: str, run: Path, *overrides: str) -> FinetuneConfig:
    base = [f"finetune.checkpoint_url={ckpt}", f"data.url={data}", f"checkpoint.url={run}",
            "data.num_workers=0", "train.global_batch_size=8", "train.max_steps=4", "train.eval_every_steps=2",
            "optim.warmup_steps=1", "log.every_steps=1", "log.tensorboard=false", "train.patience=0",
            f"data.cache_url={run.parent / 'cache'}"]
    return load_config(FinetuneConfig, None, base + list(overrides))


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    return make_checkpoint(tmp_path_factory.mktemp("src") / "ckpt", num_classes=5)


@pytest.fixture(scope="module")
def downstream(tmp_path_factory) -> str:
    return make_downstream(tmp_path_factory.mktemp("ds") / "data")


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, source, downstream) -> tuple[str, dict]:
    """One full fine-tune shared by the evaluate/predict/export tests."""
    from finetune.train import finetune

    run = tmp_path_factory.mktemp("run") / "ft"
    # non-default preprocessing, which evaluate/predict/export must take from the checkpoint
    summary = finetune(make_config(source, downstream, run, "data.crop_pct=0.9", "data.interpolation=bicubic",
                                   "data.hflip=0", "data.vflip=0.5", "data.color_jitter=0.3"))
    return str(run), summary


# -- model surgery ---------------------------------------------------------------------------------

@pytest.mark.parametrize("upstream_classes, downstream_classes", [(5, 3), (1000, 1000), (3, 7)])
def test_new_head_and_exact_backbone(tmp_path, upstream_classes, downstream_classes):
    ckpt = load_checkpoint(make_checkpoint(tmp_path / "c", num_classes=upstream_classes))
    model = create_finetune_model(ckpt, downstream_classes, seed=1)
    head = classifier_name(model)
    assert model.get_classifier().out_features == downstream_classes
    assert backbone_mismatches(model, ckpt) == []
    state = model.state_dict()
    backbone_keys = [k for k in state if not k.startswith(head + ".")]
    assert any("running_mean" in k for k in backbone_keys)
    for key in backbone_keys:  # every weight and BN buffer, bit for bit
        assert torch.equal(state[key], ckpt.state_dict[key]), key
    if upstream_classes == downstream_classes:  # same shape: the old head must still be gone
        assert not torch.equal(state[f"{head}.weight"], ckpt.state_dict[f"{head}.weight"])


def test_frozen_backbone_keeps_bn_in_eval(tmp_path):
    model = create_finetune_model(load_checkpoint(make_checkpoint(tmp_path / "c")), 3)
    set_backbone_frozen(model, True)
    set_train_mode(model, backbone_frozen=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert model.get_classifier().training


# -- training --------------------------------------------------------------------------------------

def test_full_finetune_writes_loadable_final(finetuned):
    run, summary = finetuned
    assert summary["steps"] == 4
    final = load_checkpoint(summary["final_url"])
    assert final.class_names == [f"class{i:05d}" for i in range(3)] and final.num_classes == 3
    assert final.megaclass["kind"] == "finetune" and final.megaclass["selected_step"] == summary["best_step"]
    assert final.megaclass["metrics"]["eval_top1"] == summary["best_top1"]
    # final/ is the best model, bit for bit
    best = load_checkpoint(str(Path(run) / "best"))
    assert all(torch.equal(best.state_dict[k], v) for k, v in final.state_dict.items())
    model = timm.create_model(f"local-dir:{summary['final_url']}", pretrained=True)
    assert model.get_classifier().out_features == 3
    assert all(torch.equal(model.state_dict()[k], v) for k, v in final.state_dict.items())
    records = read_metrics(run)
    evals = [(r["step"], r["eval_top1"]) for r in records if "eval_top1" in r]
    assert [step for step, _ in evals] == [2, 4]
    peak, selected = -1.0, None  # the latest step within one standard error of the highest so far
    for step, top1 in evals:
        if top1 >= peak or peak - top1 <= math.sqrt(peak * (1 - peak) / summary["num_val_samples"]):
            selected = (step, top1)
        peak = max(peak, top1)
    assert (summary["best_step"], summary["best_top1"]) == selected
    assert any("loss" in r and r["lr"] > 0 for r in records)
    assert (Path(run) / "config.yaml").exists()


def test_linear_probe_leaves_backbone_untouched(tmp_path, source, downstream):
    from finetune.train import finetune

    summary = finetune(make_config(source, downstream, tmp_path / "run", "finetune.mode=linear"))
    src, final = load_checkpoint(source), load_checkpoint(summary["final_url"])
    changed = [k for k, v in final.state_dict.items() if not k.startswith("fc.") and not torch.equal(v, src.state_dict[k])]
    assert changed == []  # weights and BN running statistics frozen
    assert not torch.equal(final.state_dict["fc.weight"], create_finetune_model(src, 3).fc.weight.detach())


def test_lp_ft_runs_both_phases(tmp_path, source, downstream):
    from finetune.train import finetune

    run = tmp_path / "run"
    finetune(make_config(source, downstream, run, "finetune.mode=lp-ft", "finetune.lp_steps=2", "train.max_steps=5",
                         "train.eval_every_steps=0", "checkpoint.every_steps=1", "checkpoint.keep=5"))
    phases = [(r["step"], r["phase"]) for r in read_metrics(str(run)) if "loss" in r]
    assert phases == [(1, "linear"), (2, "linear"), (3, "full"), (4, "full"), (5, "full")]
    src = load_checkpoint(source).state_dict

    def backbone_moved(step: int) -> bool:
        state = load_checkpoint(str(run / f"step-{step:08d}")).state_dict
        return any(not torch.equal(v, src[k]) for k, v in state.items() if not k.startswith("fc."))
    assert not backbone_moved(2) and backbone_moved(5)  # frozen in the probe, trained in the full phase


def test_early_stopping_on_flat_val_top1(tmp_path, source, downstream):
    from finetune.train import finetune

    # A vanishing learning rate keeps val top-1 flat, so patience 1 stops at the second validation,
    # which is selected: of equal steps, the later one.
    summary = finetune(make_config(source, downstream, tmp_path / "run", "finetune.mode=linear", "train.patience=1",
                                   "train.max_steps=20", "train.eval_every_steps=1", "finetune.lp_lr=1e-12",
                                   "optim.min_lr=0", "optim.warmup_steps=0"))
    assert summary["stopped_early"] and summary["steps"] == 2 and summary["best_step"] == 2


def test_resume_after_a_crash(tmp_path, source, downstream):
    from finetune.train import finetune

    run = tmp_path / "run"
    overrides = ("train.max_steps=6", "train.eval_every_steps=1", "checkpoint.every_steps=2", "checkpoint.keep=1")

    def crash(metrics):
        if metrics["step"] == 3:
            raise RuntimeError("worker lost")
    with pytest.raises(RuntimeError, match="worker lost"):
        finetune(make_config(source, downstream, run, *overrides), report=crash)
    assert sorted(p.name for p in run.glob("step-*")) == ["step-00000002"]
    seen = []
    summary = finetune(make_config(source, downstream, run, *overrides), report=seen.append)
    assert [m["step"] for m in seen] == [3, 4, 5, 6] and summary["steps"] == 6
    assert sorted(p.name for p in run.glob("step-*")) == ["step-00000006"]


def test_bf16_channels_last_mixup(tmp_path, source, downstream, monkeypatch):
    import finetune.train as ft

    seen = {"output_dtype": set(), "channels_last": set(), "target_dims": set()}
    create_model, create_criterion = ft.create_finetune_model, ft.create_criterion_and_mixup

    def spy_model(*args, **kwargs):  # what the training forward passes actually get
        model = create_model(*args, **kwargs)

        def pre(module, inputs):
            if module.training:
                seen["channels_last"].add(inputs[0].is_contiguous(memory_format=torch.channels_last))

        def post(module, inputs, output):
            if module.training:
                seen["output_dtype"].add(output.dtype)
        model.register_forward_pre_hook(pre)
        model.register_forward_hook(post)
        return model

    def spy_criterion(*args, **kwargs):
        criterion, mixup = create_criterion(*args, **kwargs)

        def loss(logits, targets):
            seen["target_dims"].add(targets.dim())  # mixed targets are soft: [B, C]
            return criterion(logits, targets)
        return loss, mixup
    monkeypatch.setattr(ft, "create_finetune_model", spy_model)
    monkeypatch.setattr(ft, "create_criterion_and_mixup", spy_criterion)
    summary = ft.finetune(make_config(source, downstream, tmp_path / "run", "train.precision=bf16",
                                      "train.channels_last=true", "loss.mixup=0.2", "loss.cutmix=1.0",
                                      "train.max_steps=2"))
    assert summary["steps"] == 2 and load_checkpoint(summary["final_url"]).num_classes == 3
    assert seen == {"output_dtype": {torch.bfloat16}, "channels_last": {True}, "target_dims": {2}}


# -- evaluate, predict, export ----------------------------------------------------------------------

def test_evaluate_report_on_renumbered_image_folder(tmp_path, finetuned):
    from finetune.evaluate import evaluate

    _, summary = finetuned
    # An image folder with two of the three classes: ids differ from the model's, names match.
    folder = tmp_path / "folder"
    for name in ("class00002", "class00000"):
        (folder / name).mkdir(parents=True)
        for i in range(3):
            (folder / name / f"{i}.jpg").write_bytes(noise_jpeg(i, 40, 32))
    report = evaluate(summary["final_url"], str(folder), out_dir=str(tmp_path / "eval"), num_workers=0,
                      cache_url=str(tmp_path / "cache"))
    assert report["num_samples"] == 6 and report["top5"] == 1.0  # 3 classes: top-5 is all
    assert report["top1"] == sum(v["correct"] for v in report["per_class"].values()) / 6
    assert report["title"] == "folder" and report["split"] == "train"  # titled by what was evaluated
    assert set(report["per_class"]) == {"class00000", "class00002"}
    assert sum(v["count"] for v in report["per_class"].values()) == 6
    saved = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert saved["top1"] == report["top1"]
    assert (tmp_path / "eval" / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_top_k(tmp_path, finetuned):
    from finetune.predict import predict

    _, summary = finetuned
    good = tmp_path / "a.jpg"
    good.write_bytes(noise_jpeg(7, 40, 32))
    bad = tmp_path / "b.jpg"
    bad.write_bytes(b"not an image")
    results = predict(summary["final_url"], [str(good), str(bad)], k=2)
    assert len(results[0]["top"]) == 2 and results[0]["top"][0]["prob"] >= results[0]["top"][1]["prob"]
    assert {t["label"] for t in results[0]["top"]} <= {"class00000", "class00001", "class00002"}
    assert "cannot read image" in results[1]["error"]


def test_export_onnx_parity_via_cli(tmp_path, finetuned, capsys):
    _, summary = finetuned
    out = tmp_path / "m.onnx"
    assert cli_main(["export", summary["final_url"], "--onnx", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.stat().st_size > 1000 and "max abs logits diff" in printed
    diff = float(printed.split("max abs logits diff ")[1].split()[0])
    assert diff < 1e-4
    import onnx

    meta = {p.key: json.loads(p.value) for p in onnx.load(str(out), load_external_data=False).metadata_props}
    pre, aug = meta["megaclass.preprocessing"], meta["megaclass.train_augmentation"]
    assert pre["crop_pct"] == 0.9 and pre["interpolation"] == "bicubic" and pre["input_size"] == [3, 32, 32]
    assert pre["mean"] == [0.5, 0.5, 0.5] and pre["std"] == [0.25, 0.25, 0.25]
    assert aug["hflip"] == 0 and aug["vflip"] == 0.5 and aug["color_jitter"] == 0.3
    assert set(aug) == {"hflip", "vflip", "scale", "ratio", "interpolation", "color_jitter", "auto_augment",
                        "re_prob", "crop_pct"}


def test_cli_finetune_evaluate_predict_no_ray(tmp_path, source, capsys):
    classes = split_classes(0, 2)[1]
    write_image_folder(tmp_path / "train", classes, 8)
    write_image_folder(tmp_path / "val", classes, 3, seed=1)
    (tmp_path / "train" / classes[0].name / "readme.txt").write_text("not an image")  # recorded skip
    run = tmp_path / "run"
    code = cli_main(["finetune", "--checkpoint", source, "--train", str(tmp_path / "train"), "--val",
                     str(tmp_path / "val"), "--out", str(run), "--no-ray", "--set", "data.num_workers=0",
                     "--set", "train.global_batch_size=4", "--set", "train.max_steps=2",
                     "--set", f"data.cache_url={tmp_path / 'cache'}", "--set", "log.tensorboard=false"])
    assert code == 0 and "final model:" in capsys.readouterr().out
    assert load_checkpoint(str(run / "final")).class_names == sorted(c.name for c in classes)
    from finetune.data import resolve_dataset, skipped_samples
    cached = resolve_dataset(str(tmp_path / "train"), str(tmp_path / "cache"))
    assert [Path(r["url"]).name for r in skipped_samples(cached)] == ["readme.txt"]
    assert cli_main(["evaluate", str(run / "final"), str(tmp_path / "val"), "--workers", "0"]) == 0
    assert "top-1" in capsys.readouterr().out
    image = next((tmp_path / "val").rglob("*.jpg"))
    assert cli_main(["predict", str(run / "final"), str(image), "--top-k", "1"]) == 0
    assert capsys.readouterr().out.startswith(str(image))


@pytest.mark.slow
def test_cli_ray_two_workers_ddp(tmp_path, source, downstream, capsys):
    """`megaclass finetune` without --no-ray: 2 Ray Train workers (gloo DDP) through cluster.runtime."""
    run = tmp_path / "run"
    code = cli_main(["finetune", "--checkpoint", source, "--train", downstream, "--out", str(run),
                     "--set", "scaling.num_workers=2", "--set", "data.num_workers=0", "--set", "train.global_batch_size=8",
                     "--set", "train.max_steps=4", "--set", "train.eval_every_steps=2", "--set", "log.tensorboard=false",
                     "--set", "checkpoint.every_steps=2", "--set", "optim.warmup_steps=1"])
    assert code == 0 and "final model:" in capsys.readouterr().out
    final = load_checkpoint(str(run / "final"))
    assert final.num_classes == 3 and final.megaclass["step"] == 4
    records = read_metrics(str(run))
    assert [r["step"] for r in records if "eval_top1" in r] == [2, 4]
    assert (run / "step-00000004").exists()


def test_cli_finetune_from_registry_uri(tmp_path, source, downstream, capsys):
    from cluster.registry import Registry

    registry = tmp_path / "registry"
    assert Registry(str(registry)).publish(source, "tiny", alias="production") == 1
    run = tmp_path / "run"
    code = cli_main(["finetune", "--checkpoint", "registry://tiny@production", "--registry", str(registry),
                     "--train", downstream, "--out", str(run), "--no-ray", "--set", "data.num_workers=0",
                     "--set", "train.global_batch_size=8", "--set", "train.max_steps=1", "--set", "log.tensorboard=false"])
    assert code == 0, capsys.readouterr().err
    final = load_checkpoint(str(run / "final"))
    assert final.megaclass["finetuned_from"]["arch"] == ARCH and final.num_classes == 3
    assert final.megaclass["finetuned_from"]["uri"] == "registry://tiny@production"


def test_selection_prefers_the_later_step_within_val_noise():
    from finetune.train import counts_as_best

    # 100 val images, peak 0.5: one standard error is 0.05
    assert counts_as_best(0.46, 0.5, 100, 1.0) and counts_as_best(0.5, 0.5, 100, 1.0)
    assert not counts_as_best(0.44, 0.5, 100, 1.0)
    assert counts_as_best(0.44, 0.5, 100, 2.0)
    # 10,000 val images: the error is 0.005, so a drop of 0.01 is real
    assert not counts_as_best(0.49, 0.5, 10_000, 1.0)
    # tolerance 0: the latest of the highest
    assert counts_as_best(0.5, 0.5, 100, 0.0) and not counts_as_best(0.499, 0.5, 100, 0.0)
    assert counts_as_best(0.0, -1.0, 100, 1.0)  # the first validation is always selected
