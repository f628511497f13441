"""Trained models outside Lightning: ``load_network`` rebuilds a task's plain network from our ``.ckpt``.

Only torch, timm and the task's library (smp, torchvision) are needed; Lightning is never imported, so a
checkpoint trained with ``fishnet-pl fit`` serves in any PyTorch program.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from fishnet_pl.models.fuse import fuse_for_inference
from fishnet_pl.models.registry import check_backbone_name
from fishnet_pl.models.weights import CKPT_CLASS_NAMES_KEY
from fishnet_pl.tasks.base import TaskHead, as_head

NETWORK_PREFIX = "network."


def read_checkpoint(ckpt_path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Our Lightning checkpoint as a dict (``torch.load`` with ``weights_only=True``: no code runs).

    ``mmap``: map the tensors instead of reading them (a quick look at a large file). A missing, truncated or
    foreign file raises an error naming it.
    """
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"{ckpt_path}: checkpoint file does not exist")
    try:
        ckpt = torch.load(ckpt_path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # zip, pickle and weights_only errors differ: all mean "not a checkpoint we can read"
        raise ValueError(f"{ckpt_path}: cannot be read as a PyTorch checkpoint; the file is truncated (a copy or "
                         f"a save that did not finish) or not a checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ValueError(f"{ckpt_path}: not a fishnet-pl Lightning checkpoint (no state_dict / hyper_parameters)")
    return ckpt


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


def preprocessing(network: nn.Module, head: TaskHead) -> dict[str, Any]:
    """What the network expects of its input, from the backbone's timm ``pretrained_cfg``."""
    cfg = network.get_submodule(head.backbone_path).pretrained_cfg
    mean, std = cfg["mean"], cfg["std"]
    if hasattr(head, "mean"):  # the head's normalisation, which also covers other input channel counts
        mean, std = head.mean.flatten().tolist(), head.std.flatten().tolist()
    info: dict[str, Any] = {"mean": tuple(mean), "std": tuple(std),
                            "input_size": tuple(cfg.get("input_size", (3, 224, 224))),
                            "crop_pct": cfg.get("crop_pct"), "interpolation": cfg.get("interpolation")}
    if hasattr(head, "pad_multiple"):  # segmentation: input sides must be multiples of the backbone's stride
        info["pad_multiple"] = int(head.pad_multiple)
    if hasattr(head, "max_size"):  # detection: the detector resizes each image itself
        info["min_size"], info["max_size"] = head.min_size, head.max_size
    return info


def load_network(ckpt_path: str | os.PathLike, map_location: Any = "cpu", fuse: bool = False) -> nn.Module:
    """The trained task network of a fishnet-pl checkpoint, as a plain ``nn.Module`` in eval mode.

    Classification gives the timm classifier, segmentation smp's own model (so ``save_pretrained`` /
    ``smp.from_pretrained`` work), detection torchvision's Faster / Mask R-CNN. The network takes
    *normalised* images, except the detector, which normalises (and resizes) [0, 1] images itself; the
    attributes say how:

    - ``net.preprocessing``: ``mean``, ``std`` (normalise [0, 1] images with these), ``input_size``,
      ``crop_pct``, ``interpolation`` (the backbone's timm ``pretrained_cfg``); for segmentation
      ``pad_multiple`` (input sides must be multiples of it: pad, then crop the logits); for detection
      ``min_size``, ``max_size`` (the detector's own resize).
    - ``net.class_names``: the training datamodule's class names (index = label; for detection label - 1),
      or None when the checkpoint has none.

    ``fuse=True`` gives ``fuse_for_inference``'s faster eval-only network (BatchNorms folded into the
    convolutions), whose state dict then no longer matches the architecture's: keep the default for
    ``save_pretrained`` or further training. ``fishnet_pl.export`` exports the fused network, wrapped with its
    normalisation, to ONNX and ``torch.export``.
    """
    ckpt = read_checkpoint(ckpt_path, map_location)
    network, head = build_from_checkpoint(ckpt)
    if fuse:
        network = fuse_for_inference(network)
    network.preprocessing = preprocessing(network, head)
    names = ckpt.get(CKPT_CLASS_NAMES_KEY)
    network.class_names = list(names) if names is not None else None
    return network
