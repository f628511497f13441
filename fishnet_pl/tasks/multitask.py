"""Several tasks on one backbone: named sub-heads whose networks share one timm backbone module.

Each sub-head builds its network as in a single-task run; the network's timm backbone (the classifier itself, or
the ``features_only`` wrapper a segmentation or detection network holds) is then rebuilt around one shared timm
model, so every task trains the same backbone weights and keeps its own decoder, loss, metrics and dataset info.

``MultiTaskNetwork`` is also what ``fishnet_pl.load_network`` gives of a multi-task checkpoint: every task's output
for one batch, or one task's network (``net.task(name)``), which ``fishnet-pl export --task`` exports.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
from timm.models._features import FeatureGetterNet, FeatureListNet
from torch import nn

from datamodules.dataset_info import DatasetInfo
from fishnet_pl.models.registry import create_backbone
from fishnet_pl.models.weights import load_task_network
from fishnet_pl.tasks.base import ExportSpec, TaskHead, as_head

log = logging.getLogger(__name__)


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
    """The shared timm ``backbone`` and each task's network (``tasks``), whose backbones are views of it.

    As ``fishnet_pl.load_network`` gives it, ``net(images)`` runs every task on one batch of float images in
    [0, 1], [B, C, H, W]: ``{task: output}``, each output what that task's single-task network gives (logits
    [B, K] of a classifier, logits [B, K, H, W] of segmentation, torchvision's list of detections per image). Each
    task takes the images as its head's ``forward`` does: normalised for the classifier and segmentation (whose
    networks take normalised images), padded for segmentation to multiples of its ``pad_multiple`` (the logits
    cropped back), as they are for the detector, which resizes and normalises itself. The images must suit every
    task (a FishNet classifier takes sides that are multiples of 32); ``net.task(name)`` is one task's network,
    as ``load_network`` gives a single-task one, for images of that task's own sizes.
    """

    def __init__(self, backbone: nn.Module, tasks: dict[str, nn.Module]):
        super().__init__()
        self.backbone, self.tasks = backbone, nn.ModuleDict(tasks)
        #: Each task's head, set by ``load_network``: how its network takes [0, 1] images (``forward``). Heads hold
        #: no weights (the state dict is the training run's); as sub-modules their normalisation follows ``.to()``.
        self.heads: nn.ModuleDict | None = None

    def task(self, name: str) -> nn.Module:
        """The network of the task ``name`` (sharing the backbone); raises naming the tasks if there is none."""
        if name not in self.tasks:
            raise ValueError(f"no task {name!r} in this multi-task network; its tasks are {list(self.tasks)}")
        return self.tasks[name]

    def forward(self, images: torch.Tensor) -> dict[str, Any]:
        """Every task's output for float images in [0, 1], [B, C, H, W] (see the class)."""
        if self.heads is None:
            raise RuntimeError("a multi-task network runs its tasks on [0, 1] images once it knows their heads: "
                               "load it with fishnet_pl.load_network, or call the FishNetModule")
        return {name: head(self.tasks[name], images) for name, head in self.heads.items()}

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """``torch.compile`` each task's network in place (``nn.Module.compile``): the heads call those, never this
        network, so compiling it alone would compile nothing that runs."""
        for network in self.tasks.values():
            network.compile(*args, **kwargs)


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
    tasks' terms, each task's loss times ``loss_weights[task]`` (default 1), or with ``loss_weighting="uncertainty"``
    times a learned weight; every task's numbers are logged as ``<task>/<name>`` with its term of the sum,
    ``<task>/weighted_loss``. Validation and test batches are one task's, named by their
    ``task`` key, and each task's metrics are logged as ``<stage>/<task>/<name>``. ``num_classes`` is a dict per
    task, and the data declares a ``DatasetInfo`` per task (``DatasetInfo.tasks``).

    Args:
        tasks: sub-heads by name: instances, or ``{"class_path", "init_args"}`` dicts as configs give them.
        loss_weights: weight of each task's loss in the sum (default 1 each).
        monitor_task: the task whose headline metric the best checkpoint follows (default: the first).
        loss_weighting: "fixed" (``loss_weights``) or "uncertainty": Kendall, Gal & Cipolla's learned weights
            (CVPR 2018, "Multi-Task Learning Using Uncertainty to Weigh Losses"). Each task has a learned
            log-variance s_t (``log_vars[task]``, starting at 0, trained by the module's optimizer without weight
            decay, saved in checkpoints) and the loss is sum_t exp(-s_t) * L_t + s_t: the paper's form for a
            classification loss, used for every task type here (its regression form halves both terms, which only
            rescales the learning rate of s_t). ``train/<task>/weight`` logs exp(-s_t); ``loss_weights`` must stay 1.
        task_weights: start tasks from single-task checkpoints of this package, ``{task: path}``: each file's
            whole network (backbone and decoder) is loaded into that task's network when it is built, so the
            shared backbone comes from the last file listed (``backbone_weights``, applied after, replaces it).
            The file must be of that task's head, backbone, class count and input channels. Checkpoints of the
            multi-task run do not record these files: a network rebuilt from them has the weights already.
    """

    backbone_path = "backbone"

    def __init__(self, tasks: dict[str, Any], loss_weights: dict[str, float] | None = None,
                 monitor_task: str | None = None, loss_weighting: Literal["fixed", "uncertainty"] = "fixed",
                 task_weights: dict[str, str] | None = None):
        super().__init__()
        if not tasks:
            raise ValueError("MultiTaskHead needs at least one task, e.g. {cls: ClassificationHead, ...}")
        heads = {name: as_head(head) for name, head in tasks.items()}
        unknown = sorted((set(loss_weights or {}) | set(task_weights or {})) - set(heads))
        if unknown or (monitor_task is not None and monitor_task not in heads):
            raise ValueError(f"loss_weights, task_weights and monitor_task name the tasks {sorted(heads)}; got "
                             f"{unknown or [monitor_task]}")
        if loss_weighting not in ("fixed", "uncertainty"):
            raise ValueError(f"loss_weighting is 'fixed' or 'uncertainty', got {loss_weighting!r}")
        if loss_weighting == "uncertainty" and any(w != 1 for w in (loss_weights or {}).values()):
            raise ValueError(f"loss_weighting='uncertainty' learns each task's weight: leave loss_weights at 1 "
                             f"(got {loss_weights})")
        self.heads = nn.ModuleDict(heads)
        self.tasks = {name: head.config() for name, head in heads.items()}  # plain values, for checkpoints
        self.loss_weights, self.monitor_task = dict(loss_weights or {}), monitor_task
        self.loss_weighting, self.task_weights = loss_weighting, dict(task_weights or {})
        if loss_weighting == "uncertainty":  # s_t = log sigma_t^2; a head parameter: in the module's optimizer
            self.log_vars = nn.ParameterDict({name: nn.Parameter(torch.zeros(())) for name in heads})
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
        for name, path in self.task_weights.items():  # after sharing: each file's backbone goes to the shared one
            head = self.heads[name]
            load_task_network(networks[name], path, head=head.config()["class_path"], backbone=backbone,
                              num_classes=num_classes[name], in_channels=in_chans, backbone_path=head.backbone_path)
            log.info("task %r starts from %s (its network and the shared backbone)", name, path)
        if self.task_weights:
            log.info("the shared backbone is %s's (the last of task_weights) unless backbone_weights replaces it",
                     list(self.task_weights.values())[-1])
        self.metrics = nn.ModuleDict({stage: TaskMetrics({name: head.metrics[stage]
                                                          for name, head in self.heads.items()})
                                      for stage in ("val", "test")})
        return MultiTaskNetwork(shared, networks)

    def config(self) -> dict[str, Any]:
        """``TaskHead.config`` without ``task_weights``: the head as checkpoints record it, whose weights replace
        those files, so a network rebuilt from one (``load_from_checkpoint``, ``--ckpt_path``, ``load_network``)
        never reads them again (they may be gone). The run's ``config.yaml`` keeps them."""
        config = super().config()
        config["init_args"]["task_weights"] = None
        return config

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
            if self.loss_weighting == "uncertainty":
                weight = torch.exp(-self.log_vars[name])
                weighted = weight * loss + self.log_vars[name]
                logs[f"{name}/weight"] = weight.detach()
            else:
                weighted = self.loss_weights.get(name, 1.0) * loss
            total = total + weighted
            logs.update({f"{name}/{key}": value for key, value in task_logs.items()})
            logs[f"{name}/weighted_loss"] = weighted
        return total, {"loss": total, **logs}

    def evaluation_step(self, network: nn.Module, batch: dict, stage: str) -> None:
        name = self._task_of(batch)
        self.heads[name].evaluation_step(network.tasks[name], batch, stage)

    def write_results(self, stage: str, folder: Path) -> None:
        """Each task's results files in ``<folder>/<task>/``."""
        for name, head in self.heads.items():
            if type(head).write_results is not TaskHead.write_results and head.metrics[stage].update_called:
                (folder / name).mkdir(parents=True, exist_ok=True)
                head.write_results(stage, folder / name)

    def export_wrapper(self, network: nn.Module, preprocessing: dict[str, Any], in_channels: int,
                       input_size: tuple[int, int] | None = None) -> ExportSpec:
        """Refuses: a multi-task network exports one task at a time, as that task's head wraps its network
        (``fishnet-pl export --task``, ``fishnet_pl.export.task_network``)."""
        raise ValueError(f"a multi-task network exports one task at a time: fishnet-pl export --task with one of "
                         f"{list(self.heads)}; in Python, heads[task].export_wrapper(network.task(task), ...)")

    def predict_step(self, network: nn.Module, batch: dict) -> list[dict[str, Any]]:
        """The records of the batch's task (its ``task`` key, as in evaluation), each marked with ``task``."""
        name = self._task_of(batch)
        return [{**record, "task": name} for record in self.heads[name].predict_step(network.tasks[name], batch)]

    def write_predictions(self, records: list[dict[str, Any]], paths: list[str], folder: Path, first: bool) -> None:
        """Each task's files as its own head writes them, in ``<folder>/<task>/`` (a batch is one task's, from its
        own predict loader, so ``first`` marks each task's first batch)."""
        for name in dict.fromkeys(record["task"] for record in records):
            head = self.heads[name]
            if type(head).write_predictions is TaskHead.write_predictions:  # a task that writes no files
                continue
            mine = [i for i, record in enumerate(records) if record["task"] == name]
            (folder / name).mkdir(parents=True, exist_ok=True)
            head.write_predictions([{k: v for k, v in records[i].items() if k != "task"} for i in mine],
                                   [paths[i] for i in mine], folder / name, first)

    def _task_of(self, batch: dict) -> str:
        name = batch.get("task")
        if name not in self.heads:
            raise ValueError(f"a multi-task batch names its task ('task': one of {sorted(self.heads)}); got {name!r}")
        return name
