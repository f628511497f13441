"""The interface between ``FishNetModule`` and a task: classification, segmentation, detection.

A head owns its layers, its loss, its metrics and its post-processing. The module owns the
backbone, the loop, the optimizer and schedule, logging and checkpoints. A head is configured by
plain constructor arguments (so LightningCLI can show and set them) and stores each under the
same attribute name, so ``config()`` can rebuild it from a checkpoint.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fishnet_pl.models import FishNet


class TaskHead(nn.Module):
    """Base class of task heads. Subclasses implement every method below that raises."""

    #: Metric that ModelCheckpoint watches (logged at validation epoch end), and its direction.
    monitor: str = "val/loss"
    monitor_mode: str = "min"

    def backbone_kwargs(self, num_classes: int) -> dict[str, Any]:
        """Options this task needs from the FishNet constructor (e.g. ``features_only=True``)."""
        raise NotImplementedError

    def build(self, backbone: FishNet, num_classes: int) -> None:
        """Create the head's layers and metrics from ``backbone.feature_info``."""
        raise NotImplementedError

    def forward(self, backbone: FishNet, images: Any) -> Any:
        """Inference output of the whole model for a batch of images."""
        raise NotImplementedError

    def training_step(self, backbone: FishNet, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss to back-propagate and scalars to log (names without the ``train/`` prefix)."""
        raise NotImplementedError

    def evaluation_step(self, backbone: FishNet, batch: dict, stage: str) -> dict[str, Any]:
        """Update ``stage``'s metrics ("val" or "test"); return per-step scalars or Metric objects to log."""
        raise NotImplementedError

    def evaluation_epoch_end(self, stage: str, trainer: Any) -> dict[str, torch.Tensor]:
        """Scalars computed once per epoch over all processes (e.g. per-class IoU, COCO AP); the head
        resets what it computed. ``trainer`` gives ``log_dir`` and ``datamodule`` for result files."""
        return {}

    def predict_step(self, backbone: FishNet, batch: dict) -> list[dict[str, Any]]:
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
