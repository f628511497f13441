"""``FishNetModule``: one LightningModule for every task, the head chosen by configuration.

The head builds the task's plain network (a timm classifier, an smp model, a torchvision detector),
which owns its backbone, any timm model by name; the module holds that network and runs the loop.
"""

from __future__ import annotations

import bisect
import logging
import math
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint

from datamodules.dataset_info import DatasetInfo, dataset_info
from fishnet_pl.callbacks import LastCheckpoint, RNGStateCheckpoint, StopOnNonFiniteLoss, images_in
from fishnet_pl.checkpoint import CKPT_BACKBONE_KEY, CKPT_DATASET_KEY, recorded_dataset_info
from fishnet_pl.lightning_compat import sync_batchnorm_requested
from fishnet_pl.models.fuse import fuse_for_inference
from fishnet_pl.models.registry import check_backbone_name
from fishnet_pl.models.weights import freeze, keep_frozen_norms_in_eval, load_backbone_weights
from fishnet_pl.tasks.base import TaskHead, as_head
from fishnet_pl.writers import task_callbacks

log = logging.getLogger(__name__)


class FishNetModule(L.LightningModule):
    """A task network on any timm backbone (FishNet by default), trained with SGD or AdamW.

    Args:
        head: the task (``ClassificationHead``, ``SegmentationHead``, ``DetectionHead``).
        backbone: a timm model name: a FishNet (``fishnet150``, ...) or any other (``resnet50``, ...).
        num_classes: classes of the task (linked from ``data.num_classes`` by the CLI); per task for a
            ``MultiTaskHead``.
        backbone_weights: start the backbone from a file: an official FishNet ``.tar``, a timm or
            torchvision checkpoint of that architecture, or one of our ``.ckpt`` files (any task);
            the classifier is dropped when it differs. Or the name of the authors' released weights
            (``fishnet150``, ``fishnet150.welltrained_in1k``, ...), downloaded once into torch's hub cache.
        in_channels: input image channels.
        frozen_stages: freeze the backbone's first N stages (timm's coarse groups: FishNet's stem,
            tail.0-2, bridge, body.0-2, head.0-2; ResNet's stem, layer1-4).
        freeze_bn: keep every backbone BatchNorm in eval mode with frozen affine parameters.
        unfreeze_at_epoch: with ``frozen_stages``, unfreeze the backbone at this epoch (0 = never).
        grad_checkpointing: recompute backbone activations in backward to save memory.
        compile: compile the network with ``torch.compile`` (in place, so checkpoints keep their keys);
            true, or a dict of ``torch.compile`` arguments (e.g. ``{mode: max-autotune}``). The first steps
            of a run wait for the compilation (``python -m bench.backbones --modes compile`` measures it, column
            "compile s"; inductor caches it for later runs).
        channels_last: keep the network's weights and every batch's images in the channels-last layout
            (NHWC), in training, validation, test and predict; oneDNN's and cuDNN's convolutions are faster there
            (``python -m bench.backbones --modes eager,channels_last``). Checkpoints load either way.
        optimizer: "sgd" (momentum, the authors' choice) or "adamw".
        lr: peak learning rate; default 0.1 x global batch / 256 for SGD, 1e-3 x global batch / 256 for AdamW.
        momentum: SGD momentum.
        weight_decay: applied to all weights and biases, as the authors did.
        backbone_lr_mult: backbone learning rate = ``lr`` x this (e.g. 0.1 when fine-tuning).
        schedule: "step" (x ``gamma`` at each epoch of ``milestones``), "cosine" or "poly" (power 0.9),
            after ``warmup_epochs`` of linear warm-up; the rate is updated every step.
        milestones: epochs at which the "step" schedule multiplies the rate by ``gamma`` (fractions place a step
            at an iteration count: 60k of 7,393 steps an epoch is 8.116).
        gamma: factor of the "step" schedule.
        warmup_epochs: linear warm-up length in epochs (fractions allowed).
    """

    def __init__(
        self,
        head: TaskHead | None = None,
        backbone: str = "fishnet150",
        num_classes: int | dict[str, int] = 1000,
        backbone_weights: str | None = None,
        in_channels: int = 3,
        frozen_stages: int = 0,
        freeze_bn: bool = False,
        unfreeze_at_epoch: int = 0,
        grad_checkpointing: bool = False,
        compile: bool | dict[str, Any] = False,
        channels_last: bool = False,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float | None = None,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        backbone_lr_mult: float = 1.0,
        schedule: Literal["step", "cosine", "poly", "constant"] = "step",
        milestones: tuple[float, ...] = (30, 60, 90),
        gamma: float = 0.1,
        warmup_epochs: float = 0.0,
    ):
        super().__init__()
        head = as_head(head)
        self.save_hyperparameters(ignore=["head"])
        self.hparams["head"] = head.config()  # plain values: load_from_checkpoint rebuilds the head
        check_backbone_name(backbone)
        self.head = head
        self.network = head.build(backbone, num_classes, in_channels)
        if backbone_weights:
            load_backbone_weights(self.backbone, backbone, backbone_weights)
        freeze(self.backbone, backbone, frozen_stages, freeze_bn)
        if grad_checkpointing:
            self.backbone.set_grad_checkpointing(True)
        if channels_last:  # before compiling: the compiled graph is traced for this layout
            self.network.to(memory_format=torch.channels_last)
        if compile:
            self.network.compile(**(compile if isinstance(compile, dict) else {}))

    @property
    def backbone(self) -> torch.nn.Module:
        """The timm backbone inside the task network (the classifier itself for classification)."""
        return self.network.get_submodule(self.head.backbone_path)

    def forward(self, images: Any) -> Any:
        return self.head(self.network, images)

    def train(self, mode: bool = True) -> FishNetModule:
        """Like ``nn.Module.train``; frozen BatchNorms (frozen stages, ``freeze_bn``) stay in eval mode."""
        super().train(mode)
        if mode:
            keep_frozen_norms_in_eval(self.backbone)
        return self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Where the backbone sits, so --model.backbone_weights can start any task from this file.
        prefix = f"network.{self.head.backbone_path}." if self.head.backbone_path else "network."
        checkpoint[CKPT_BACKBONE_KEY] = {"name": self.hparams.backbone, "prefix": prefix}
        # Its weights replace the backbone's start file: a model rebuilt from it (load_from_checkpoint, or LightningCLI
        # with --ckpt_path, which takes these hyper-parameters) does not read that file again, which may be gone.
        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"] = {**checkpoint["hyper_parameters"], "backbone_weights": None}
        # What the data declared (setup passed the datamodule's to the head): class names, palette, how images
        # were prepared, ... so predict, export and load_network need neither the config nor the dataset.
        checkpoint[CKPT_DATASET_KEY] = self.head.dataset_info.as_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A module loaded from a file (load_from_checkpoint) knows its data too; a datamodule's, set before
        # Lightning restores a checkpoint into a run, stays.
        if self.head.dataset_info == DatasetInfo():
            self.head.set_dataset_info(recorded_dataset_info(checkpoint))

    # ------------------------------------------------------------------ steps
    def in_layout(self, batch: dict) -> dict:
        """With ``channels_last``, the batch's stacked images in that layout (detection's list of images of their
        own sizes stays: torchvision batches them itself, and the convolutions follow the weights' layout). Not
        Lightning's ``on_after_batch_transfer``: overriding that warns on every run with a datamodule."""
        images = batch.get("image") if self.hparams.get("channels_last") else None
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            batch = {**batch, "image": images.contiguous(memory_format=torch.channels_last)}
        return batch

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        batch = self.in_layout(batch)
        loss, logs = self.head.training_step(self.network, batch)
        self._log_headline_in_progress_bar({f"train/{k}": v for k, v in logs.items()}, batch_size=images_in(batch))
        return loss

    def _log_headline_in_progress_bar(self, logs: dict[str, Any], **kwargs: Any) -> None:
        """Log everything; the head's headline numbers (``TaskHead.progress_bar``) also in the progress bar."""
        shown = {name: value for name, value in logs.items() if name.split("/", 1)[-1] in self.head.progress_bar}
        self.log_dict(shown, prog_bar=True, **kwargs)
        self.log_dict({name: value for name, value in logs.items() if name not in shown}, **kwargs)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_step(batch, "val", dataloader_idx)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_step(batch, "test", dataloader_idx)

    def _evaluation_step(self, batch: dict, stage: str, dataloader_idx: int = 0) -> None:
        self.head.evaluation_step(self.network, self.in_layout(self._with_task(batch, dataloader_idx)), stage)

    def _with_task(self, batch: dict, dataloader_idx: int) -> dict:
        """The batch with its ``task`` when a multi-task datamodule names the task of each evaluation and predict
        loader (``datamodules.multitask``)."""
        tasks = _datamodule_task_names(self)
        return {**batch, "task": tasks[dataloader_idx]} if tasks else batch

    def on_validation_epoch_end(self) -> None:
        self._evaluation_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._evaluation_epoch_end("test")

    def _evaluation_epoch_end(self, stage: str) -> None:
        metric = self.head.metrics[stage]
        if not metric.update_called:  # e.g. limit_val_batches=0
            return
        logs = metric.compute()  # over every process, each image once
        metric.reset()
        self._log_headline_in_progress_bar({f"{stage}/{name}": value for name, value in logs.items()}, sync_dist=False)

    def on_predict_start(self) -> None:
        """Predict with ``fuse_for_inference``'s network (BatchNorms folded into the convolutions, weights
        channels-last): the same predictions up to float rounding, faster (``python -m bench.predict``). The
        trained network comes back when predict ends."""
        if not self.hparams.get("compile"):  # a compiled network keeps its graph
            self._trained_network, self.network = self.network, fuse_for_inference(self.network)

    def on_predict_end(self) -> None:
        self.network = getattr(self, "_trained_network", self.network)
        self._trained_network = None

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        if not images_in(batch):  # every image of the batch was unreadable (datamodules.predict)
            return []
        return self.head.predict_step(self.network, self.in_layout(self._with_task(batch, dataloader_idx)))

    def on_train_epoch_start(self) -> None:
        """``unfreeze_at_epoch``: the whole backbone trains from this epoch on, BatchNorms frozen by ``freeze_bn``
        stay frozen. Not Lightning's ``BackboneFinetuning``: it freezes all of ``backbone`` (for classification the
        whole network) where ``frozen_stages`` freezes the first stages; it adds the backbone as a new optimizer
        group with its own learning-rate ramp, which ``LambdaLR`` and ``backbone_lr_mult`` do not cover (the
        frozen parameters are in the optimizer from the start); and its frozen BatchNorms stop tracking running
        statistics and normalise each training batch with its own, where ``freeze_bn`` keeps them in eval mode."""
        if self.hparams.unfreeze_at_epoch and self.current_epoch == self.hparams.unfreeze_at_epoch:
            self.backbone.requires_grad_(True)
            freeze(self.backbone, self.hparams.backbone, 0, self.hparams.freeze_bn)  # keeps freeze_bn
            self.train()
            log.info("epoch %d: backbone unfrozen", self.current_epoch)

    def setup(self, stage: str) -> None:
        info = _dataset_info(self)
        self.head.set_dataset_info(info)
        self._check_input_size(info)
        # Runs before Lightning converts BatchNorm and wraps the model in DDP, where torch would fail
        # with "SyncBatchNorm layers only work with GPU modules" and no hint what to change.
        strategy = self.trainer.strategy
        if sync_batchnorm_requested(strategy) and strategy.root_device.type == "cpu":
            raise RuntimeError("sync_batchnorm=True needs GPUs (torch's SyncBatchNorm does not run on the CPU); "
                               "set --trainer.sync_batchnorm=false for CPU runs")

    def _check_input_size(self, info: DatasetInfo) -> None:
        """The backbone's rule on input sizes (FishNet's ``input_size_multiple``), checked against the data's
        evaluation size before any step, so that a wrong ``image_size`` stops the run at once."""
        multiple = getattr(self.backbone, "input_size_multiple", 1)
        size = info.preprocessing.get("input_size")
        if size and any(side % multiple for side in size):
            below, above = max(multiple, size[0] // multiple * multiple), -(-size[0] // multiple) * multiple
            raise ValueError(f"{self.hparams.backbone} needs input sides that are multiples of {multiple}, but the "
                             f"data gives {size[0]}x{size[1]} images: set --data.init_args.image_size to a multiple "
                             f"of {multiple} (e.g. {below} or {above})")

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        lr = hp.lr if hp.lr is not None else (0.1 if hp.optimizer == "sgd" else 1e-3) * self._global_batch() / 256
        # Frozen parameters join the optimizer too, so unfreezing later needs no new optimizer.
        backbone = list(self.backbone.parameters())
        # The head's own parameters (a multi-task head's learned loss weights) are no network weights: weight decay
        # would pull them to their start.
        head = list(self.head.parameters())
        ids = {id(p) for p in backbone + head}
        groups = [{"params": backbone, "lr": lr * hp.backbone_lr_mult},
                  {"params": [p for p in self.parameters() if id(p) not in ids], "lr": lr},
                  {"params": head, "lr": lr, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.AdamW(groups, lr=lr, weight_decay=hp.weight_decay)
        # The schedule's length in steps is set when training starts (on_train_start): asking the trainer here
        # would load the train dataloader before a checkpoint is restored (Lightning #20550).
        factor = LRFactor(hp.schedule, milestones=hp.milestones, gamma=hp.gamma, warmup_epochs=hp.warmup_epochs)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        """Give the learning-rate schedule the run's length, now that the fit loop has loaded the train dataloader
        itself (after restoring a checkpoint's loader state), and set the rate of the coming step with it."""
        scheduler = self.lr_schedulers()
        if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):  # e.g. a subclass's own optimizers
            return
        t = self.trainer
        total = max(1, t.estimated_stepping_batches)
        batches = t.num_training_batches
        per_epoch = batches / t.accumulate_grad_batches if math.isfinite(batches) else total
        for group, base_lr, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            if isinstance(factor, LRFactor):
                factor.set_length(total, per_epoch)
                group["lr"] = base_lr * factor(scheduler.last_epoch)  # as LambdaLR.step computes it

    def _global_batch(self) -> int:
        dm = getattr(self.trainer, "datamodule", None)
        per_device = getattr(dm, "batch_size", None) or 256
        t = self.trainer
        return per_device * t.world_size * t.accumulate_grad_batches

    def configure_callbacks(self) -> list[L.Callback]:
        """Our defaults, each only when the trainer has none of its kind: Lightning lets a callback returned here
        replace the trainer's of the same type, so the user's (e.g. a ``ModelCheckpoint`` with its own
        ``monitor``, or a prediction writer) would otherwise be dropped. The ``ModelCheckpoint`` Lightning adds
        when none is configured (every argument at its default) is replaced by ours, which keeps the best
        checkpoints by the head's ``monitor``."""
        best = ModelCheckpoint(
            monitor=self.head.monitor, mode=self.head.monitor_mode,
            filename="epoch{epoch:03d}-" + self.head.monitor.replace("/", "_") + "={" + self.head.monitor + ":.4f}",
            auto_insert_metric_name=False)
        defaults = (best, RNGStateCheckpoint(), StopOnNonFiniteLoss(), LastCheckpoint(), *task_callbacks(self.head))
        callbacks = []
        for default in defaults:
            kind = BasePredictionWriter if isinstance(default, BasePredictionWriter) else type(default)
            if not any(isinstance(c, kind) and not _lightnings_default(c) for c in self.trainer.callbacks):
                callbacks.append(default)
        return callbacks


class LRFactor:
    """Learning-rate multiplier at a step: linear warm-up, then step, cosine, poly or constant.

    Lengths are in epochs; ``set_length`` gives the run's steps (``FishNetModule.on_train_start``), and until then
    the factor is 1 (``LambdaLR`` asks once when it is built). Attributes are plain values: ``LambdaLR`` saves
    them in checkpoints.
    """

    def __init__(self, schedule: str, milestones=(), gamma: float = 0.1, warmup_epochs: float = 0.0,
                 total_steps: float | None = None, steps_per_epoch: float | None = None):
        self.schedule, self.milestone_epochs, self.gamma = schedule, list(milestones), gamma
        self.warmup_epochs = warmup_epochs
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch

    def set_length(self, total_steps: float, steps_per_epoch: float) -> None:
        """The run's optimizer steps in all, and per epoch (both may be fractional or, for the total, infinite)."""
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch

    def __call__(self, step: int) -> float:
        if self.total_steps is None or self.steps_per_epoch is None:
            return 1.0
        total = self.total_steps
        warmup = min(self.warmup_epochs * self.steps_per_epoch, total)
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1.0, total - warmup))
        if self.schedule == "step":
            milestones = [m * self.steps_per_epoch for m in self.milestone_epochs]
            return self.gamma ** bisect.bisect_right(milestones, step)
        if self.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.schedule == "poly":
            return (1.0 - progress) ** 0.9
        return 1.0


def _lightnings_default(callback: L.Callback) -> bool:
    """Whether ``callback`` is a ``ModelCheckpoint`` with every argument at its default, as the one Lightning adds
    to a trainer configured with none (``enable_checkpointing``)."""
    if type(callback) is not ModelCheckpoint:
        return False
    default = ModelCheckpoint()
    return all(getattr(callback, name) == getattr(default, name) for name in (
        "state_key", "monitor", "dirpath", "filename", "save_last", "save_top_k", "save_weights_only"))


def _datamodule(module: FishNetModule) -> Any:
    """The datamodule of the module's trainer; None when unattached or without one."""
    trainer = getattr(module, "_trainer", None)  # the trainer property raises when unattached
    return getattr(trainer, "datamodule", None) if trainer is not None else None


def _datamodule_task_names(module: FishNetModule) -> list[str] | None:
    """The task of each evaluation loader, when the trainer's datamodule is a multi-task one."""
    return getattr(_datamodule(module), "task_names", None)


def _dataset_info(module: FishNetModule) -> DatasetInfo:
    """What the datamodule the module's trainer holds declares (``datamodules.dataset_info``); empty when there is
    none or it cannot say (e.g. a dataset folder that is not there any more)."""
    try:
        return dataset_info(_datamodule(module))
    except Exception:
        return DatasetInfo()
