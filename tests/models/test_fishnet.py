"""FishNet as a timm model: the timm contract (create_model kwargs, features_only, forward_intermediates,
classifier reset, pretrained_cfg), output stride, fine-tuning options, export paths and the paper's
gradient claim. Uses the small variant unless size is the point."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
import timm
import torch
from timm.models import group_parameters
from torch import nn

import fishnet_pl
from fishnet_pl.models import STAGE_NAMES, FishNet
from fishnet_pl.models.architecture import FISHNET_TINY
from fishnet_pl.models.weights import freeze, keep_frozen_norms_in_eval

VARIANTS = ("fishnet99", "fishnet150", "fishnet201", "fishnext99_32x4d", "fishnext150_32x4d",
            "fishnext201_32x4d", "fishnet_tiny")


def tiny(**kwargs):
    return timm.create_model("fishnet_tiny", **{"num_classes": 5, **kwargs})


def maps_of(model: FishNet, x: torch.Tensor) -> list[torch.Tensor]:
    """The five feature_info maps (stem s2, f7, f8, f9, f10) from a full forward."""
    s2, f = model._forward_maps(x)
    return [s2, f[7], f[8], f[9], f[10]]


# ---------------------------------------------------------------------- registry
def test_registry_lists_every_variant_and_names_close_matches_for_typos():
    assert set(VARIANTS) <= set(fishnet_pl.list_backbones())
    assert "resnet50" in fishnet_pl.list_backbones()  # every timm model is a backbone now
    assert fishnet_pl.list_backbones("fishnext*") == ["fishnext99_32x4d", "fishnext150_32x4d", "fishnext201_32x4d"]
    with pytest.raises(ValueError, match="Did you mean fishnet150"):
        fishnet_pl.create_backbone("fishnet105")


def test_timm_lists_and_creates_every_variant():
    assert set(timm.list_models("fishnet*")) == {"fishnet99", "fishnet150", "fishnet201", "fishnet_tiny"}
    assert set(timm.list_models("fishnext*")) == {n for n in VARIANTS if n.startswith("fishnext")}
    for name in VARIANTS:
        assert timm.is_model(name)
    assert isinstance(fishnet_pl.create_backbone("fishnet_tiny"), FishNet)


def test_create_model_kwargs_reach_the_model():
    model = timm.create_model("fishnet_tiny", num_classes=7, in_chans=1, output_stride=16, drop_rate=0.1).eval()
    assert (model.num_classes, model.in_chans, model.output_stride, model.drop_rate) == (7, 1, 16, 0.1)
    assert model.stem.conv1[0].weight.shape[1] == 1
    assert model.get_classifier().out_channels == 7
    with torch.no_grad():
        assert model(torch.randn(2, 1, 64, 64)).shape == (2, 7)
        assert model.forward_features(torch.randn(1, 1, 64, 64)).shape == (1, model.num_features, 4, 4)


def test_features_only_gives_timm_feature_wrapper_with_the_chosen_maps():
    full = tiny().eval()
    features = timm.create_model("fishnet_tiny", features_only=True, out_indices=(1, 3)).eval()
    features.model.load_state_dict(full.state_dict(), strict=False)
    assert type(features).__name__ == "FeatureGetterNet" and isinstance(features.model, FishNet)
    assert features.feature_info.channels() == [full.feature_info[i]["num_chs"] for i in (1, 3)]
    assert features.feature_info.reduction() == [4, 16]
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        got, expected = features(x), maps_of(full, x)
    assert isinstance(got, list) and len(got) == 2
    for fmap, ref in zip(got, (expected[1], expected[3])):
        torch.testing.assert_close(fmap, ref)
    # Pruned: no score layers, no stage after head.1 (f9).
    names = {n for n, _ in features.model.named_parameters()}
    assert not any(n.startswith(("fc.", "pre_logits.", "head.2.")) for n in names)
    assert any(n.startswith("head.1.") for n in names)


def test_features_only_defaults_to_all_five_maps_and_takes_output_stride():
    features = timm.create_model("fishnet_tiny", features_only=True, output_stride=16).eval()
    assert features.feature_info.reduction() == [2, 4, 8, 16, 16]
    with torch.no_grad():
        maps = features(torch.randn(1, 3, 64, 64))
    assert [m.shape[1:] for m in maps] == [
        (c, 64 // r, 64 // r) for c, r in zip(features.feature_info.channels(), features.feature_info.reduction())]


# ---------------------------------------------------------------------- features and intermediates
def test_num_features_and_head_hidden_size_of_fishnet150():
    with torch.device("meta"):
        model = timm.create_model("fishnet150")
    assert (model.num_features, model.head_hidden_size) == (2112, 1056)
    assert [i["num_chs"] for i in model.feature_info] == [64, 320, 832, 1600, 2112]
    assert [i["module"] for i in model.feature_info] == ["stem", "body.2", "head.0", "head.1", "head.2"]


@pytest.mark.parametrize("size", [(64, 64), (96, 160)])
def test_forward_features_is_the_last_unpooled_map_and_intermediates_follow_feature_info(size):
    model = tiny().eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        features = model.forward_features(x)
        final, intermediates = model.forward_intermediates(x)
        reference = maps_of(model, x)
        logits = model(x)
    assert features.shape == (2, model.num_features, size[0] // 32, size[1] // 32)
    torch.testing.assert_close(final, features)
    torch.testing.assert_close(model.forward_head(features), logits)
    assert [i["reduction"] for i in model.feature_info] == [2, 4, 8, 16, 32]
    assert len(intermediates) == 5
    for fmap, ref, info in zip(intermediates, reference, model.feature_info):
        assert fmap.shape == (2, info["num_chs"], size[0] // info["reduction"], size[1] // info["reduction"])
        torch.testing.assert_close(fmap, ref)


@pytest.mark.parametrize("indices, taken", [(None, [0, 1, 2, 3, 4]), (2, [3, 4]), ([0, 2], [0, 2]), ([1], [1]),
                                            ([0], [0]), ([3], [3])])
def test_forward_intermediates_indices_stop_early_and_intermediates_only_equal_the_full_forward(indices, taken):
    model = tiny().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        reference = maps_of(model, x)
        features = model.forward_features(x)
        final, full = model.forward_intermediates(x, indices=indices)
        _, early = model.forward_intermediates(x, indices=indices, stop_early=True)
        only = model.forward_intermediates(x, indices=indices, intermediates_only=True)
    torch.testing.assert_close(final, features)
    for got in (full, early, only):
        assert len(got) == len(taken)
        for fmap, i in zip(got, taken):
            torch.testing.assert_close(fmap, reference[i])
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")


@pytest.mark.parametrize("indices, kept_head", [([0, 1], 0), ([2], 1), (4, 3), ([0], None)])
def test_prune_intermediate_layers_drops_parameters_and_keeps_the_maps(indices, kept_head):
    model = tiny().eval()
    pruned = tiny().eval()
    pruned.load_state_dict(model.state_dict())
    before = sum(p.numel() for p in pruned.parameters())
    taken = pruned.prune_intermediate_layers(indices)
    names = {n for n, _ in pruned.named_parameters()}
    assert sum(p.numel() for p in pruned.parameters()) < before
    assert not any(n.startswith(("fc.", "pre_logits.")) for n in names)
    if kept_head is None:
        assert not any(n.startswith(("tail.", "bridge.", "body.", "head.")) for n in names)
    else:
        assert len(pruned.head) == kept_head
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        reference = maps_of(model, x)
        got = pruned.forward_intermediates(x, indices=taken, intermediates_only=True)
    for fmap, i in zip(got, taken):
        torch.testing.assert_close(fmap, reference[i])


# ---------------------------------------------------------------------- classifier interface
def test_reset_classifier_and_num_classes_zero():
    model = tiny().eval()
    x = torch.randn(2, 3, 64, 64)
    assert model.get_classifier().out_channels == 5
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity) and model.num_classes == 0
    with torch.no_grad():
        assert model(x).shape == (2, model.head_hidden_size)
        model.reset_classifier(0, "")
        assert model(x).shape == (2, model.head_hidden_size, 2, 2)
        model.reset_classifier(3, "avg")
        assert model(x).shape == (2, 3)
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, model.head_hidden_size)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, "max")
    unpooled = timm.create_model("fishnet_tiny", num_classes=0, global_pool="").eval()
    with torch.no_grad():
        assert unpooled(x).shape == (2, unpooled.head_hidden_size, 2, 2)
    assert timm.create_model("fishnet_tiny", num_classes=0)(x).shape == (2, unpooled.head_hidden_size)


def test_pretrained_cfg_describes_the_authors_preprocessing():
    for name in VARIANTS:
        with torch.device("meta"):
            cfg = timm.create_model(name).pretrained_cfg
        assert cfg["architecture"] == name
        assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
        assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875
        assert cfg["interpolation"] == "bilinear" and cfg["num_classes"] == 1000
        assert (cfg["first_conv"], cfg["classifier"]) == ("stem.conv1.0", "fc")
    model = tiny()
    modules = dict(model.named_modules())
    assert isinstance(modules[model.pretrained_cfg["first_conv"]], nn.Conv2d)
    assert modules[model.pretrained_cfg["classifier"]] is model.get_classifier()
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert data_cfg["input_size"] == (3, 224, 224) and data_cfg["crop_pct"] == 0.875


def test_group_matcher_orders_stages_then_score_layers():
    model = tiny()
    groups = list(group_parameters(model, model.group_matcher(coarse=True)).values())
    assert len(groups) == len(STAGE_NAMES) + 1
    for names, stage in zip(groups, STAGE_NAMES):
        assert names and all(n.startswith(stage + ".") for n in names)
    assert {n.split(".")[0] for n in groups[-1]} == {"pre_logits", "fc"}


# ---------------------------------------------------------------------- output stride
@pytest.mark.parametrize("output_stride", [8, 16])
def test_output_stride_keeps_every_map_aligned(output_stride):
    model = tiny(output_stride=output_stride).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        _, f = model._forward_maps(x)
        maps = model.forward_intermediates(x, intermediates_only=True)
        features = model.forward_features(x)
        logits = model(x)
    expected = [min(s, output_stride) for s in (4, 8, 16, 32, 32, 16, 8, 4, 8, 16, 32)]
    assert [(m.shape[2], m.shape[3]) for m in f] == [(64 // s, 96 // s) for s in expected]
    assert [i["reduction"] for i in model.feature_info] == [min(s, output_stride) for s in (2, 4, 8, 16, 32)]
    for fmap, info in zip(maps, model.feature_info):
        assert fmap.shape[1:] == (info["num_chs"], 64 // info["reduction"], 96 // info["reduction"])
    assert features.shape == (1, model.num_features, 64 // output_stride, 96 // output_stride)
    assert logits.shape == (1, 5)
    # The 3x3 convolutions that now see a finer map are dilated to keep their receptive field.
    assert model.bridge.blocks[0].conv2.dilation == (32 // output_stride,) * 2
    assert model.body[0].blocks[0].conv2.dilation == (32 // output_stride,) * 2
    assert model.head[2].transfer[0].conv2.dilation == (32 // output_stride,) * 2  # f4, stride 32
    assert model.head[2].blocks[0].conv2.dilation == (16 // output_stride,) * 2  # f9, stride 16
    assert model.tail[0].blocks[0].conv2.dilation == (1, 1)


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
    with pytest.raises(ValueError, match="divisible by 16, got 40x64"):
        tiny(output_stride=16)(torch.randn(1, 3, 40, 64))
    with pytest.raises(ValueError, match="output_stride must be 8, 16 or 32"):
        tiny(output_stride=4)
    with pytest.raises(ValueError, match="in_chans must be >= 1"):
        tiny(in_chans=0)
    with pytest.raises(ValueError, match="global_pool must be"):
        tiny(global_pool="max")


# ---------------------------------------------------------------------- training behaviour
def test_every_parameter_gets_a_gradient_from_the_classification_loss():
    # The paper's point: no isolated convolution, every stage reached by one backward pass.
    model = timm.create_model("fishnet99", num_classes=10)
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


def test_drop_rate_is_active_in_training_only():
    model = tiny(drop_rate=0.5)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))
        features = model.forward_features(x)
    model.train()
    torch.manual_seed(0)
    a = model.forward_head(features)
    b = model.forward_head(features)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("wrap", [False, True])
def test_frozen_stages_keep_weights_and_statistics_fixed(wrap):
    if wrap:  # the features_only wrapper a dense task holds
        model = timm.create_model("fishnet_tiny", features_only=True)
        net = model.model
    else:
        model = net = tiny()
    freeze(model, "fishnet_tiny", frozen_stages=4)  # stem and the three tail stages
    model.train()
    keep_frozen_norms_in_eval(model)
    frozen = [p for stage in net.stages()[:4] for p in stage.parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)
    assert all(p.requires_grad for stage in net.stages()[4:] for p in stage.parameters())
    frozen_bn, trained_bn = net.tail[0].blocks[0].bn1, net.bridge.blocks[0].bn1
    assert not frozen_bn.training and trained_bn.training
    frozen_mean, trained_mean = frozen_bn.running_mean.clone(), trained_bn.running_mean.clone()
    out = model(torch.randn(2, 3, 64, 64))
    (out if isinstance(out, torch.Tensor) else out[-1]).square().mean().backward()
    torch.testing.assert_close(frozen_bn.running_mean, frozen_mean)
    assert not torch.equal(trained_bn.running_mean, trained_mean)
    assert all(p.grad is None for p in frozen)
    assert all(p.grad is not None for p in net.bridge.parameters())
    with pytest.raises(ValueError, match=f"0..{len(STAGE_NAMES)}"):
        freeze(tiny(), "fishnet_tiny", frozen_stages=99)


def test_freeze_bn_keeps_every_batchnorm_in_eval_with_frozen_affine():
    model = tiny()
    freeze(model, "fishnet_tiny", freeze_bn=True)
    model.train()
    keep_frozen_norms_in_eval(model)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(not m.training and not m.weight.requires_grad for m in bns)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(p.requires_grad for m in convs for p in m.parameters())
    stats = [m.running_mean.clone() for m in bns]
    model(torch.randn(2, 3, 64, 64))
    for m, before in zip(bns, stats):
        torch.testing.assert_close(m.running_mean, before)


def test_in_chans_changes_the_stem_only():
    model = tiny(in_chans=4)
    assert model.stem.conv1[0].weight.shape[1] == 4
    assert model(torch.randn(1, 4, 64, 64)).shape == (1, 5)
    rgb = {k: v.shape for k, v in tiny().state_dict().items()}
    changed = [k for k, v in model.state_dict().items() if v.shape != rgb[k]]
    assert changed == ["stem.conv1.0.weight"]


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain, ckpt = tiny(), tiny(grad_checkpointing=True)
    via_setter = tiny()
    via_setter.set_grad_checkpointing()
    assert ckpt.grad_checkpointing and via_setter.grad_checkpointing
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    for model in (plain, ckpt):
        model.train()
        model(x).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name, atol=1e-5, rtol=1e-4)


def test_fishnext_uses_grouped_convolutions():
    model = timm.create_model("fishnext99_32x4d", num_classes=10)
    assert model.tail[0].blocks[0].conv2.groups == 32
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    custom = FishNet(replace(FISHNET_TINY, groups=8, width_per_group=8))
    assert custom.body[1].blocks[0].conv2.groups == 8


# ---------------------------------------------------------------------- integration and export
@pytest.mark.parametrize("module", ["fishnet_pl.models", "fishnet_pl"])
def test_importing_the_models_is_light(module):
    code = (f"import sys, timm, {module}\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', "
            "'pycocotools', 'datamodules'))\n"
            "assert not heavy, heavy\n"
            "assert timm.is_model('fishnet150')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_channels_last_gives_the_same_output():
    model = tiny().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), expected, atol=1e-4, rtol=1e-4)




# ---------------------------------------------------------------------- inference fast paths
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_the_2x2_max_pool_gives_torchs_values_without_autograd_and_its_gradients_with(memory_format):
    from fishnet_pl.models.architecture import MaxPool2x2

    pool, reference = MaxPool2x2(), nn.MaxPool2d(2, stride=2)
    # Many ties (small integers) and a NaN: the fast path must pick the same values as torch's kernel.
    x = torch.randint(0, 3, (2, 6, 8, 10)).float().contiguous(memory_format=memory_format)
    x[0, 0, 0, 0] = float("nan")
    with torch.no_grad():
        got = pool(x)
    torch.testing.assert_close(got, reference(x), rtol=0, atol=0, equal_nan=True)
    assert got.is_contiguous(memory_format=memory_format)
    with torch.no_grad():  # odd sizes floor, as nn.MaxPool2d does
        odd = torch.randn(1, 3, 7, 9)
        torch.testing.assert_close(pool(odd), reference(odd), rtol=0, atol=0)
    # Training: the gradient goes to the first maximum of each window, as torch's indices say.
    ours, theirs = (x.detach().nan_to_num().requires_grad_() for _ in range(2))
    grad = torch.randn(2, 6, 4, 5)
    pool(ours).backward(grad)
    reference(theirs).backward(grad)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=0)


def test_the_ur_block_channel_sum_is_the_same_with_and_without_autograd():
    from fishnet_pl.models.architecture import channel_sum

    for k in (2, 3):
        x = torch.randn(2, 4 * k, 5, 5)
        expected = x.unflatten(1, (-1, k)).sum(2)
        with torch.no_grad():
            for layout in (torch.contiguous_format, torch.channels_last):
                got = channel_sum(x.contiguous(memory_format=layout), k)
                torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
                assert got.is_contiguous(memory_format=layout)
        torch.testing.assert_close(channel_sum(x.requires_grad_(), k), expected, rtol=0, atol=0)
        x.requires_grad_(False)


def test_eval_outputs_are_the_same_with_and_without_autograd():
    model = tiny().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fast = model(x)
    torch.testing.assert_close(model(x), fast, rtol=1e-6, atol=1e-6)


def test_the_nearest_up_sampling_gives_torchs_values_and_gradients():
    from fishnet_pl.models.architecture import Upsample2x

    ours, reference = Upsample2x(), nn.Upsample(scale_factor=2, mode="nearest")
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 5, 3, 4).contiguous(memory_format=layout).requires_grad_()
        grad = torch.randn(2, 5, 6, 8)
        got, expected = ours(x), reference(x)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        (got_grad,), (expected_grad,) = torch.autograd.grad(got, x, grad), torch.autograd.grad(expected, x, grad)
        torch.testing.assert_close(got_grad, expected_grad, rtol=0, atol=0)
