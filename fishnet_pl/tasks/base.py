"""The interface between ``FishNetModule`` and a task: classification, segmentation, detection.

A head builds the task's plain network (which owns its backbone, any timm model) and owns the
loss, metrics and post-processing, and everything else that differs per task: the files its predictions
and results become (``write_predictions``, ``write_results``), what a deployed network needs of its input
(``preprocessing``) and how it exports (``export_wrapper``). The module holds the network and owns the loop,
the optimizer and schedule, logging and checkpoints; generic callbacks (``fishnet_pl.writers``) do Lightning's
part of writing files and ask the head for their content. So a new task is one file under ``fishnet_pl/tasks/``.

A head never sees the trainer, nor holds the network as a sub-module (each weight lives once, under the
module's ``network.``): its methods are handed it. A head is configured by plain constructor arguments
(so LightningCLI can show and set them) and stores each under the same attribute name, so ``config()``
can rebuild it from a checkpoint. Heads import no Lightning: ``fishnet_pl.inference.load_network`` serves
plain PyTorch programs.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from datamodules.dataset_info import DatasetInfo


class TaskHead(nn.Module):
    """Base class of task heads. Subclasses implement every method below that raises, except the optional
    ``write_predictions`` and ``write_results``; the defaults of ``preprocessing`` and ``export_wrapper`` serve a
    network that maps normalised images to one tensor per image (a classifier)."""

    #: Metric that ModelCheckpoint watches (logged at validation epoch end), and its direction.
    monitor: str = "val/loss"
    monitor_mode: str = "min"
    #: The headline numbers shown in the progress bar (training and evaluation logs, names without the stage);
    #: every other number goes to the loggers only.
    progress_bar: tuple[str, ...] = ("loss",)
    #: Where the timm backbone sits in the network ("" = the network is the backbone).
    backbone_path: str = ""
    #: What the training data declared (``set_dataset_info``): class names, palette, category ids, ...
    dataset_info: DatasetInfo = DatasetInfo()

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

    def set_dataset_info(self, info: DatasetInfo) -> None:
        """What the data declares (``datamodules.dataset_info``); the module passes the datamodule's at set-up,
        the one a checkpoint recorded when loaded from it. A head checks here that the data fits it."""
        self.dataset_info = info

    @property
    def class_names(self) -> list[str] | None:
        """The dataset's class names, when known (index = label; for detection label - 1)."""
        return self.dataset_info.class_names

    def predict_step(self, network: nn.Module, batch: dict) -> list[dict[str, Any]]:
        """One record per input image (plain values and CPU tensors), with the image's ``path`` as read;
        ``write_predictions`` turns them into files."""
        raise NotImplementedError

    def write_predictions(self, records: list[dict[str, Any]], paths: list[str], folder: Path, first: bool) -> None:
        """Write one predict batch's files (optional: without it, ``trainer.predict`` only returns the records).

        Called by ``fishnet_pl.writers.PredictionWriter``, which owns the folder, the DDP rank folders and the
        refusal to overwrite an earlier run.

        Args:
            records: ``predict_step``'s records of the batch.
            paths: where each record's outputs go, relative to ``folder`` (POSIX, mirroring the input:
                ``a/img.jpg`` for ``<predict_root>/a/img.jpg``); add a suffix, e.g. ``a/img.jpg.png``.
            folder: this process's output folder (it exists; sub-folders do not).
            first: the run's first batch on this process: start files such as a JSON lines file afresh.
        """
        raise NotImplementedError

    def write_results(self, stage: str, folder: Path) -> None:
        """Write the results file of a validation or test epoch from ``self.metrics[stage]`` (optional; e.g.
        detection's COCO results). Called on the first process by ``fishnet_pl.writers.ResultsWriter`` once the
        metric is synchronised, with the run's log folder as ``folder``."""
        raise NotImplementedError

    @property
    def task(self) -> str:
        """The task's name in file names (``fishnet-pl export``): the class name without ``Head``, lower case."""
        return type(self).__name__.removesuffix("Head").lower()

    def preprocessing(self) -> dict[str, Any]:
        """What a deployed network needs of its input beyond the backbone's ``pretrained_cfg``
        (``fishnet_pl.inference.preprocessing`` adds it): here the normalisation ``set_normalization`` chose, which
        also covers other input channel counts; heads add their network's own rules."""
        mean, std = getattr(self, "mean", None), getattr(self, "std", None)  # set_normalization's buffers
        return {} if mean is None else {"mean": tuple(mean.flatten().tolist()), "std": tuple(std.flatten().tolist())}

    def export_wrapper(self, network: nn.Module, preprocessing: dict[str, Any], in_channels: int,
                       input_size: tuple[int, int] | None = None) -> ExportSpec:
        """The network as ``fishnet-pl export`` hands it to torch's exporters.

        Here: ``images`` float [B, C, H, W] in [0, 1] -> ``logits`` [B, ...], normalised inside the graph; the
        batch is dynamic, H and W are fixed to ``input_size``, by default the evaluation crop
        (``preprocessing["input_size"]``, the checkpoint's record or the backbone's ``pretrained_cfg``).

        Args:
            network: the task network, eval mode (BatchNorms folded).
            preprocessing: ``fishnet_pl.inference.preprocessing`` of the checkpoint.
            in_channels: the network's input channels.
            input_size: (H, W) of the example input, when the user sets it.
        """
        from torch.export import Dim

        h, w = input_size or tuple(preprocessing["input_size"][-2:])
        return ExportSpec(NormalizedNetwork(network, preprocessing["mean"], preprocessing["std"]).eval(),
                          torch.rand(2, in_channels, h, w), ["images"], ["logits"],
                          dynamic_shapes={"images": {0: Dim("batch", min=1, max=1024)}})

    def config(self) -> dict[str, Any]:
        """``{"class_path", "init_args"}`` that rebuilds this head (stored in checkpoints)."""
        # A head without an __init__ of its own has nn.Module's (*args, **kwargs): no arguments.
        names = [name for name, p in inspect.signature(type(self).__init__).parameters.items()
                 if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}",
                "init_args": {name: getattr(self, name) for name in names}}


@dataclass
class ExportSpec:
    """A head's network as ``fishnet-pl export`` hands it to torch's exporters (``TaskHead.export_wrapper``).

    Attributes:
        module: what to export, eval mode; takes what a deployed program feeds (float images in [0, 1]).
        example: an input of the export size.
        input_names, output_names: the graph's input and output names.
        dynamic_shapes: ``torch.export``'s dynamic dimensions (pt2 and the dynamo-based ONNX exporter).
        dynamic_axes: set instead for a network that only the TorchScript-based ONNX exporter takes
            (``dynamo=False``): its dynamic axes.
        opset: the ONNX opset unless the user gives one; None: the exporter's default.
        pt2_unsupported: why ``torch.export`` cannot take this network, if it cannot (export raises with it).
    """

    module: nn.Module
    example: torch.Tensor
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: dict[str, dict[int, Any]] | None = None
    dynamic_axes: dict[str, dict[int, str]] | None = None
    opset: int | None = None
    pt2_unsupported: str | None = None


class NormalizedNetwork(nn.Module):
    """The task network behind its input normalisation: takes float images in [0, 1], [B, C, H, W]."""

    def __init__(self, network: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network((images - self.mean) / self.std)


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
    if head is None:  # by class path: the heads import this module, not the other way round
        head = {"class_path": "fishnet_pl.tasks.classification.ClassificationHead"}
    if isinstance(head, TaskHead):
        return head
    if isinstance(head, dict) and "class_path" in head:
        module, _, name = head["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module), name, None)
        if not (isinstance(cls, type) and issubclass(cls, TaskHead)):
            raise ValueError(f"head class_path {head['class_path']!r} is not a fishnet_pl TaskHead")
        return cls(**head.get("init_args", {}))
    raise TypeError(f"head must be a TaskHead or a class_path/init_args dict, got {type(head).__name__}")
