"""Starting any timm backbone from a file (torchvision, timm, official FishNet, our Lightning .ckpt),
into the classifier or timm's features_only wrapper, and freezing its first stages."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn

from fishnet_pl.checkpoint import CKPT_BACKBONE_KEY
from fishnet_pl.models.weights import freeze, keep_frozen_norms_in_eval, load_backbone_weights, stage_count

from .conftest import official_random_state_dict


def randomise_bn_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-default running statistics, so a BN buffer that failed to load would show in the logits."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
    """A torchvision model (random init) and its state dict saved as a file, per architecture."""
    made = {}

    def make(name: str):
        if name not in made:
            torch.manual_seed(0)
            model = randomise_bn_statistics(getattr(torchvision.models, name)()).eval()
            path = tmp_path_factory.mktemp("weights") / f"{name}_torchvision.pth"
            torch.save(model.state_dict(), path)
            made[name] = model, path
        return made[name]

    return make


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_torchvision_file_gives_torchvision_logits_in_timm(name, torchvision_file):
    reference, path = torchvision_file(name)
    model = timm.create_model(name).eval()
    assert load_backbone_weights(model, name, path) == []
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_torchvision_file_loads_into_the_features_only_wrapper(name, torchvision_file):
    reference, path = torchvision_file(name)
    features = timm.create_model(name, features_only=True).eval()
    head = timm.models.get_pretrained_cfg(name).classifier
    assert load_backbone_weights(features, name, path) == [f"{head}.bias", f"{head}.weight"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps = features(x)
        if name == "resnet18":  # the last map is torchvision's layer4 output
            torch.testing.assert_close(maps[-1], nn.Sequential(*list(reference.children())[:-2])(x))
        else:  # densenet's last map is its final norm5 + ReLU, which torchvision's forward applies
            torch.testing.assert_close(maps[-1], nn.functional.relu(reference.features(x)))


def test_new_classifier_size_loads_the_backbone_and_leaves_out_the_head(torchvision_file):
    reference, path = torchvision_file("resnet18")
    model = timm.create_model("resnet18", num_classes=10).eval()
    assert load_backbone_weights(model, "resnet18", path) == ["fc.bias", "fc.weight"]
    torch.testing.assert_close(model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


def test_single_channel_stem_is_adapted(torchvision_file):
    reference, path = torchvision_file("resnet18")
    model = timm.create_model("resnet18", in_chans=1).eval()
    load_backbone_weights(model, "resnet18", path)
    torch.testing.assert_close(model.conv1.weight, reference.conv1.weight.sum(dim=1, keepdim=True))
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x.repeat(1, 3, 1, 1)), atol=1e-5, rtol=1e-4)


def test_timm_checkpoint_wrapped_in_model_or_state_dict_loads(tmp_path):
    source = randomise_bn_statistics(timm.create_model("resnet18")).eval()
    for wrapper in ("model", "state_dict", "state_dict_ema"):
        path = tmp_path / f"{wrapper}.pth.tar"
        torch.save({"epoch": 3, wrapper: source.state_dict()}, path)
        model = timm.create_model("resnet18").eval()
        assert load_backbone_weights(model, "resnet18", path) == []
        for (key, a), b in zip(model.state_dict().items(), source.state_dict().values()):
            torch.testing.assert_close(a, b, msg=key)


def test_other_variant_is_refused_naming_missing_keys_and_the_file(torchvision_file):
    _, path = torchvision_file("resnet18")
    with pytest.raises(ValueError) as err:
        load_backbone_weights(timm.create_model("resnet34"), "resnet34", path)
    message = str(err.value)
    assert str(path) in message and "not a checkpoint of resnet34" in message
    assert "missing" in message and "layer1.2.conv1.weight" in message


def test_unreadable_file_is_refused_naming_it(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match=f"{garbage}: not a readable PyTorch checkpoint"):
        load_backbone_weights(timm.create_model("resnet18"), "resnet18", garbage)
    not_tensors = tmp_path / "not_tensors.pth"
    torch.save({"epoch": 1, "lr": 0.1}, not_tensors)
    with pytest.raises(ValueError, match=str(not_tensors)):
        load_backbone_weights(timm.create_model("resnet18"), "resnet18", not_tensors)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_backbone_weights(timm.create_model("resnet18"), "resnet18", tmp_path / "nope.pth")


def test_official_fishnet_file_loads_into_the_timm_features_wrapper(tmp_path):
    path = tmp_path / "fishnet99_ckpt.tar"
    torch.save({"epoch": 100, "arch": "fishnet99", "state_dict": official_random_state_dict("fishnet99")}, path)
    classifier = timm.create_model("fishnet99").eval()
    assert load_backbone_weights(classifier, "fishnet99", path) == []
    features = timm.create_model("fishnet99", features_only=True).eval()
    dropped = load_backbone_weights(features, "fishnet99", path)
    assert dropped and all(k.startswith(("fc.", "pre_logits.")) for k in dropped)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps = features(x)
        s2, f = classifier._forward_maps(x)
    assert len(maps) == 5
    for got, expected in zip(maps, [s2, f[7], f[8], f[9], f[10]]):
        torch.testing.assert_close(got, expected)


def test_official_fishnet_file_into_another_variant_is_refused(tmp_path):
    path = tmp_path / "fishnet99_ckpt.tar"
    torch.save({"state_dict": official_random_state_dict("fishnet99")}, path)
    with pytest.raises(ValueError, match=str(path)):
        load_backbone_weights(timm.create_model("fishnet_tiny"), "fishnet_tiny", path)


def test_official_fishnet_file_adapts_a_single_channel_stem(tmp_path):
    state = official_random_state_dict("fishnet99")
    path = tmp_path / "fishnet99_ckpt.tar"
    torch.save({"state_dict": state}, path)
    features = timm.create_model("fishnet99", features_only=True, out_indices=(0,), in_chans=1)
    load_backbone_weights(features, "fishnet99", path)
    torch.testing.assert_close(features.model.stem.conv1[0].weight,
                               state["module.conv1.0.weight"].sum(dim=1, keepdim=True))


def save_lightning_checkpoint(path, backbone: nn.Module, name: str, prefix: str = "model.backbone."):
    """A checkpoint as our Lightning tasks write it: the task's state dict plus where its backbone sits."""
    state = {"model.head.weight": torch.zeros(3), **{prefix + k: v for k, v in backbone.state_dict().items()}}
    torch.save({"state_dict": state, "epoch": 1, CKPT_BACKBONE_KEY: {"name": name, "prefix": prefix}}, path)


def test_our_classification_checkpoint_loads_by_its_recorded_prefix(tmp_path):
    source = randomise_bn_statistics(timm.create_model("fishnet_tiny", num_classes=4)).eval()
    path = tmp_path / "last.ckpt"
    save_lightning_checkpoint(path, source, "fishnet_tiny")
    classifier = timm.create_model("fishnet_tiny", num_classes=4).eval()
    assert load_backbone_weights(classifier, "fishnet_tiny", path) == []
    other = timm.create_model("fishnet_tiny", num_classes=10).eval()
    assert load_backbone_weights(other, "fishnet_tiny", path) == ["fc.bias", "fc.weight"]
    features = timm.create_model("fishnet_tiny", features_only=True).eval()
    load_backbone_weights(features, "fishnet_tiny", path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(classifier(x), source(x))
        s2, f = source._forward_maps(x)
        for got, expected in zip(features(x), [s2, f[7], f[8], f[9], f[10]]):
            torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="its backbone is 'fishnet_tiny', not 'fishnet99'"):
        load_backbone_weights(timm.create_model("fishnet99"), "fishnet99", path)


def test_our_resnet_dense_task_checkpoint_loads_into_a_features_wrapper(tmp_path):
    source = randomise_bn_statistics(timm.create_model("resnet18", features_only=True)).eval()
    path = tmp_path / "last.ckpt"
    save_lightning_checkpoint(path, source, "resnet18")
    features = timm.create_model("resnet18", features_only=True).eval()
    assert load_backbone_weights(features, "resnet18", path) == []
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for got, expected in zip(features(x), source(x)):
            torch.testing.assert_close(got, expected)


def test_our_fishnet_dense_task_checkpoint_loads_into_a_features_wrapper(tmp_path):
    source = randomise_bn_statistics(timm.create_model("fishnet_tiny", features_only=True)).eval()
    path = tmp_path / "last.ckpt"
    save_lightning_checkpoint(path, source, "fishnet_tiny")
    features = timm.create_model("fishnet_tiny", features_only=True).eval()
    load_backbone_weights(features, "fishnet_tiny", path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for got, expected in zip(features(x), source(x)):
            torch.testing.assert_close(got, expected)


def test_stage_count_and_freezing_a_resnet():
    assert stage_count("fishnet_tiny") == 11 and stage_count("fishnet150") == 11
    assert stage_count("resnet18") == 5  # stem, layer1-4
    model = timm.create_model("resnet18", features_only=True)
    freeze(model, "resnet18", frozen_stages=2)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("conv1.", "bn1.", "layer1.")) for n in frozen)
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith(("layer2.", "layer4.")))
    model.train()
    keep_frozen_norms_in_eval(model)
    assert not model.bn1.training and model.layer2[0].bn1.training


@pytest.mark.parametrize("name", ["fishnet_tiny", "resnet18"])
def test_freezing_beyond_the_stage_count_is_refused(name):
    with pytest.raises(ValueError, match=f"frozen_stages must be in 0..{stage_count(name)} for {name}"):
        freeze(timm.create_model(name), name, frozen_stages=stage_count(name) + 1)
    with pytest.raises(ValueError, match="frozen_stages"):
        freeze(timm.create_model(name), name, frozen_stages=-1)
    freeze(timm.create_model(name), name, frozen_stages=stage_count(name))  # all stages is fine
