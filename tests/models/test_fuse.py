"""fuse_for_inference: a faster eval-only copy with the outputs of the model in eval mode."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import fishnet_pl

VARIANTS = ("fishnet_tiny", "fishnet99", "fishnet150", "fishnet201", "fishnext99_32x4d", "fishnext150_32x4d",
            "fishnext201_32x4d")


def with_trained_statistics(model: nn.Module) -> nn.Module:
    """BatchNorms with non-trivial statistics and affine parameters, as after training (scales below 1 keep
    the 200-layer residual stacks at trained-network magnitudes, not 1e7)."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.weight.data.copy_(0.2 + 0.4 * torch.rand(m.num_features, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return model.eval()


def max_relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


def batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_keeps_its_outputs_with_two_of_three_bottleneck_batchnorms_folded(name):
    model = with_trained_statistics(timm.create_model(name))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    fused = fishnet_pl.fuse_for_inference(model)
    with torch.no_grad():
        assert max_relative_error(fused(x), model(x)) < 1e-5
    blocks = sum(type(m).__name__ == "Bottleneck" for m in model.modules())
    # Per bottleneck bn2 and bn3; the stem's three conv-BN pairs and the bridge's and score layer's one each.
    assert batchnorms(model) - batchnorms(fused) == 2 * blocks + 3 + 2
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in fused.parameters() if p.dim() == 4)
    assert not any(p.requires_grad for p in fused.parameters())
    # The model itself is untouched (and still trains).
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("output_stride", [32, 16])
def test_features_only_maps_are_kept(output_stride):
    model = with_trained_statistics(timm.create_model("fishnet99", features_only=True, output_stride=output_stride))
    x = torch.randn(1, 3, 96, 64, generator=torch.Generator().manual_seed(2))
    fused = fishnet_pl.fuse_for_inference(model, channels_last=False)
    with torch.no_grad():
        expected, got = model(x), fused(x)
    assert [m.shape for m in got] == [m.shape for m in expected]
    assert all(max_relative_error(a, b) < 1e-5 for a, b in zip(got, expected))
