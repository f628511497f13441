"""The interface between ``FishNetModule`` and a task: classification, segmentation, detection.

A head builds the task's plain network (which owns its backbone, any timm model) and owns the
loss, metrics and post-processing; the module holds the network and owns the loop, the optimizer
and schedule, logging and checkpoints. The head never holds the network as a sub-module (each
weight lives once, under the module's ``network.``): its methods are handed it. A head is configured by
plain constructor arguments (so LightningCLI can show and set them) and stores each under the
same attribute name, so ``config()`` can rebuild it from a checkpoint.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn


class TaskHead(nn.Module):
    """Base class of task heads. Subclasses implement every method below that raises."""

    #: Metric that ModelCheckpoint watches (logged at validation epoch end), and its direction.
    monitor: str = "val/loss"
    monitor_mode: str = "min"
    #: Where the timm backbone sits in the network ("" = the network is the backbone).
    backbone_path: str = ""

    def build(self, backbone: str, num_classes: int, in_chans: int) -> nn.Module:
        """Create the network on the timm model ``backbone`` and the head's metrics; return the network."""
        raise NotImplementedError

    def set_normalization(self, backbone: nn.Module) -> None:
        """Normalise inputs (float images in [0, 1]) with the backbone's ``pretrained_cfg`` mean and std."""
        cfg = backbone.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, -1, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] != self.mean.shape[1]:  # other input channels: one mean/std for all
            return (images - self.mean.mean()) / self.std.mean()
        return (images - self.mean) / self.std

    def forward(self, network: nn.Module, images: Any) -> Any:
        """Inference output of the whole model for a batch of images."""
        raise NotImplementedError

    def training_step(self, network: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss to back-propagate and scalars to log (names without the ``train/`` prefix)."""
        raise NotImplementedError

    def evaluation_step(self, network: nn.Module, batch: dict, stage: str) -> dict[str, Any]:
        """Update ``stage``'s metrics ("val" or "test"); return per-step scalars or Metric objects to log."""
        raise NotImplementedError

    def evaluation_epoch_end(self, stage: str, trainer: Any) -> dict[str, torch.Tensor]:
        """Scalars computed once per epoch over all processes (e.g. per-class IoU, COCO AP); the head
        resets what it computed. ``trainer`` gives ``log_dir`` and ``datamodule`` for result files."""
        return {}

    def predict_step(self, network: nn.Module, batch: dict) -> list[dict[str, Any]]:
        """One record per input image (plain values and CPU tensors)."""
        raise NotImplementedError

    def write_predictions(self, records: list[dict[str, Any]], out_dir: Path, datamodule: Any, first: bool) -> None:
        """Save the records of one predict batch under ``out_dir`` (files a person can read);
        ``first`` marks the first batch of the run, so files from an earlier run are replaced."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """``{"class_path", "init_args"}`` that rebuilds this head (stored in checkpoints)."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}",
                "init_args": {name: getattr(self, name) for name in names}}


def as_head(head: TaskHead | dict | None) -> TaskHead:
    """A head instance from an instance, a ``{"class_path", "init_args"}`` dict (as ``config()`` gives and
    checkpoints store), or None (classification). Needs no Lightning."""
    if head is None:
        from fishnet_pl.tasks.classification import ClassificationHead

        return ClassificationHead()
    if isinstance(head, TaskHead):
        return head
    if isinstance(head, dict) and "class_path" in head:
        module, _, name = head["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module), name, None)
        if not (isinstance(cls, type) and issubclass(cls, TaskHead)):
            raise ValueError(f"head class_path {head['class_path']!r} is not a fishnet_pl TaskHead")
        return cls(**head.get("init_args", {}))
    raise TypeError(f"head must be a TaskHead or a class_path/init_args dict, got {type(head).__name__}")
