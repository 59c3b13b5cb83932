"""Backbones: any timm model name, plus presets for the six backbones of the seed's model zoo.

A preset maps a familiar name (including the PaddleClas names the zoo used) to a timm
architecture and constructor arguments. The arguments must be plain JSON values, because they
are stored as `model_args` in the checkpoint's config.json, and timm passes them back when
`timm.create_model("local-dir:CKPT")` rebuilds the model -- so a preset is loadable by plain timm.

    backbone = create_backbone("EfficientNetB0_small")   # timm efficientnet_lite0 + swish
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import timm
import torch.nn as nn

from data_pipeline.config import ConfigError


@dataclass(frozen=True)
class Preset:
    arch: str  # timm architecture name
    model_args: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable constructor kwargs
    description: str = ""


# EfficientNet-B0 without squeeze-excitation: timm's efficientnet_b0 treats every falsy `se_layer`
# as "use the default SE", so it cannot be switched off by a JSON argument. efficientnet_lite0 is the
# same block layout without SE (at multiplier 1.0 its fixed stem/head equal B0's 32/1280 channels);
# with act_layer="swish" it is exactly B0 minus SE (3,371,008 backbone params, checked in the tests).
PRESETS: dict[str, Preset] = {
    "resnet50d": Preset("resnet50d", {}, "ResNet-50-D (PaddleClas ResNet50_vd)"),
    "resnet101d": Preset("resnet101d", {}, "ResNet-101-D (PaddleClas ResNet101_vd)"),
    "mobilenetv3_large_100": Preset("mobilenetv3_large_100", {}, "MobileNetV3-Large 1.0"),
    "efficientnet_b0_small": Preset("efficientnet_lite0", {"act_layer": "swish"},
                                    "EfficientNet-B0 without squeeze-excitation (PaddleClas EfficientNetB0_small)"),
    "resnext101_32x16d": Preset("resnext101_32x16d", {}, "ResNeXt-101 32x16d (~190M params)"),
    "res2net101d": Preset("res2net101d", {}, "Res2Net-101-D 26w4s (PaddleClas Res2Net101_vd_26w_4s)"),
}
ALIASES = {
    "ResNet50_vd": "resnet50d", "ResNet101_vd": "resnet101d", "MobileNetV3_large_x1_0": "mobilenetv3_large_100",
    "EfficientNetB0_small": "efficientnet_b0_small", "ResNeXt101_32x16d_wsl": "resnext101_32x16d",
    "ResNeXt101_32x16d": "resnext101_32x16d", "Res2Net101_vd_26w_4s": "res2net101d",
}


def resolve_arch(name: str) -> Preset:
    """A preset (by name or alias) or any registered timm model; ConfigError naming model.arch otherwise."""
    key = ALIASES.get(name, name)
    if key in PRESETS:
        return PRESETS[key]
    if timm.is_model(name):
        return Preset(name)
    raise ConfigError(f"model.arch: {name!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a timm model")


def create_backbone(name: str, *, drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> tuple[nn.Module, Preset]:
    """The timm model without classifier (num_classes=0), randomly initialised; never downloads weights.

    Drop rates are runtime options (timm leaves them out of exported model_args), so they do not
    change what a checkpoint rebuilds.
    """
    preset = resolve_arch(name)
    kwargs: dict[str, Any] = dict(preset.model_args)
    if drop_rate:
        kwargs["drop_rate"] = drop_rate
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    model = timm.create_model(preset.arch, pretrained=False, num_classes=0, **kwargs)
    return model, preset


def classifier_prefix(arch: str, model_args: dict[str, Any] | None = None) -> str:
    """State-dict prefix of the classifier in timm's naming ('fc' for ResNets, 'classifier' for EfficientNets).

    Found by building the model on the meta device with one class and diffing against the
    headless model's keys, so it holds for any timm architecture with a single Linear classifier.
    """
    import torch
    with torch.device("meta"):
        with_head = timm.create_model(arch, pretrained=False, num_classes=1, **(model_args or {}))
        headless = timm.create_model(arch, pretrained=False, num_classes=0, **(model_args or {}))
    extra = sorted(set(with_head.state_dict()) - set(headless.state_dict()))
    prefixes = {k.rsplit(".", 1)[0] for k in extra}
    if len(prefixes) != 1 or not all(k.endswith((".weight", ".bias")) for k in extra):
        raise ConfigError(f"model.arch: {arch!r} has no single Linear classifier (extra keys {extra})")
    return prefixes.pop()
