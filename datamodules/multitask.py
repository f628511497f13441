"""Several datasets at once, one per task of a ``fishnet_pl.tasks.MultiTaskHead``, the datamodules unchanged.

Training batches come from Lightning's ``CombinedLoader``: every step takes one batch of each task,
``{task: batch}`` (``mode: joint``), the epoch as long as the longest task's (``max_size_cycle``, the others
cycling) or the shortest's (``min_size``). Lightning saves each task loader's position in checkpoints, as for one
loader. Validation and test run each task's own loaders one after the other; ``task_names`` says which task each
loader (Lightning's ``dataloader_idx``) belongs to, and the module puts it into the batch as ``task``.
"""

from __future__ import annotations

from typing import Literal

import lightning as L
from lightning.pytorch.utilities import CombinedLoader

from datamodules.dataset_info import DatasetInfo, dataset_info


class MultiTaskDataModule(L.LightningDataModule):
    """The datamodules of a multi-task run, by task name (the names of the ``MultiTaskHead``'s tasks).

    Args:
        datamodules: a datamodule per task (any of them, own folders and streaming shards included).
        mode: "joint": every training step takes one batch of each task.
        epoch: "max_size_cycle" (an epoch is the longest task's, the others cycling) or "min_size" (the shortest's).
    """

    def __init__(self, datamodules: dict[str, L.LightningDataModule], mode: Literal["joint"] = "joint",
                 epoch: Literal["max_size_cycle", "min_size"] = "max_size_cycle"):
        super().__init__()
        if not datamodules:
            raise ValueError("MultiTaskDataModule needs a datamodule per task, e.g. {cls: ..., seg: ...}")
        if mode != "joint" or epoch not in ("max_size_cycle", "min_size"):
            raise ValueError(f"mode must be 'joint' and epoch 'max_size_cycle' or 'min_size'; got {mode!r}, {epoch!r}")
        self.datamodules, self.mode, self.epoch = dict(datamodules), mode, epoch

    @property
    def task_names(self) -> list[str]:
        """The tasks in the order of the evaluation loaders."""
        return list(self.datamodules)

    @property
    def num_classes(self) -> dict[str, int]:
        """Each task's classes (the CLI links them to the model)."""
        return {name: dm.num_classes for name, dm in self.datamodules.items()}

    @property
    def dataset_info(self) -> DatasetInfo:
        """Each task's ``DatasetInfo``, under ``tasks``."""
        return DatasetInfo(tasks={name: dataset_info(dm) for name, dm in self.datamodules.items()})

    def prepare_data(self) -> None:
        for dm in self.datamodules.values():
            dm.prepare_data()

    def setup(self, stage: str) -> None:
        for dm in self.datamodules.values():
            dm.trainer = self.trainer  # e.g. num_workers following the trainer's processes
            dm.setup(stage)

    def train_dataloader(self) -> CombinedLoader:
        return CombinedLoader({name: dm.train_dataloader() for name, dm in self.datamodules.items()}, self.epoch)

    def val_dataloader(self) -> list:
        return [dm.val_dataloader() for dm in self.datamodules.values()]

    def test_dataloader(self) -> list:
        return [dm.test_dataloader() for dm in self.datamodules.values()]
