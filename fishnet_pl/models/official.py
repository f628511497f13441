"""Load the authors' released FishNet checkpoints (``fishnet150_ckpt.tar`` etc.) into ``FishNet``.

Our module names are cleaner than the authors' nested lists (``fish.fish.4.1.0.conv1`` is the first
transfer block of the first body stage); one explicit table translates them, every shape is
checked, and a missing or extra key is an error.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from typing import NamedTuple

import torch
from timm.models import adapt_input_conv

from fishnet_pl.checkpoint import read_state_dict
from fishnet_pl.models.architecture import VARIANT_CONFIGS, FishNet, FishNetConfig

# (our name pattern, the authors' name); the authors' fish.fish.<i> index stages 0..9.
_RENAMES = [
    (r"stem\.conv(\d)\.(.+)", r"conv\1.\2"),
    (r"tail\.(\d)\.blocks\.(.+)", lambda m: f"fish.fish.{int(m[1])}.0.{m[2]}"),
    (r"bridge\.expand\.([0-4])\.(.+)", r"fish.fish.3.0.\1.\2"),  # the bridge's score BN-ReLU-conv-BN-ReLU
    (r"bridge\.expand\.5\.(.+)", r"fish.fish.3.1.\1"),  # its 1x1 conv to 2C
    (r"bridge\.blocks\.(.+)", r"fish.fish.3.2.\1"),
    (r"bridge\.attention\.(.+)", r"fish.fish.3.3.0.\1"),
    (r"body\.(\d)\.blocks\.(.+)", lambda m: f"fish.fish.{4 + int(m[1])}.0.{m[2]}"),
    (r"body\.(\d)\.transfer\.(.+)", lambda m: f"fish.fish.{4 + int(m[1])}.1.{m[2]}"),
    (r"head\.(\d)\.blocks\.(.+)", lambda m: f"fish.fish.{7 + int(m[1])}.0.{m[2]}"),
    (r"head\.(\d)\.transfer\.(.+)", lambda m: f"fish.fish.{7 + int(m[1])}.1.{m[2]}"),
    (r"pre_logits\.(.+)", r"fish.fish.9.3.\1"),
    (r"fc\.(.+)", r"fish.fish.9.4.1.\1"),
]
_RENAMES = [(re.compile(pattern), repl) for pattern, repl in _RENAMES]
# The score layers: absent from a features-only backbone, replaced when fine-tuning to new classes.
_SCORE_PREFIXES = ("fish.fish.9.3.", "fish.fish.9.4.")
_FC_PREFIX = "fish.fish.9.4."


class LoadReport(NamedTuple):
    loaded: list[str]
    """Our parameter and buffer names that received checkpoint values."""
    dropped: list[str]
    """Checkpoint keys deliberately not loaded (score layers the model does not have or replaces)."""


def official_name(name: str) -> str:
    """The authors' state-dict key (without ``module.``) for one of our ``FishNet`` keys."""
    for pattern, repl in _RENAMES:
        if pattern.fullmatch(name):
            return pattern.sub(repl, name)
    raise KeyError(f"no official name for FishNet key {name!r}")


def official_state_dict_shapes(model: FishNet) -> dict[str, torch.Size]:
    """The authors' key -> shape layout for a model of this configuration."""
    return {official_name(k): v.shape for k, v in model.state_dict().items()}


def load_official_weights(model: FishNet, path_or_state_dict: str | os.PathLike | Mapping, *,
                          drop_classifier: bool = False) -> LoadReport:
    """Load an official FishNet checkpoint into ``model`` and return what was loaded and dropped.

    Accepts the released ``.tar`` files (a dict whose ``state_dict`` keys start with ``module.``)
    or a bare state dict, with or without the prefix. Every key of the model must be present
    with the same shape and the checkpoint may hold nothing else, except what the model does not
    have by construction: the score layers of a model without classifier, and the stages that
    timm's ``features_only`` pruned. With ``drop_classifier=True`` the final 1x1 conv keeps its
    initialisation (a new classifier). If ``in_chans`` is not 3, the stem's first convolution is
    adapted (timm's ``adapt_input_conv``) so pretrained inputs keep their scale.
    """
    state = read_state_dict(path_or_state_dict)
    ours = model.state_dict()
    wanted = {official_name(k): k for k in ours}
    full = {official_name(k) for k in _full_layout(model.cfg)}
    dropped = {k for k in state if k in full and (k not in wanted or (drop_classifier and k.startswith(_FC_PREFIX)))}

    stem_key = official_name("stem.conv1.0.weight")
    if stem_key in state and state[stem_key].shape[1] != model.in_chans:
        state = {**state, stem_key: adapt_input_conv(model.in_chans, state[stem_key])}

    missing = [k for k in wanted if k not in state and not (drop_classifier and k.startswith(_FC_PREFIX))]
    unexpected = [k for k in state if k not in wanted and k not in dropped]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(ours[wanted[k]].shape)}"
                  for k in wanted if k in state and k not in dropped and state[k].shape != ours[wanted[k]].shape]
    if missing or unexpected or mismatched:
        raise ValueError(_mismatch_message(model, state, missing, unexpected, mismatched))

    to_load = {wanted[k]: v for k, v in state.items() if k in wanted and k not in dropped}
    result = model.load_state_dict(to_load, strict=False)
    assert not result.unexpected_keys  # every key was mapped from the model's own names above
    return LoadReport(loaded=sorted(to_load), dropped=sorted(dropped))


def is_official_layout(state: Mapping) -> bool:
    """Whether a state dict has the authors' key names (``fish.fish.*``, maybe behind ``module.``)."""
    return any(k.removeprefix("module.").startswith("fish.fish.") for k in state)


def to_our_layout(state: Mapping, cfg: FishNetConfig) -> dict[str, torch.Tensor]:
    """The authors' state dict with our key names (timm's ``pretrained_filter_fn`` for FishNet).
    Shapes are checked by whoever loads it; a key with no counterpart is refused here."""
    names = {official_name(k): k for k in _full_layout(cfg)}
    state = read_state_dict(state)
    unknown = [k for k in state if k not in names]
    if unknown:
        raise ValueError(f"not a FishNet checkpoint of this layout: {len(unknown)} keys unknown, e.g. {unknown[:5]}")
    return {names[k]: v for k, v in state.items()}


@functools.cache
def _full_layout(cfg: FishNetConfig) -> dict[str, torch.Size]:
    """Our key -> shape of the whole classifier (1000 classes) of this configuration."""
    with torch.device("meta"):
        return {k: v.shape for k, v in FishNet(cfg).state_dict().items()}


def _mismatch_message(model: FishNet, state: Mapping, missing: list, unexpected: list, mismatched: list) -> str:
    lines = [f"checkpoint does not match this {_variant_of(model) or 'FishNet'} "
             f"({len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} mismatched keys)"]
    shapes = {k: v.shape for k, v in state.items() if not k.startswith(_SCORE_PREFIXES)}
    other = _variant_matching(shapes)
    if other:
        lines.append(f"the checkpoint has the layout of {other}: create that model instead")
    if not shapes:
        lines.append("it holds only score layers")
    if mismatched and all(k.startswith(_FC_PREFIX) for k in (m.split(":")[0] for m in mismatched)):
        lines.append("only the classifier differs: pass drop_classifier=True to fine-tune a new one")
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched)):
        if keys:
            more = f", ... ({len(keys) - 8} more)" if len(keys) > 8 else ""
            lines.append(f"{title}: " + ", ".join(keys[:8]) + more)
    return "\n  ".join(lines)


def _variant_of(model: FishNet) -> str | None:
    return next((name for name, cfg in VARIANT_CONFIGS.items() if model.cfg == cfg), None)


def _variant_matching(shapes: Mapping[str, torch.Size]) -> str | None:
    """The registered variant whose layout (score layers aside) equals these shapes, if any."""
    for name, cfg in VARIANT_CONFIGS.items():
        layout = {official_name(k): s for k, s in _full_layout(cfg).items()}
        if {k: s for k, s in layout.items() if not k.startswith(_SCORE_PREFIXES)} == dict(shapes):
            return name
    return None
