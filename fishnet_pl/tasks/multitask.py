"""Several tasks on one backbone: named sub-heads whose networks share one timm backbone module.

Each sub-head builds its network as in a single-task run; the network's timm backbone (the classifier itself, or
the ``features_only`` wrapper a segmentation or detection network holds) is then rebuilt around one shared timm
model, so every task trains the same backbone weights and keeps its own decoder, loss, metrics and dataset info.

The first part of issue 23 (the model); the multi-task datamodule, predict, export and the quickstart are next.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from timm.models._features import FeatureGetterNet, FeatureListNet
from torch import nn

from datamodules.dataset_info import DatasetInfo
from fishnet_pl.models.registry import create_backbone
from fishnet_pl.tasks.base import ExportSpec, TaskHead, as_head


def share_backbone(network: nn.Module, path: str, shared: nn.Module) -> None:
    """Rebuild the timm backbone at ``path`` of a task network around ``shared`` (an unpruned timm model of the
    same architecture): the classifier itself is replaced by it, a ``features_only`` wrapper is made anew over its
    modules, with the same maps out."""
    old = network.get_submodule(path)
    if type(old) is type(shared):
        new = shared
    elif isinstance(old, FeatureGetterNet):  # FishNet's: forward_intermediates of the whole model
        new = FeatureGetterNet(shared, out_indices=old.out_indices, out_map=old.out_map, return_dict=old.return_dict,
                               output_fmt=old.output_fmt, norm=old.norm, prune=False)
    elif isinstance(old, FeatureListNet):  # most CNNs': the model's children, re-registered
        for flatten in (False, True):
            new = FeatureListNet(shared, out_indices=old.feature_info.out_indices, output_fmt=old.output_fmt,
                                 feature_concat=old.concat, flatten_sequential=flatten)
            if list(new._modules) == list(old._modules):
                break
        else:
            raise ValueError(f"cannot rebuild {type(old).__name__} at {path!r} around a shared backbone")
    else:
        raise ValueError(f"cannot share a {type(old).__name__} backbone (at {path!r}); sharing takes timm models "
                         "and their features_only wrappers")
    for name in ("pretrained_cfg", "default_cfg"):  # heads read the normalisation from them
        if hasattr(old, name):
            setattr(new, name, getattr(old, name))
    if new.feature_info.channels() != old.feature_info.channels():
        raise ValueError(f"the shared backbone gives maps of {new.feature_info.channels()} channels at {path!r}, "
                         f"the task network expects {old.feature_info.channels()}")
    network.set_submodule(path, new)


class MultiTaskNetwork(nn.Module):
    """The shared timm ``backbone`` and each task's network (``tasks``), whose backbones are views of it."""

    def __init__(self, backbone: nn.Module, tasks: dict[str, nn.Module]):
        super().__init__()
        self.backbone, self.tasks = backbone, nn.ModuleDict(tasks)


class TaskMetrics(nn.Module):
    """Each task's metric of one stage as one: ``compute()`` gives their numbers as ``<task>/<name>``."""

    def __init__(self, metrics: dict[str, nn.Module]):
        super().__init__()
        self.metrics = nn.ModuleDict(metrics)

    @property
    def update_called(self) -> bool:
        return any(m.update_called for m in self.metrics.values())

    def compute(self) -> dict[str, torch.Tensor]:
        return {f"{task}/{name}": value for task, metric in self.metrics.items() if metric.update_called
                for name, value in metric.compute().items()}

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()


class MultiTaskHead(TaskHead):
    """Named sub-heads (``cls``, ``seg``, ``det`` or any names; any of the task heads) on one shared backbone.

    Training batches hold a batch per task, ``{task: batch}`` (any subset of the tasks); the loss is the sum of the
    tasks' losses, each times ``loss_weights[task]`` (default 1), and every task's terms are logged as
    ``<task>/<name>`` with its ``<task>/weighted_loss``. Validation and test batches are one task's, named by their
    ``task`` key, and each task's metrics are logged as ``<stage>/<task>/<name>``. ``num_classes`` is a dict per
    task, and the data declares a ``DatasetInfo`` per task (``DatasetInfo.tasks``).

    Args:
        tasks: sub-heads by name: instances, or ``{"class_path", "init_args"}`` dicts as configs give them.
        loss_weights: weight of each task's loss in the sum (default 1 each).
        monitor_task: the task whose headline metric the best checkpoint follows (default: the first).
    """

    backbone_path = "backbone"

    def __init__(self, tasks: dict[str, Any], loss_weights: dict[str, float] | None = None,
                 monitor_task: str | None = None):
        super().__init__()
        if not tasks:
            raise ValueError("MultiTaskHead needs at least one task, e.g. {cls: ClassificationHead, ...}")
        heads = {name: as_head(head) for name, head in tasks.items()}
        unknown = sorted(set(loss_weights or {}) - set(heads))
        if unknown or (monitor_task is not None and monitor_task not in heads):
            raise ValueError(f"loss_weights and monitor_task name the tasks {sorted(heads)}; got "
                             f"{unknown or [monitor_task]}")
        self.heads = nn.ModuleDict(heads)
        self.tasks = {name: head.config() for name, head in heads.items()}  # plain values, for checkpoints
        self.loss_weights, self.monitor_task = dict(loss_weights or {}), monitor_task
        first = self.heads[monitor_task or next(iter(heads))]
        self.monitor = f"val/{monitor_task or next(iter(heads))}/{first.monitor.split('/', 1)[1]}"
        self.monitor_mode = first.monitor_mode
        self.progress_bar = ("loss", *(f"{name}/{metric}" for name, head in heads.items()
                                       for metric in head.progress_bar if metric != "loss"))

    def build(self, backbone: str, num_classes: dict[str, int], in_chans: int) -> nn.Module:
        if not isinstance(num_classes, dict) or set(num_classes) != set(self.heads):
            raise ValueError(f"a multi-task network needs num_classes per task {sorted(self.heads)}, got {num_classes}")
        networks = {name: head.build(backbone, num_classes[name], in_chans) for name, head in self.heads.items()}
        # The shared model: a classification task's network (it keeps its classifier), else a plain timm model.
        classifiers = [name for name, head in self.heads.items() if head.backbone_path == ""]
        shared = networks[classifiers[0]] if classifiers else create_backbone(backbone, num_classes=0,
                                                                               in_chans=in_chans)
        for name, head in self.heads.items():
            if head.backbone_path:
                share_backbone(networks[name], head.backbone_path, shared)
            elif networks[name] is not shared:
                raise ValueError(f"tasks {classifiers} are classifiers: one backbone holds one classifier")
        self.metrics = nn.ModuleDict({stage: TaskMetrics({name: head.metrics[stage]
                                                          for name, head in self.heads.items()})
                                      for stage in ("val", "test")})
        return MultiTaskNetwork(shared, networks)

    def set_dataset_info(self, info: DatasetInfo) -> None:
        """Each task's own ``DatasetInfo`` (``info.tasks``) goes to its head."""
        super().set_dataset_info(info)
        for name, head in self.heads.items():
            head.set_dataset_info((info.tasks or {}).get(name, DatasetInfo()))

    def forward(self, network: nn.Module, images: Any) -> dict[str, Any]:
        """Every task's inference output for the same images."""
        return {name: head(network.tasks[name], images) for name, head in self.heads.items()}

    def training_step(self, network: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        unknown = sorted(set(batch) - set(self.heads))
        if unknown:
            raise ValueError(f"a multi-task batch holds one batch per task {sorted(self.heads)}; got {unknown}")
        total, logs = 0.0, {}
        for name, task_batch in batch.items():
            loss, task_logs = self.heads[name].training_step(network.tasks[name], task_batch)
            weighted = self.loss_weights.get(name, 1.0) * loss
            total = total + weighted
            logs.update({f"{name}/{key}": value for key, value in task_logs.items()})
            logs[f"{name}/weighted_loss"] = weighted
        return total, {"loss": total, **logs}

    def evaluation_step(self, network: nn.Module, batch: dict, stage: str) -> None:
        name = batch.get("task")
        if name not in self.heads:
            raise ValueError(f"a multi-task evaluation batch names its task ('task': one of {sorted(self.heads)}); "
                             f"got {name!r}")
        self.heads[name].evaluation_step(network.tasks[name], batch, stage)

    def write_results(self, stage: str, folder: Path) -> None:
        """Each task's results files in ``<folder>/<task>/``."""
        for name, head in self.heads.items():
            if type(head).write_results is not TaskHead.write_results and head.metrics[stage].update_called:
                (folder / name).mkdir(parents=True, exist_ok=True)
                head.write_results(stage, folder / name)

    def export_wrapper(self, network: nn.Module, preprocessing: dict[str, Any], in_channels: int,
                       input_size: tuple[int, int] | None = None) -> ExportSpec:
        raise ValueError("a multi-task checkpoint exports one task at a time, which fishnet-pl export does not do "
                         "yet; use fishnet_pl.load_network in Python")
