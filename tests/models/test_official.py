"""Exactness against the authors' FishNet: parameter counts, checkpoint layout, golden logits."""

from __future__ import annotations

import pytest
import timm
import torch

import fishnet_pl
from fishnet_pl.models.official import load_official_weights, official_name

from .conftest import OFFICIAL, golden_input, golden_logits, official_layout, official_random_state_dict

# Trainable parameters of the authors' models at 1000 classes (their README and paper).
PARAMS = {"fishnet99": 16_628_904, "fishnet150": 24_959_400, "fishnet201": 44_584_552}


@pytest.mark.parametrize("name", OFFICIAL)
def test_parameter_count_equals_the_authors(name):
    model = fishnet_pl.create_backbone(name)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == PARAMS[name]


@pytest.mark.parametrize("name", OFFICIAL)
def test_state_dict_maps_one_to_one_onto_the_official_layout(name):
    ours = fishnet_pl.create_backbone(name).state_dict()
    mapped = [(official_name(k), tuple(v.shape)) for k, v in ours.items()]
    assert mapped == [(k.removeprefix("module."), s) for k, s in official_layout(name)]


@pytest.mark.parametrize("name", OFFICIAL)
def test_official_checkpoint_reproduces_golden_logits(name, tmp_path):
    # The released files are torch.save'd dicts with DataParallel's "module." prefix.
    path = tmp_path / f"{name}_ckpt.tar"
    torch.save({"epoch": 100, "arch": name, "best_prec1": 78.0, "state_dict": official_random_state_dict(name)}, path)
    model = fishnet_pl.create_backbone(name).eval()
    report = load_official_weights(model, path)
    assert len(report.loaded) == len(model.state_dict()) and report.dropped == []
    with torch.no_grad():
        logits = model(golden_input())
    # These random weights saturate the score layer, so a wrong up-sampling or dilation moves the
    # logits by only ~1e-5: check far tighter than the reference's 1e-4 (we match bit for bit).
    torch.testing.assert_close(logits, golden_logits(name), atol=2e-6, rtol=0)


def test_bare_state_dict_without_prefix_loads_too():
    state = {k.removeprefix("module."): v for k, v in official_random_state_dict("fishnet99").items()}
    model = fishnet_pl.fishnet99().eval()
    load_official_weights(model, state)
    with torch.no_grad():
        torch.testing.assert_close(model(golden_input()), golden_logits("fishnet99"), atol=2e-6, rtol=0)


def test_feature_maps_match_the_authors_fishnet150_at_224():
    # Reference README: stem 64@56, tail 128@28 256@14 512@7, body 512@7 768@14 512@28 320@56,
    # head 832@28 1600@14 2112@7.
    model = fishnet_pl.fishnet150().eval()
    with torch.no_grad():
        _, maps = model._forward_maps(torch.zeros(1, 3, 224, 224))
    got = [(m.shape[1], m.shape[2]) for m in maps]
    assert got == [(64, 56), (128, 28), (256, 14), (512, 7), (512, 7), (768, 14), (512, 28), (320, 56),
                   (832, 28), (1600, 14), (2112, 7)]


def test_checkpoint_of_another_variant_is_refused_and_named():
    with pytest.raises(ValueError, match="layout of fishnet99"):
        load_official_weights(fishnet_pl.fishnet150(), official_random_state_dict("fishnet99"))


def test_missing_and_unexpected_keys_are_refused_by_name():
    state = official_random_state_dict("fishnet99")
    del state["module.fish.fish.4.1.0.conv1.weight"]
    state["module.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing: fish\.fish\.4\.1\.0\.conv1\.weight(.|\n)*unexpected: extra"):
        load_official_weights(fishnet_pl.fishnet99(), state)


def test_new_classifier_needs_drop_classifier_and_keeps_the_rest():
    state = official_random_state_dict("fishnet99")
    model = fishnet_pl.fishnet99(num_classes=10)
    with pytest.raises(ValueError, match="drop_classifier=True"):
        load_official_weights(model, state)
    report = load_official_weights(model, state, drop_classifier=True)
    assert report.dropped == ["fish.fish.9.4.1.bias", "fish.fish.9.4.1.weight"]
    torch.testing.assert_close(model.pre_logits[2].weight, state["module.fish.fish.9.3.2.weight"])


@pytest.mark.parametrize("out_indices", [(0, 1, 2, 3, 4), (1, 2)])
def test_features_only_backbone_drops_the_score_layers_and_pruned_stages(out_indices):
    features = timm.create_model("fishnet99", features_only=True, out_indices=out_indices)
    model = features.model
    report = load_official_weights(model, official_random_state_dict("fishnet99"))
    stages = {".".join(k.split(".")[:4]) for k in report.dropped}
    if out_indices[-1] == 4:  # only the score layers
        assert stages == {"fish.fish.9.3", "fish.fish.9.4"}
    else:  # and head.1, head.2 (the authors' fish.fish.8 and fish.fish.9.0/.1), pruned after head.0
        assert stages == {"fish.fish.8.0", "fish.fish.8.1", "fish.fish.9.0", "fish.fish.9.1", "fish.fish.9.3",
                          "fish.fish.9.4"}
    assert len(report.loaded) == len(model.state_dict())


def test_timm_pretrained_file_loads_the_official_checkpoint(tmp_path):
    path = tmp_path / "fishnet99_ckpt.tar"
    torch.save({"epoch": 100, "arch": "fishnet99", "state_dict": official_random_state_dict("fishnet99")}, path)
    model = timm.create_model("fishnet99", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(golden_input()), golden_logits("fishnet99"), atol=2e-6, rtol=0)
    # A new classifier keeps the backbone weights and reinitialises only fc.
    ten = timm.create_model("fishnet99", pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=str(path)))
    torch.testing.assert_close(ten.pre_logits[2].weight, model.pre_logits[2].weight)
    assert ten.get_classifier().out_channels == 10


def test_single_channel_stem_is_adapted_from_rgb_weights():
    state = official_random_state_dict("fishnet99")
    rgb, gray = fishnet_pl.fishnet99().eval(), timm.create_model("fishnet99", in_chans=1).eval()
    load_official_weights(rgb, state)
    load_official_weights(gray, state)
    torch.testing.assert_close(gray.stem.conv1[0].weight,
                               state["module.conv1.0.weight"].sum(dim=1, keepdim=True))
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        # Summed RGB filters on a gray image equal the RGB model on that image repeated 3 times.
        torch.testing.assert_close(gray._forward_maps(x)[0], rgb._forward_maps(x.repeat(1, 3, 1, 1))[0])
        torch.testing.assert_close(gray(x), rgb(x.repeat(1, 3, 1, 1)), atol=1e-5, rtol=1e-4)


def test_missing_checkpoint_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tar"):
        load_official_weights(fishnet_pl.fishnet99(), tmp_path / "nope.tar")
