"""The typed config machinery: defaults < YAML < --set, unknown keys and bad values named."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from data_pipeline.config import (ConfigError, describe, doc, from_dict, load_config, parse_overrides,
                                  replace, require, to_dict)


@dataclass(frozen=True)
class Data:
    url: str = doc("dataset URL", "")
    image_size: int = doc("input side, px", 224)
    splits: tuple[str, ...] = doc("splits to read", ("train",))


@dataclass(frozen=True)
class Train:
    precision: Literal["fp32", "bf16"] = doc("numeric precision", "fp32")
    lr: float = doc("peak learning rate", 0.1)
    clip: Optional[float] = doc("grad-norm clip, None = off", None)
    compile: bool = doc("torch.compile the model", False)

    def validate(self) -> None:
        require(self.lr > 0, "train.lr", "must be > 0")


@dataclass(frozen=True)
class Cfg:
    data: Data = field(default_factory=Data)
    train: Train = field(default_factory=Train)


def test_precedence_defaults_yaml_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  url: /a\n  image_size: 64\ntrain:\n  lr: 0.5\n")
    cfg = load_config(Cfg, path, ["data.image_size=32", "train.compile=true", "data.splits=train,val"])
    assert cfg.data.url == "/a"
    assert cfg.data.image_size == 32
    assert cfg.train.lr == 0.5
    assert cfg.train.compile is True
    assert cfg.data.splits == ("train", "val")
    assert cfg.train.precision == "fp32"


def test_unknown_key_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'data.imagesize'"):
        load_config(Cfg, None, ["data.imagesize=3"])
    path = tmp_path / "c.yaml"
    path.write_text("trian:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="'trian'"):
        load_config(Cfg, path)


@pytest.mark.parametrize("override, field_name", [
    ("data.image_size=abc", "data.image_size"),
    ("train.precision=fp16", "train.precision"),
    ("train.lr=-1", "train.lr"),
    ("train.compile=maybe", "train.compile"),
])
def test_bad_values_name_the_field(override, field_name):
    with pytest.raises(ConfigError, match=field_name.replace(".", r"\.")):
        load_config(Cfg, None, [override])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Cfg, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Cfg, bad)
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["data.url"])


def test_roundtrip_replace_describe():
    cfg = load_config(Cfg, None, ["train.clip=1.5"])
    assert from_dict(Cfg, to_dict(cfg)) == cfg
    assert replace(cfg, ["train.clip=null"]).train.clip is None
    lines = describe(Cfg)
    assert any(line.startswith("data.image_size (int, default 224): input side, px") for line in lines)
