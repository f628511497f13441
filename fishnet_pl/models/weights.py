"""Start any timm backbone from a file (or a task's whole network from one of our checkpoints), and freeze its
first stages.

A weights file can be an official FishNet checkpoint, a timm or torchvision checkpoint of the same
architecture, or one of our Lightning ``.ckpt`` files of any task. Whatever its layout, it is first
brought to the layout of the timm *classifier* of that name and checked against it key by key (a
missing, extra or wrongly shaped tensor is an error naming the file); then it is copied into the
backbone as the task holds it: the classifier itself, or timm's ``features_only`` wrapper of it
(``FeatureGetterNet`` for FishNet, ``FeatureListNet`` for ResNet, DenseNet, ...), whose keys differ
from the classifier's only by a ``model.`` prefix or by flattened ``nn.Sequential`` names.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Mapping

import timm
import torch
from timm.models import adapt_input_conv, group_parameters
from timm.models._features import _module_list
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fishnet_pl.checkpoint import read_checkpoint, read_weights
from fishnet_pl.models.architecture import FishNet
from fishnet_pl.models.official import is_official_layout, to_our_layout
from fishnet_pl.models.pretrained import resolve_weights

log = logging.getLogger(__name__)


@functools.cache
def _classifier(name: str) -> nn.Module:
    """The timm classifier of this name on the meta device: its layout, without memory."""
    with torch.device("meta"):
        return timm.create_model(name)


@functools.cache
def _classifier_keys(name: str) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in _classifier(name).state_dict().items()}


def to_classifier_key(name: str, key: str) -> str | None:
    """A backbone key (classifier, or timm features wrapper) as the classifier ``name`` calls it."""
    keys = _classifier_keys(name)
    if key in keys:
        return key
    if key.startswith("model.") and key[6:] in keys:  # FeatureGetterNet holds the model as .model
        return key[6:]
    flattened = _flattened_names(name)  # FeatureListNet flattens top-level Sequentials: layer1_0 = layer1.0
    head, _, rest = key.partition(".")
    if head in flattened and f"{flattened[head]}.{rest}" in keys:
        return f"{flattened[head]}.{rest}"
    return None


@functools.cache
def _flattened_names(name: str) -> dict[str, str]:
    return {new: old for new, old, _ in _module_list(_classifier(name), flatten_sequential=True) if new != old}


def read_backbone_weights(path: str | os.PathLike, name: str, needed: set[str] | None = None
                          ) -> dict[str, torch.Tensor]:
    """The backbone tensors of a weights file, in the layout of the timm classifier ``name``, checked.

    Every tensor of ``needed`` (classifier keys; default: the whole classifier) must be in the file, and
    nothing foreign; the classifier itself (``pretrained_cfg["classifier"]``) may be absent or of another
    size, and the stem's first convolution may have other input channels.
    """
    state = read_weights(path, name)  # our checkpoints' backbone, or the file's state dict
    classifier = _classifier(name)
    if isinstance(classifier, FishNet) and is_official_layout(state):
        try:
            state = to_our_layout(state, classifier.cfg)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    else:
        state = _model_filter(classifier)(state)
    mapped, unknown = {}, []
    for key, value in state.items():
        target = to_classifier_key(name, key)
        (unknown.append(key) if target is None else mapped.__setitem__(target, value))
    _check(path, name, mapped, unknown, needed)
    return mapped


def _model_filter(classifier: nn.Module):
    """timm's own converter of foreign layouts for this family (e.g. torchvision's DenseNet keys), if any."""
    module = sys.modules[type(classifier).__module__]
    fn = getattr(module, "_filter_torchvision_pretrained", None) or getattr(module, "checkpoint_filter_fn", None)
    if fn is None:
        return lambda state: state
    return lambda state: fn(state) if fn.__code__.co_argcount == 1 else fn(state, classifier)


def _check(path, name: str, state: Mapping[str, torch.Tensor], unknown: list[str], needed: set[str] | None) -> None:
    keys, cfg = _classifier_keys(name), _classifier(name).pretrained_cfg
    head = tuple(f"{c}." for c in _as_tuple(cfg.get("classifier")))
    first = tuple(f"{c}.weight" for c in _as_tuple(cfg.get("first_conv")))
    wanted = [k for k in keys if needed is None or k in needed]
    missing = [k for k in wanted if k not in state and not k.startswith(head) and not k.endswith("num_batches_tracked")]
    mismatched = [f"{k}: file {tuple(state[k].shape)}, model {tuple(keys[k])}" for k in state
                  if k in keys and state[k].shape != keys[k] and not k.startswith(head) and k not in first]
    if missing or unknown or mismatched:
        raise ValueError(f"{path}: not a checkpoint of {name} ({len(missing)} missing, {len(unknown)} unexpected, "
                         f"{len(mismatched)} mismatched tensors; was it another architecture or variant?)\n  "
                         f"missing: {missing[:6]}\n  unexpected: {unknown[:6]}\n  mismatched: {mismatched[:6]}")


def _as_tuple(value) -> tuple:
    return () if value is None else (value,) if isinstance(value, str) else tuple(value)


def load_backbone_weights(backbone: nn.Module, name: str, path: str | os.PathLike) -> list[str]:
    """Load a weights file (see module docstring) into ``backbone``, the timm model ``name`` as a task
    holds it; returns the file's tensors left out (a classifier of another size, or absent layers).
    ``path`` may also name the authors' released weights (``fishnet150``, ``fishnet150.welltrained_in1k``, ...:
    ``pretrained.resolve_weights`` downloads them once into torch's hub cache)."""
    path = resolve_weights(path, name)
    ours = backbone.state_dict()
    state = read_backbone_weights(path, name, {to_classifier_key(name, k) for k in ours} - {None})
    cfg = _classifier(name).pretrained_cfg
    first = {f"{c}.weight" for c in _as_tuple(cfg.get("first_conv"))}
    to_load, used = {}, set()
    for key, target in ours.items():
        source = to_classifier_key(name, key)
        if source not in state:
            continue  # a new classifier, or a BN counter the file lacks
        value = state[source]
        if source in first and value.shape != target.shape:
            value = adapt_input_conv(target.shape[1], value)
        if value.shape == target.shape:
            to_load[key] = value
            used.add(source)
    result = backbone.load_state_dict(to_load, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")
               and to_classifier_key(name, k) not in _head_keys(name)]
    if missing:
        raise ValueError(f"{path}: {len(missing)} backbone tensors were not in the file: {missing[:6]}")
    dropped = sorted(set(state) - used)
    log.info("%s: loaded %d tensors into %s, left out %s", path, len(to_load), name, dropped)
    return dropped


def load_task_network(network: nn.Module, path: str | os.PathLike, *, head: str, backbone: str, num_classes: int,
                      in_channels: int, backbone_path: str) -> None:
    """Load the whole network (backbone and decoder) of one of our single-task checkpoints into ``network``, the
    same task's network as a multi-task run builds it (``MultiTaskHead(task_weights=...)``).

    The file must be a checkpoint of the head class ``head`` (its ``class_path``) on ``backbone`` with
    ``num_classes`` classes and ``in_channels``, else an error names the file and what differs; then every tensor
    must match by key and shape. The network's backbone at ``backbone_path`` may hold more than the file (the
    shared backbone keeps the classifier layers a single-task encoder prunes); those keep their values.
    """
    ckpt = read_checkpoint(path)
    hp = ckpt["hyper_parameters"]
    found = {"task": (hp.get("head") or {}).get("class_path"), "backbone": hp.get("backbone"),
             "num_classes": hp.get("num_classes"), "in_channels": hp.get("in_channels", 3)}
    expected = {"task": head, "backbone": backbone, "num_classes": num_classes, "in_channels": in_channels}
    differ = [f"{key} {found[key]!r} (this task's: {expected[key]!r})" for key in expected
              if found[key] != expected[key]]
    if differ:
        raise ValueError(f"{path}: not a checkpoint of this task; its {', '.join(differ)}")
    state = {k.removeprefix("network."): v for k, v in ckpt["state_dict"].items() if k.startswith("network.")}
    ours = network.state_dict()
    prefix = f"{backbone_path}." if backbone_path else None
    missing = [k for k in ours if k not in state and not (prefix and k.startswith(prefix))]
    unexpected = [k for k in state if k not in ours]
    mismatched = [f"{k}: file {tuple(v.shape)}, model {tuple(ours[k].shape)}" for k, v in state.items()
                  if k in ours and v.shape != ours[k].shape]
    if missing or unexpected or mismatched:
        raise ValueError(f"{path}: its network differs from this task's ({len(missing)} missing, {len(unexpected)} "
                         f"unexpected, {len(mismatched)} mismatched tensors; were the head's arguments other?)\n  "
                         f"missing: {missing[:6]}\n  unexpected: {unexpected[:6]}\n  mismatched: {mismatched[:6]}")
    network.load_state_dict(state, strict=False)


def _head_keys(name: str) -> set[str]:
    head = tuple(f"{c}." for c in _as_tuple(_classifier(name).pretrained_cfg.get("classifier")))
    return {k for k in _classifier_keys(name) if k.startswith(head)}


# ---------------------------------------------------------------------- freezing
def stage_count(name: str) -> int:
    """How many stages ``frozen_stages`` can freeze: timm's coarse parameter groups before the classifier."""
    return len(_stage_groups(name))


@functools.cache
def _stage_groups(name: str) -> list[frozenset[str]]:
    classifier = _classifier(name)
    groups = group_parameters(classifier, classifier.group_matcher(coarse=True))
    head = _head_keys(name)
    return [frozenset(g) for g in groups.values() if not set(g) & head]


def freeze(backbone: nn.Module, name: str, frozen_stages: int = 0, freeze_bn: bool = False) -> None:
    """Stop training the first ``frozen_stages`` stages (timm's coarse groups of ``name``: FishNet's
    stem, tail.0-2, bridge, body.0-2, head.0-2; ResNet's stem, layer1-4) and, with ``freeze_bn``, every
    BatchNorm. Frozen parameters get no gradient; frozen BatchNorms keep their statistics because
    ``keep_frozen_norms_in_eval`` puts them back in eval mode whenever the model is put in training."""
    if not 0 <= frozen_stages <= stage_count(name):
        raise ValueError(f"frozen_stages must be in 0..{stage_count(name)} for {name}, got {frozen_stages}")
    frozen = set().union(*_stage_groups(name)[:frozen_stages])
    for key, param in backbone.named_parameters():
        if to_classifier_key(name, key) in frozen:
            param.requires_grad_(False)
    if freeze_bn:
        for m in backbone.modules():
            if isinstance(m, _BatchNorm):
                m.requires_grad_(False)


def keep_frozen_norms_in_eval(model: nn.Module) -> None:
    """BatchNorms whose affine parameters are frozen stay in eval mode (their running statistics fixed)."""
    for m in model.modules():
        if isinstance(m, _BatchNorm) and m.weight is not None and not m.weight.requires_grad:
            m.eval()

