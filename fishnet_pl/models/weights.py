"""Start a backbone from a file: an official FishNet checkpoint or one of our Lightning checkpoints."""

from __future__ import annotations

import logging
import os

import torch

from fishnet_pl.models.fishnet import FishNet
from fishnet_pl.models.official import adapt_input_conv, load_official_weights

log = logging.getLogger(__name__)
_SCORE = ("pre_logits.", "fc.")


def load_backbone_weights(backbone: FishNet, path: str | os.PathLike) -> list[str]:
    """Load backbone weights from ``path`` and return the checkpoint keys that were dropped.

    ``.ckpt`` files written by ``FishNetModule`` (any task) give their ``backbone.*`` weights; any
    other file is read as an official FishNet checkpoint. The score layers are dropped when the
    backbone has none (dense tasks) or a different number of classes; every other key must match
    exactly, or a ``ValueError`` lists the keys that do not.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: backbone weights file does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not any(k.startswith("backbone.") for k in state):
        fc = next((v for k, v in (state or {}).items() if k.endswith("fish.fish.9.4.1.weight")), None)
        differs = fc is not None and not backbone.features_only and fc.shape[0] != backbone.num_classes
        report = load_official_weights(backbone, ckpt, drop_classifier=differs)
        log.info("%s: loaded %d official tensors, dropped %s", path, len(report.loaded), report.dropped)
        return report.dropped

    state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    ours = backbone.state_dict()
    dropped = [k for k in state if k.startswith(_SCORE) and (k not in ours or state[k].shape != ours[k].shape)]
    state = {k: v for k, v in state.items() if k not in dropped}
    stem = "stem.conv1.0.weight"
    if stem in state and state[stem].shape[1] != backbone.in_channels:
        state[stem] = adapt_input_conv(state[stem], backbone.in_channels)
    missing = [k for k in ours if k not in state and not k.startswith(_SCORE)]
    unexpected = [k for k in state if k not in ours]
    mismatched = [f"{k}: {tuple(state[k].shape)} vs {tuple(ours[k].shape)}"
                  for k in state if k in ours and state[k].shape != ours[k].shape]
    if missing or unexpected or mismatched:
        raise ValueError(f"{path}: backbone weights do not match this backbone: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}, mismatched {mismatched[:8]} (was it another variant?)")
    backbone.load_state_dict(state, strict=False)
    log.info("%s: loaded %d backbone tensors, dropped %s", path, len(state), dropped)
    return dropped
