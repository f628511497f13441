"""The FishNet variants as timm models: ``timm.create_model("fishnet150", pretrained=True, features_only=True)``.

The top layer of the family: the network (``architecture.py``), with the authors' released weights
(``pretrained.py``, in their layout: ``official.py``), registered under timm's factory names. Importing this module
(``import fishnet_pl`` does) registers them; timm knows them as its model module ``fishnet``.
"""

from __future__ import annotations

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from fishnet_pl.models.architecture import VARIANT_CONFIGS, FishNet
from fishnet_pl.models.official import is_official_layout, to_our_layout
from fishnet_pl.models.pretrained import RELEASED, with_local_file


def _cfg(**kwargs) -> dict:
    """timm's pretrained_cfg: what a FishNet expects as input (the authors' ImageNet preprocessing: 224
    crops of images resized to 256, bilinear, ImageNet mean/std) and where its first conv and classifier are.
    Every part of fishnet-pl reads mean, std and input size from here."""
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
            "interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "first_conv": "stem.conv1.0", "classifier": "fc", "license": "unknown",
            "paper_ids": "arXiv:1901.03495", "origin_url": "https://github.com/kevin-ssy/FishNet", **kwargs}


# The released weights' tags (their URLs: ``pretrained.RELEASED``), and a tag without weights for each other variant.
default_cfgs = generate_default_cfgs({**{tag: _cfg(**release) for tag, release in RELEASED.items()},
                                      **{name: _cfg() for name in VARIANT_CONFIGS
                                         if not any(tag.startswith(f"{name}.") for tag in RELEASED)}})


def _create(variant: str, pretrained: bool = False, **kwargs) -> FishNet:
    # features_only: timm's FeatureGetterNet over forward_intermediates (FishNet's body and head re-use
    # tail maps, so replaying top-level children, timm's default wrapper, cannot extract them).
    if pretrained:  # a released file comes from pretrained.py's checked cache, not from timm's unchecked download
        kwargs["pretrained_cfg"] = with_local_file(variant, kwargs.pop("pretrained_cfg", None),
                                                   kwargs.pop("pretrained_cfg_overlay", None), kwargs.get("cache_dir"))
    return build_model_with_cfg(FishNet, variant, pretrained, model_cfg=VARIANT_CONFIGS[variant],
                                pretrained_filter_fn=_official_to_ours,
                                feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3, 4)), **kwargs)


def _official_to_ours(state_dict: dict, model: FishNet) -> dict:
    """timm's checkpoint filter: the authors' released files load by renaming to our keys."""
    return to_our_layout(state_dict, model.cfg) if is_official_layout(state_dict) else state_dict


@register_model
def fishnet99(pretrained: bool = False, **kwargs) -> FishNet:
    """FishNet-99: 16.63M parameters, 4.31 GFLOPs at 224x224. ``kwargs`` go to ``FishNet``."""
    return _create("fishnet99", pretrained, **kwargs)


@register_model
def fishnet150(pretrained: bool = False, **kwargs) -> FishNet:
    """FishNet-150: 24.96M parameters, 6.45 GFLOPs at 224x224. ``kwargs`` go to ``FishNet``."""
    return _create("fishnet150", pretrained, **kwargs)


@register_model
def fishnet201(pretrained: bool = False, **kwargs) -> FishNet:
    """FishNet-201: 44.58M parameters, 10.58 GFLOPs at 224x224. ``kwargs`` go to ``FishNet``."""
    return _create("fishnet201", pretrained, **kwargs)


@register_model
def fishnext99_32x4d(pretrained: bool = False, **kwargs) -> FishNet:
    """FishNeXt-99 with 32 groups of width 4 in every 3x3 convolution (ResNeXt-style)."""
    return _create("fishnext99_32x4d", pretrained, **kwargs)


@register_model
def fishnext150_32x4d(pretrained: bool = False, **kwargs) -> FishNet:
    """FishNeXt-150 with 32 groups of width 4 in every 3x3 convolution (ResNeXt-style)."""
    return _create("fishnext150_32x4d", pretrained, **kwargs)


@register_model
def fishnext201_32x4d(pretrained: bool = False, **kwargs) -> FishNet:
    """FishNeXt-201 with 32 groups of width 4 in every 3x3 convolution (ResNeXt-style)."""
    return _create("fishnext201_32x4d", pretrained, **kwargs)


@register_model
def fishnet_tiny(pretrained: bool = False, **kwargs) -> FishNet:
    """A small FishNet of the same topology (about 2M parameters) for CPU quickstarts and tests."""
    return _create("fishnet_tiny", pretrained, **kwargs)
