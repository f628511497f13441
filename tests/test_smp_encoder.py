"""FishNet as an smp encoder (``tu-fishnet*``): the contract smp's own encoder tests check
(``tests/encoders/base.py``, ``BaseEncoderTester``, in smp's repository, which its sdist does not ship),
asserted here on our models: depth, strides, ``output_stride``, ``out_channels``, input channels,
dilation, ``torch.compile`` and ``torch.export``. TorchScript is not supported (see the README)."""

from __future__ import annotations

import pytest
import segmentation_models_pytorch as smp
import torch

import fishnet_pl  # noqa: F401  (registers FishNet in timm)

SIZE = 64  # smp's sample side


def encoder(name: str = "tu-fishnet_tiny", **kwargs):
    return smp.encoders.get_encoder(name, encoder_weights=None, **kwargs).eval()


def strides(features: list[torch.Tensor]) -> list[tuple[int, int]]:
    return [(SIZE // f.shape[-2], SIZE // f.shape[-1]) for f in features]


@pytest.mark.parametrize("name", ["tu-fishnet_tiny", "tu-fishnet99"])
@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
def test_each_depth_gives_its_maps_strides_channels_and_output_stride(name, depth):
    model = encoder(name, depth=depth)
    with torch.no_grad():
        features = model(torch.rand(2, 3, SIZE, SIZE))
    assert len(features) == depth + 1 == len(model.out_channels)
    assert strides(features) == [(2**k, 2**k) for k in range(depth + 1)]
    assert [f.shape[1] for f in features] == list(model.out_channels)
    assert model.output_stride == 2**depth


def test_forward_and_backward_reach_every_map():
    model = encoder().train()
    features = model(torch.rand(2, 3, SIZE, SIZE))
    sum(f.mean() for f in features[1:]).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("in_channels", [1, 4])
def test_other_input_channels(in_channels):
    model = encoder(in_channels=in_channels)
    with torch.no_grad():
        features = model(torch.rand(1, in_channels, SIZE, SIZE))
    assert features[0].shape[1] == in_channels == model.out_channels[0] and len(features) == 6


@pytest.mark.parametrize("depth", [0, 6])
def test_invalid_depth_is_refused(depth):
    with pytest.raises(ValueError):
        encoder(depth=depth)


@pytest.mark.parametrize("output_stride", [8, 16])
def test_dilated_encoder_stops_down_sampling_at_its_output_stride(output_stride):
    with torch.no_grad():
        features = encoder(output_stride=output_stride)(torch.rand(1, 3, SIZE, SIZE))
    assert strides(features) == [(min(2**k, output_stride),) * 2 for k in range(6)]


def test_compiles_as_one_graph_with_dynamic_shapes():
    model, x = encoder(), torch.rand(1, 3, SIZE, SIZE)
    torch.compiler.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="eager")
    with torch.no_grad():
        for expected, got in zip(model(x), compiled(x)):
            torch.testing.assert_close(got, expected)


def test_strict_torch_export_gives_the_eager_maps():
    model, x = encoder(), torch.rand(1, 3, SIZE, SIZE)
    exported = torch.export.export(model, args=(x,), strict=True)
    with torch.no_grad():
        for expected, got in zip(model(x), exported.module()(x)):
            torch.testing.assert_close(got, expected)
