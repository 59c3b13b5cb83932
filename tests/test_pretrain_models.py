"""Backbone presets: each builds with timm, trains one step at a tiny size, and names its classifier."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from data_pipeline.config import ConfigError
from pretrain.models import PRESETS, classifier_prefix, create_backbone, resolve_arch

HEAVY = {"resnext101_32x16d", "res2net101d", "resnet101d"}


def feature_dim(model: torch.nn.Module) -> int:
    return getattr(model, "head_hidden_size", None) or model.num_features


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in PRESETS])
def test_preset_builds_and_trains_one_step(name):
    torch.manual_seed(0)
    backbone, preset = create_backbone(name)
    head = torch.nn.Linear(feature_dim(backbone), 5)
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    images, labels = torch.randn(2, 3, 64, 64), torch.tensor([1, 3])
    backbone.train()
    features = backbone(images)
    assert features.shape == (2, feature_dim(backbone))
    loss = F.cross_entropy(head(features), labels)
    loss.backward()
    before = head.weight.detach().clone()
    opt.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, head.weight)
    assert all(p.grad is not None for p in backbone.parameters() if p.requires_grad)


def test_efficientnet_b0_small_is_b0_without_se():
    small, preset = create_backbone("EfficientNetB0_small")
    b0 = timm.create_model("efficientnet_b0", pretrained=False, num_classes=0)
    count = lambda m, skip="": sum(p.numel() for k, p in m.named_parameters() if not (skip and skip in k))
    assert preset.arch == "efficientnet_lite0"
    assert not any(".se." in k for k in small.state_dict())
    assert count(small) == count(b0, skip=".se.") == 3_371_008
    assert isinstance(small.bn1.act, torch.nn.SiLU)


def test_classifier_prefix_and_unknown_arch():
    assert classifier_prefix("resnet18") == "fc"
    assert classifier_prefix("mobilenetv3_large_100") == "classifier"
    assert resolve_arch("ResNet50_vd").arch == "resnet50d"
    with pytest.raises(ConfigError, match="model.arch"):
        resolve_arch("no_such_net")
