"""Backbones by name: every timm model, FishNet's variants included (registered in timm on import).

``create_backbone`` is ``timm.create_model`` with an error that names close matches, so a typo in a
config fails at once with a hint; ``list_backbones`` is ``timm.list_models``.
"""

from __future__ import annotations

import difflib

import timm
from torch import nn


def list_backbones(pattern: str = "*") -> list[str]:
    """Sorted names of timm models (FishNet's among them) matching a shell-style pattern."""
    return timm.list_models(pattern)


def create_backbone(name: str, **kwargs) -> nn.Module:
    """``timm.create_model(name, **kwargs)``; an unknown name raises ``ValueError`` with the closest names.

    Typical kwargs: ``num_classes``, ``in_chans``, ``features_only``, ``out_indices``, ``output_stride``.
    """
    check_backbone_name(name)
    return timm.create_model(name, **kwargs)


def check_backbone_name(name: str) -> None:
    """Raise ``ValueError`` naming the closest timm models if ``name`` is not one."""
    if not timm.is_model(name.split(".")[0]):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"Unknown backbone {name!r}.{hint} Any timm model name works (timm.list_models()).")
