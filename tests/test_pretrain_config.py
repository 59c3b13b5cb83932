"""The pretrain config: every shipped config loads, the documented keys exist, bad values name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_pipeline.config import ConfigError, to_dict
from pretrain.config import load_pretrain_config
from pretrain.models import resolve_arch

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").glob("pretrain_*.yaml"))
DESIGN_KEYS = """data.url data.image_size data.num_workers model.arch train.global_batch_size train.max_steps
train.precision train.seed loss.label_smoothing loss.mixup loss.cutmix checkpoint.url checkpoint.every_steps
checkpoint.keep scaling.num_workers scaling.use_gpu scaling.max_failures""".split()


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_config_loads(path):
    assert path.read_text().startswith("# "), "a config starts with a comment saying what it trains"
    cfg = load_pretrain_config(path)
    assert resolve_arch(cfg.model.arch).arch
    assert cfg.train.global_batch_size % (cfg.scaling.num_workers * cfg.train.grad_accum_steps) == 0


def test_every_preset_and_tiny_are_shipped():
    """One config per preset, naming it as model.arch (six presets), plus the tiny one."""
    from pretrain.models import PRESETS
    shipped = {p.name: resolve_arch(load_pretrain_config(p, ["data.url=/d", "checkpoint.url=/r"]).model.arch)
               for p in SHIPPED}
    assert len(PRESETS) == 6 and "pretrain_tiny.yaml" in shipped
    assert {f"pretrain_{name}.yaml": preset for name, preset in PRESETS.items()}.items() <= shipped.items()


def test_design_keys_exist():
    flat = to_dict(load_pretrain_config(overrides=["data.url=/d", "checkpoint.url=/r"]))
    for key in DESIGN_KEYS:
        section, name = key.split(".")
        assert name in flat[section], key


@pytest.mark.parametrize("override, field_name", [
    ("train.global_batch_size=10", "train.global_batch_size"),  # 10 % (4 workers * 1) != 0
    ("train.precision=fp16", "train.precision"),
    ("loss.mixup=1.5", "loss.mixup"),
    ("optim.name=adam9", "optim.name"),
    ("checkpoint.keep=0", "checkpoint.keep"),
    ("data.image_size=abc", "data.image_size"),
    ("train.nope=1", "train.nope"),
])
def test_bad_value_names_field(override, field_name):
    base = ["data.url=/d", "checkpoint.url=/r", "scaling.num_workers=4", "train.global_batch_size=16"]
    with pytest.raises(ConfigError, match=field_name.replace(".", r"\.")):
        load_pretrain_config(overrides=base + [override])


def test_batch_divisibility_mentions_workers_and_accum():
    with pytest.raises(ConfigError, match="scaling.num_workers \\* train.grad_accum_steps"):
        load_pretrain_config(overrides=["data.url=/d", "checkpoint.url=/r", "scaling.num_workers=2",
                                        "train.grad_accum_steps=3", "train.global_batch_size=8"])


def test_missing_urls_fail():
    with pytest.raises(ConfigError, match="checkpoint.url"):
        load_pretrain_config(overrides=["data.url=/d"])
    with pytest.raises(ConfigError, match="data.url"):
        load_pretrain_config(overrides=["checkpoint.url=/r"])


def test_min_workers_keeps_the_global_batch_on_fewer_workers():
    from pretrain.config import fit_to_world_size
    cfg = load_pretrain_config(None, ["data.url=ds", "checkpoint.url=run", "scaling.num_workers=4", "scaling.min_workers=2",
                                      "train.global_batch_size=24", "train.grad_accum_steps=3"])
    def micro(c):
        return c.train.global_batch_size // (c.scaling.num_workers * c.train.grad_accum_steps)
    assert micro(cfg) == 2
    assert [(c.scaling.num_workers, c.train.grad_accum_steps, micro(c), c.train.global_batch_size)
            for c in (fit_to_world_size(cfg, 2), fit_to_world_size(cfg, 3))] == [(2, 6, 2, 24), (3, 4, 2, 24)]
    assert fit_to_world_size(cfg, 4) is cfg
    assert fit_to_world_size(load_pretrain_config(None, ["data.url=ds", "checkpoint.url=run", "scaling.num_workers=2"]), 1).scaling.num_workers == 2
    with pytest.raises(ConfigError, match=r"^scaling.min_workers: on 3 workers, train.global_batch_size 32 is not a whole number of micro-batches of 8"):
        load_pretrain_config(None, ["data.url=ds", "checkpoint.url=run", "scaling.num_workers=4", "scaling.min_workers=3",
                                    "train.global_batch_size=32"])
    with pytest.raises(ConfigError, match=r"^scaling.min_workers: must be 0 \(off\) or 1..scaling.num_workers"):
        load_pretrain_config(None, ["data.url=ds", "checkpoint.url=run", "scaling.num_workers=2", "scaling.min_workers=3"])
