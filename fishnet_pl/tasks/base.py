"""The interface between ``FishNetModule`` and a task: classification, segmentation, detection.

A head builds the task's plain network (which owns its backbone, any timm model) and owns the
loss, metrics and post-processing; the module holds the network and owns the loop, the optimizer
and schedule, logging and checkpoints; callbacks (``fishnet_pl.callbacks``) write result files. A head
never sees the trainer, nor holds the network as a sub-module (each weight lives once, under the
module's ``network.``): its methods are handed it. A head is configured by plain constructor arguments
(so LightningCLI can show and set them) and stores each under the same attribute name, so ``config()``
can rebuild it from a checkpoint.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


class TaskHead(nn.Module):
    """Base class of task heads. Subclasses implement every method below that raises."""

    #: Metric that ModelCheckpoint watches (logged at validation epoch end), and its direction.
    monitor: str = "val/loss"
    monitor_mode: str = "min"
    #: The headline numbers shown in the progress bar (training and evaluation logs, names without the stage);
    #: every other number goes to the loggers only.
    progress_bar: tuple[str, ...] = ("loss",)
    #: Where the timm backbone sits in the network ("" = the network is the backbone).
    backbone_path: str = ""
    #: The dataset's class names, when known (``set_class_names``).
    class_names: list[str] | None = None

    def build(self, backbone: str, num_classes: int, in_chans: int) -> nn.Module:
        """Create the network on the timm model ``backbone`` and the head's metrics ``self.metrics``
        (``{"val": Metric, "test": Metric}``, torchmetrics metrics whose ``compute()`` gives a dict of
        scalars, synchronised over processes); return the network."""
        raise NotImplementedError

    def set_normalization(self, backbone: nn.Module, in_chans: int) -> None:
        """Normalise inputs (float images in [0, 1]) with the backbone's ``pretrained_cfg`` mean and std."""
        mean, std = channel_normalization(backbone.pretrained_cfg["mean"], backbone.pretrained_cfg["std"], in_chans)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std

    def forward(self, network: nn.Module, images: Any) -> Any:
        """Inference output of the whole model for a batch of images."""
        raise NotImplementedError

    def training_step(self, network: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss to back-propagate and scalars to log (names without the ``train/`` prefix)."""
        raise NotImplementedError

    def evaluation_step(self, network: nn.Module, batch: dict, stage: str) -> None:
        """Update ``self.metrics[stage]`` ("val" or "test") with one batch."""
        raise NotImplementedError

    def set_class_names(self, names: list[str] | None) -> None:
        """The dataset's class names (for per-class metric names); the module passes the datamodule's."""
        self.class_names = names

    def predict_step(self, network: nn.Module, batch: dict) -> list[dict[str, Any]]:
        """One record per input image (plain values and CPU tensors); the task's prediction-writer
        callback (``fishnet_pl.callbacks``) turns them into files."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """``{"class_path", "init_args"}`` that rebuilds this head (stored in checkpoints)."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}",
                "init_args": {name: getattr(self, name) for name in names}}


def channel_normalization(mean: Sequence[float], std: Sequence[float], in_chans: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std [1, C, 1, 1] for ``in_chans`` input channels: the backbone's for as many channels as
    it has, otherwise one mean and one std (their averages) for every channel."""
    mean_t, std_t = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    if in_chans != len(mean_t):
        mean_t, std_t = mean_t.mean().repeat(in_chans), std_t.mean().repeat(in_chans)
    return mean_t.view(1, -1, 1, 1), std_t.view(1, -1, 1, 1)


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
