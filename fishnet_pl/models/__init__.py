"""The FishNet family as timm models, and backbones by name. Importing this registers FishNet in timm;
it imports neither Lightning nor the task and data code."""

from fishnet_pl.models.architecture import STAGE_NAMES, FishNet, FishNetConfig  # noqa: F401
from fishnet_pl.models.fishnet import (  # noqa: F401  (importing registers the variants in timm)
    fishnet99,
    fishnet150,
    fishnet201,
    fishnet_tiny,
    fishnext99_32x4d,
    fishnext150_32x4d,
    fishnext201_32x4d,
)
from fishnet_pl.models.fuse import fuse_for_inference  # noqa: F401
from fishnet_pl.models.official import load_official_weights  # noqa: F401
from fishnet_pl.models.pretrained import resolve_weights, weight_names  # noqa: F401
from fishnet_pl.models.registry import create_backbone, list_backbones  # noqa: F401
from fishnet_pl.models.weights import load_backbone_weights  # noqa: F401
