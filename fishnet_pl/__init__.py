"""fishnet-pl: FishNet backbones, exact to the authors' model and registered in timm, with Lightning tasks.

``import fishnet_pl`` registers the FishNet variants in timm (``timm.create_model("fishnet150")``,
smp's ``encoder_name="tu-fishnet150"``). The Lightning parts load on first use, so the backbone alone
needs neither Lightning nor the task dependencies.
"""

import importlib

from fishnet_pl.malloc import keep_freed_memory  # noqa: F401
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
    fuse_for_inference,
    list_backbones,
    load_backbone_weights,
    load_official_weights,
)

_LAZY = {"FishNetModule": "fishnet_pl.module", "TaskHead": "fishnet_pl.tasks", "ClassificationHead": "fishnet_pl.tasks",
         "SegmentationHead": "fishnet_pl.tasks", "DetectionHead": "fishnet_pl.tasks",
         "load_network": "fishnet_pl.inference"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fishnet_pl' has no attribute {name!r}")
