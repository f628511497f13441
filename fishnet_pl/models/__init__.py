from fishnet_pl.models.fishnet import (  # noqa: F401  (importing registers the variants)
    STAGE_NAMES,
    FishNet,
    FishNetConfig,
    fishnet99,
    fishnet150,
    fishnet201,
    fishnet_tiny,
    fishnext99_32x4d,
    fishnext150_32x4d,
    fishnext201_32x4d,
)
from fishnet_pl.models.registry import create_backbone, list_backbones, register_backbone  # noqa: F401
