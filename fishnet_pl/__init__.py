"""fishnet-pl: FishNet backbones, exact to the authors' model, with Lightning task heads."""

from fishnet_pl.models import (  # noqa: F401
    FishNet,
    FishNetConfig,
    create_backbone,
    fishnet99,
    fishnet150,
    fishnet201,
    fishnet_tiny,
    fishnext99_32x4d,
    fishnext150_32x4d,
    fishnext201_32x4d,
    list_backbones,
    smp_encoder,  # noqa: F401,E402  (registers the FishNet smp encoders)
)
from fishnet_pl.models.official import load_official_weights  # noqa: F401,E402
from fishnet_pl.module import FishNetModule  # noqa: F401,E402
from fishnet_pl.tasks import ClassificationHead, DetectionHead, SegmentationHead, TaskHead  # noqa: F401,E402
