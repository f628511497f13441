"""FishNet behaviour users rely on: features for dense heads, output stride, fine-tuning options,
export paths and the paper's gradient claim. Uses the small variant unless size is the point."""

from __future__ import annotations

import onnxruntime
import pytest
import torch
from torch import nn

import fishnet_pl
from fishnet_pl.models import STAGE_NAMES


def tiny(**kwargs):
    return fishnet_pl.fishnet_tiny(num_classes=5, **kwargs)


def test_registry_lists_every_variant_and_names_close_matches_for_typos():
    assert {"fishnet99", "fishnet150", "fishnet201", "fishnext150_32x4d", "fishnet_tiny"} <= set(
        fishnet_pl.list_backbones())
    assert fishnet_pl.list_backbones("fishnext*") == ["fishnext150_32x4d", "fishnext201_32x4d", "fishnext99_32x4d"]
    with pytest.raises(ValueError, match="Did you mean fishnet150"):
        fishnet_pl.create_backbone("fishnet105")


@pytest.mark.parametrize("size", [(64, 64), (96, 160)])
def test_forward_features_match_feature_info_at_strides_2_to_32(size):
    model = tiny().eval()
    with torch.no_grad():
        maps = model.forward_features(torch.randn(2, 3, *size))
    assert [i["reduction"] for i in model.feature_info] == [2, 4, 8, 16, 32]
    for fmap, info in zip(maps, model.feature_info):
        assert fmap.shape == (2, info["num_chs"], size[0] // info["reduction"], size[1] // info["reduction"])


@pytest.mark.parametrize("output_stride", [8, 16])
def test_output_stride_keeps_every_map_aligned(output_stride):
    model = tiny(output_stride=output_stride).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        _, f = model._forward_maps(x)
        maps = model.forward_features(x)
        logits = model(x)
    expected = [min(s, output_stride) for s in (4, 8, 16, 32, 32, 16, 8, 4, 8, 16, 32)]
    assert [(m.shape[2], m.shape[3]) for m in f] == [(64 // s, 96 // s) for s in expected]
    assert [i["reduction"] for i in model.feature_info] == [min(s, output_stride) for s in (2, 4, 8, 16, 32)]
    for fmap, info in zip(maps, model.feature_info):
        assert fmap.shape[1:] == (info["num_chs"], 64 // info["reduction"], 96 // info["reduction"])
    assert logits.shape == (1, 5)
    # The 3x3 convolutions that now see a finer map are dilated to keep their receptive field.
    assert model.bridge.blocks[0].conv2.dilation == (32 // output_stride,) * 2
    assert model.body[0].blocks[0].conv2.dilation == (32 // output_stride,) * 2


def test_output_stride_surgery_is_reversible_and_keeps_the_weights():
    model = tiny().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        model.set_output_stride(8)
        model.set_output_stride(32)
        torch.testing.assert_close(model(x), before)
    assert tiny(output_stride=8).state_dict().keys() == model.state_dict().keys()


def test_bad_input_gives_one_clear_error():
    model = tiny()
    with pytest.raises(ValueError, match=r"expects input of shape \(N, 3, H, W\), got \(1, 4, 64, 64\)"):
        model(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="divisible by 32, got 64x70; .* e.g. to 64x96"):
        model(torch.randn(1, 3, 64, 70))
    with pytest.raises(ValueError, match="output_stride must be 8, 16 or 32"):
        tiny(output_stride=4)


def test_every_parameter_gets_a_gradient_from_the_classification_loss():
    # The paper's point: no isolated convolution, every stage reached by one backward pass.
    model = fishnet_pl.fishnet99(num_classes=10)
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.tensor([1, 2]))
    loss.backward()
    without = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert without == []


def test_batch_of_one_in_eval_equals_the_batched_output():
    model = tiny().eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        batched = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(single, batched, atol=1e-5, rtol=1e-4)


def test_frozen_stages_keep_weights_and_statistics_fixed():
    model = tiny(frozen_stages=4).train()  # stem and the three tail stages
    frozen = [p for stage in model.stages()[:4] for p in stage.parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)
    assert all(p.requires_grad for stage in model.stages()[4:] for p in stage.parameters())
    frozen_bn, trained_bn = model.tail[0].blocks[0].bn1, model.bridge.blocks[0].bn1
    frozen_mean, trained_mean = frozen_bn.running_mean.clone(), trained_bn.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    torch.testing.assert_close(frozen_bn.running_mean, frozen_mean)
    assert not torch.equal(trained_bn.running_mean, trained_mean)
    with pytest.raises(ValueError, match=f"0..{len(STAGE_NAMES)}"):
        tiny(frozen_stages=99)


def test_freeze_bn_keeps_every_batchnorm_in_eval_with_frozen_affine():
    model = tiny(freeze_bn=True).train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(not m.training and not m.weight.requires_grad for m in bns)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(p.requires_grad for m in convs for p in m.parameters())


def test_in_channels_changes_the_stem_only():
    model = tiny(in_channels=4)
    assert model.stem.conv1[0].weight.shape[1] == 4
    assert model(torch.randn(1, 4, 64, 64)).shape == (1, 5)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain, ckpt = tiny(), tiny(grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    for model in (plain, ckpt):
        model.train()
        model(x).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name, atol=1e-5, rtol=1e-4)


def test_fishnext_uses_grouped_convolutions():
    model = fishnet_pl.fishnext99_32x4d(num_classes=10)
    assert model.tail[0].blocks[0].conv2.groups == 32
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    custom = fishnet_pl.fishnet_tiny(groups=8, width_per_group=8)
    assert custom.body[1].blocks[0].conv2.groups == 8


def test_num_classes_zero_returns_pooled_features():
    model = fishnet_pl.fishnet_tiny(num_classes=0).eval()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, model.num_features)


def test_channels_last_gives_the_same_output():
    model = tiny().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), expected, atol=1e-4, rtol=1e-4)


def test_torch_compile_gives_the_same_output():
    model = tiny().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x), atol=1e-4, rtol=1e-4)


def test_torch_export_and_onnx_export_of_the_classifier(tmp_path):
    model = tiny().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), expected, atol=1e-5, rtol=1e-4)
    path = tmp_path / "fishnet.onnx"
    torch.onnx.export(model, (x,), path, input_names=["image"], output_names=["logits"], dynamo=True)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"image": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), expected, atol=1e-4, rtol=1e-4)
