"""Trained models outside Lightning: ``load_network`` rebuilds a task's plain network from our ``.ckpt``.

Only torch, timm and the task's library (smp, torchvision) are needed; Lightning is never imported, so a
checkpoint trained with ``fishnet-pl fit`` serves in any PyTorch program.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from timm.data import DEFAULT_CROP_PCT
from torch import nn

from datamodules.dataset_info import DatasetInfo
from fishnet_pl.checkpoint import read_checkpoint, recorded_dataset_info, task_info
from fishnet_pl.models.fuse import fuse_for_inference
from fishnet_pl.models.registry import check_backbone_name
from fishnet_pl.tasks.base import TaskHead, as_head
from fishnet_pl.tasks.multitask import MultiTaskNetwork

log = logging.getLogger(__name__)
NETWORK_PREFIX = "network."


def build_from_checkpoint(ckpt: dict[str, Any]) -> tuple[nn.Module, TaskHead]:
    """The plain network with the checkpoint's weights (eval mode), and the head that built it."""
    hp = ckpt["hyper_parameters"]
    head = as_head(hp.get("head"))
    backbone = hp.get("backbone", "fishnet150")
    check_backbone_name(backbone)
    network = head.build(backbone, hp.get("num_classes", 1000), hp.get("in_channels", 3))
    weights = {k[len(NETWORK_PREFIX):]: v for k, v in ckpt["state_dict"].items() if k.startswith(NETWORK_PREFIX)}
    network.load_state_dict(weights, strict=True)
    network.eval()
    return network, head


def preprocessing(network: nn.Module, head: TaskHead, data: DatasetInfo | None = None) -> dict[str, Any]:
    """What the network expects of its input: the evaluation transform of its training data, as ``fishnet-pl
    predict`` applies it.

    Args:
        network: the task network (``build_from_checkpoint``).
        head: the head that built it.
        data: what the checkpoint records of its training data (``recorded_dataset_info``), whose
            ``preprocessing`` describes the evaluation transform in plain values (``eval_preprocessing`` beside
            each datamodule's ``eval_transform``); None or without it: the backbone's timm ``pretrained_cfg``.

    Returns:
        ``mean``, ``std``: normalise float [0, 1] images with these.
        ``input_size`` (C, H, W), ``resize``, ``crop_pct``, ``interpolation``: classification's evaluation image,
        the shorter side resized to ``resize`` pixels, then the centre H x W crop (``crop_pct`` = H / ``resize``).
        A recorded transform's "bilinear" is OpenCV's ``INTER_LINEAR``, as albumentations resizes (PIL's
        antialiased bilinear differs slightly when shrinking). Without a record: timm's ``pretrained_cfg``, and
        ``resize`` = round(W / ``crop_pct``), as ``fishnet-pl fit`` picks it.
        Segmentation: ``scale`` when recorded (both sides times it, truncated to int). Then what the head adds
        (``TaskHead.preprocessing``): segmentation's ``pad_multiple`` (input sides must be multiples of it),
        detection's ``min_size``, ``max_size`` (the detector's own resize).
    """
    cfg = network.get_submodule(head.backbone_path).pretrained_cfg
    own = head.preprocessing()  # e.g. its normalisation (which also covers other channel counts), pad_multiple
    mean, std = own.get("mean", cfg["mean"]), own.get("std", cfg["std"])
    size = tuple(cfg.get("input_size", (3, 224, 224)))[-2:]
    crop_pct = cfg.get("crop_pct") or DEFAULT_CROP_PCT
    info: dict[str, Any] = {"mean": tuple(mean), "std": tuple(std), "input_size": (len(mean), *size),
                            "resize": round(size[-1] / crop_pct), "crop_pct": crop_pct,
                            "interpolation": cfg.get("interpolation")}
    data = data or DatasetInfo()
    recorded = dict(data.preprocessing)  # the datamodule's own description
    if "input_size" in recorded:
        recorded["input_size"] = (len(mean), *recorded["input_size"])
    info.update(recorded)
    if not recorded and data.predict.get("transform_kwargs"):
        log.warning("the checkpoint records its evaluation transform %r but not its plain description (saved by "
                    "an older fishnet-pl): preprocessing gives the backbone's pretrained_cfg, which may differ",
                    data.predict["transform"])
    info.update({k: v for k, v in own.items() if k not in ("mean", "std")})
    return info


def load_network(ckpt_path: str | os.PathLike, map_location: Any = "cpu", fuse: bool = False) -> nn.Module:
    """The trained task network of a fishnet-pl checkpoint, as a plain ``nn.Module`` in eval mode.

    Classification gives the timm classifier, segmentation smp's own model (so ``save_pretrained`` /
    ``smp.from_pretrained`` work), detection torchvision's Faster / Mask R-CNN. The network takes
    *normalised* images, except the detector, which normalises (and resizes) [0, 1] images itself; the
    attributes say how:

    - ``net.preprocessing``: ``mean``, ``std`` (normalise [0, 1] images with these), ``input_size``,
      ``resize``, ``crop_pct``, ``interpolation`` (classification: shorter side to ``resize``, centre crop
      to ``input_size``, as the training data's evaluation transform the checkpoint records, which
      ``fishnet-pl predict`` applies; else the backbone's timm ``pretrained_cfg``); for segmentation ``scale``
      (the recorded evaluation resize factor) and ``pad_multiple`` (input sides must be multiples of it: pad,
      then crop the logits); for detection ``min_size``, ``max_size`` (the detector's own resize). See
      ``preprocessing``.
    - ``net.class_names``: the training datamodule's class names (index = label; for detection label - 1),
      or None when the checkpoint has none.
    - Panoptic FPN: ``net.merge(output)`` turns one image's output (Mask R-CNN's detections and ``semantic``
      logits) into its panoptic map and segments, as ``fishnet-pl predict`` does (``PanopticHead.merge``).

    A multi-task checkpoint (``MultiTaskHead``) gives its ``MultiTaskNetwork``: ``net(images)`` takes float
    images in [0, 1], [B, C, H, W] and returns every task's output, ``{task: output}``, each what that task's
    network above gives (normalised inside where the task's network takes normalised images, padded for
    segmentation; the images must suit every task, e.g. a FishNet classifier's multiples of 32);
    ``net.task("seg")`` is one task's network, with the attributes above, sharing the backbone.
    ``net.preprocessing`` and ``net.class_names`` are those of every task, ``{task: ...}``.

    ``fuse=True`` gives ``fuse_for_inference``'s faster eval-only network (BatchNorms folded into the
    convolutions), whose state dict then no longer matches the architecture's: keep the default for
    ``save_pretrained`` or further training. ``fishnet_pl.export`` exports the fused network, wrapped with its
    normalisation, to ONNX and ``torch.export``.
    """
    ckpt = read_checkpoint(ckpt_path, map_location)
    network, head = build_from_checkpoint(ckpt)
    if fuse:
        network = fuse_for_inference(network)
    data = recorded_dataset_info(ckpt)
    if not isinstance(network, MultiTaskNetwork):
        return describe(network, head, data)
    for name, task in network.tasks.items():  # the fused copy shares its backbone among the tasks as well
        describe(task, head.heads[name], task_info(data, name))
    network.heads = head.heads
    network.preprocessing = {name: task.preprocessing for name, task in network.tasks.items()}
    network.class_names = {name: task.class_names for name, task in network.tasks.items()}
    return network


def describe(network: nn.Module, head: TaskHead, data: DatasetInfo) -> nn.Module:
    """``network`` with what ``load_network`` tells of a task network: ``preprocessing``, ``class_names`` and,
    for Panoptic FPN, ``merge``."""
    network.preprocessing = preprocessing(network, head, data)
    network.class_names = data.class_names
    if hasattr(head, "merge"):  # Panoptic FPN: the merge of one image's output into its panoptic map
        head.set_dataset_info(data)
        network.merge = head.merge
    return network
