"""Name registry of backbones: ``create_backbone("fishnet150", num_classes=10)``."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable

from torch import nn

_BACKBONES: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a factory under its function name (decorator)."""
    if factory.__name__ in _BACKBONES:
        raise ValueError(f"backbone {factory.__name__!r} is registered twice")
    _BACKBONES[factory.__name__] = factory
    return factory


def list_backbones(pattern: str = "*") -> list[str]:
    """Sorted names of registered backbones matching a shell-style pattern."""
    return sorted(name for name in _BACKBONES if fnmatch.fnmatch(name, pattern))


def create_backbone(name: str, **kwargs) -> nn.Module:
    """Build a registered backbone by name; an unknown name raises with the closest names."""
    if name not in _BACKBONES:
        close = difflib.get_close_matches(name, _BACKBONES, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"Unknown backbone {name!r}.{hint} Available: {', '.join(list_backbones())}")
    return _BACKBONES[name](**kwargs)
