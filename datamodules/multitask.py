"""Several datasets at once, one per task of a ``fishnet_pl.tasks.MultiTaskHead``, the datamodules unchanged.

Training batches are ``{task: batch}``:

- ``mode: joint``: every step takes one batch of each task, from Lightning's ``CombinedLoader``; the epoch is as long
  as the longest task's (``max_size_cycle``, the others cycling) or the shortest's (``min_size``).
- ``mode: alternate``: every step takes one task's batch, the tasks taking turns in ``ratio`` (``{det: 2, seg: 1,
  cls: 1}``: det, seg, cls, det, det, seg, ...), for when a batch of each does not fit in memory at once
  (``AlternatingLoader``); the epoch ends when every task has been through its data (``max_size_cycle``) or when the
  first one has (``min_size``).

Lightning sees every task's loader either way, so under DDP each gets its ``DistributedSampler``, and each loader's
position is saved in checkpoints; alternate mode's place in its turns is this datamodule's ``state_dict``, with the
tasks' datamodules' own. Validation and test run each task's own loaders one after the other; ``task_names`` says
which task each loader (Lightning's ``dataloader_idx``) belongs to, and the module puts it into the batch as ``task``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import CombinedLoader
from torch.nn.parallel import DistributedDataParallel

from datamodules.dataset_info import DatasetInfo, dataset_info

EPOCHS = ("max_size_cycle", "min_size")


def turns(ratio: dict[str, int]) -> list[str]:
    """One cycle of alternate mode's turns: each task ``ratio[task]`` times, spread out (smooth weighted
    round-robin, ties to the earlier task): ``{det: 2, seg: 1, cls: 1}`` gives det, seg, cls, det."""
    total, credit, order = sum(ratio.values()), dict.fromkeys(ratio, 0), []
    for _ in range(total):
        for task, share in ratio.items():
            credit[task] += share
        task = max(ratio, key=lambda t: credit[t])  # max keeps the first of equals
        credit[task] -= total
        order.append(task)
    return order


class AlternatingLoader(CombinedLoader):
    """Alternate mode's training loader: each step one task's batch, ``{task: batch}``, the tasks taking turns
    (``turns(ratio)``). A ``CombinedLoader``, so Lightning sees (and under DDP re-samples) every task's loader and
    saves their positions; iteration is its own. Exhausted loaders start over until the epoch ends: in
    ``max_size_cycle`` when every task has been through its loader once, in ``min_size`` at the first task whose
    loader runs out. ``start`` is the step a resumed run continues from."""

    def __init__(self, loaders: dict[str, Any], ratio: dict[str, int], epoch: str = "max_size_cycle", start: int = 0):
        super().__init__(loaders, "max_size_cycle")
        self.turns, self.epoch, self.step, self.start = turns(ratio), epoch, 0, start
        self._iterators: dict[str, Any] = {}

    def _batches(self) -> dict[str, int]:
        """Each task's batches per pass (Lightning's ``limit_train_batches`` applied through ``limits``)."""
        lengths = {name: len(loader) for name, loader in self.iterables.items()}
        if self.limits is not None:
            lengths = {name: min(n, limit) for (name, n), limit in zip(lengths.items(), self.limits)}
        return lengths

    def _steps(self, batches: dict[str, int]) -> int:
        drawn, step = dict.fromkeys(batches, 0), 0
        while True:
            if self.epoch == "max_size_cycle" and all(drawn[t] >= n for t, n in batches.items()):
                return step
            task = self.turns[step % len(self.turns)]
            if self.epoch == "min_size" and drawn[task] >= batches[task]:
                return step
            drawn[task] += 1
            step += 1

    def __len__(self) -> int:
        return self._steps(self._batches())

    def __iter__(self) -> AlternatingLoader:
        self.step, self.start = self.start, 0
        self._drawn = {name: 0 for name in self.iterables}  # batches of the task's current pass
        self._length, self._limit = len(self), self._batches()
        for step in range(self.step):  # a resumed run: the tasks' loaders continue where they stood
            task = self.turns[step % len(self.turns)]
            self._drawn[task] = self._drawn[task] % self._limit[task] + 1
        # Tasks whose next draw starts a pass: all in a new epoch (also one resumed at an epoch's end); in a resumed
        # epoch those not drawn yet or whose pass had just ended. The others continue from their restored place.
        new_pass = {name for name, n in self._drawn.items() if n == 0 or n >= self._limit[name]}
        self._iterators = {}
        for name, loader in self.iterables.items():  # a resumed run, before the checkpoint's random state is back
            if getattr(loader, "next_iter_state", None) is None:  # torchdata's restored place, if any
                continue
            if name in new_pass:  # a place of an earlier pass: dropped, and an iterator made so that a
                loader.next_iter_state = None  # checkpoint before the task's first draw records none either
                iter(loader)
            else:  # continues where it stood, with the checkpoint's seeds
                self._iterators[name] = iter(loader)
        return self

    def __next__(self) -> tuple[dict[str, Any], int, int]:
        if self.step >= self._length:
            raise StopIteration
        task = self.turns[self.step % len(self.turns)]
        if task not in self._iterators or self._drawn[task] >= self._limit[task]:
            self._iterators[task] = self._iterate(task)
        batch = next(self._iterators[task])
        self._drawn[task] += 1
        self.step += 1
        return {task: batch}, self.step - 1, 0

    def _iterate(self, task: str) -> Iterator:
        """A new pass of the task's loader, made when the task is drawn (its random seeds drawn then)."""
        self._drawn[task] = 0
        return iter(self.iterables[task])

    def reset(self) -> None:
        self._iterators = {}
        super().reset()


class MultiTaskDataModule(L.LightningDataModule):
    """The datamodules of a multi-task run, by task name (the names of the ``MultiTaskHead``'s tasks).

    Args:
        datamodules: a datamodule per task (any of them, own folders and streaming shards included).
        mode: "joint": every training step takes one batch of each task; "alternate": one task's batch, the tasks
            taking turns in ``ratio``.
        epoch: "max_size_cycle" (an epoch lasts until every task has been through its data, the others cycling) or
            "min_size" (until the first task has).
        ratio: alternate mode's turns per cycle, by task (default 1 each): ``{det: 2, seg: 1, cls: 1}``.
    """

    def __init__(self, datamodules: dict[str, L.LightningDataModule], mode: Literal["joint", "alternate"] = "joint",
                 epoch: Literal["max_size_cycle", "min_size"] = "max_size_cycle",
                 ratio: dict[str, int] | None = None):
        super().__init__()
        if not datamodules:
            raise ValueError("MultiTaskDataModule needs a datamodule per task, e.g. {cls: ..., seg: ...}")
        if mode not in ("joint", "alternate") or epoch not in EPOCHS:
            raise ValueError(f"mode must be 'joint' or 'alternate' and epoch one of {EPOCHS}; got {mode!r}, {epoch!r}")
        ratio = {name: 1 for name in datamodules} | dict(ratio or {})
        if set(ratio) != set(datamodules) or not all(isinstance(n, int) and n > 0 for n in ratio.values()):
            raise ValueError(f"ratio gives a whole number of turns > 0 to tasks of {list(datamodules)}; got {ratio}")
        if ratio != {name: 1 for name in datamodules} and mode != "alternate":
            raise ValueError("ratio applies to mode: alternate (joint mode takes one batch of every task each step)")
        self.datamodules, self.mode, self.epoch = dict(datamodules), mode, epoch
        self.ratio = {name: ratio[name] for name in datamodules}
        self._resume_step = 0  # alternate mode: the step a resumed run continues from

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
        loaders = {name: dm.train_dataloader() for name, dm in self.datamodules.items()}
        if self.mode == "joint":
            return CombinedLoader(loaders, self.epoch)
        self._check_ddp_allows_unused_parameters()
        self._train_loader = AlternatingLoader(loaders, self.ratio, self.epoch, start=self._resume_step)
        self._resume_step = 0
        return self._train_loader

    def _check_ddp_allows_unused_parameters(self) -> None:
        """Alternate mode trains one task a step: the other tasks' decoders get no gradient, which DDP must be told
        of. Lightning has wrapped the model by now, so this stops the run before its first step (DDP alone would
        stop it at the second)."""
        model = self.trainer.model if self.trainer is not None else None
        if isinstance(model, DistributedDataParallel) and not model.find_unused_parameters:
            raise ValueError("MultiTaskDataModule(mode='alternate') under DDP: each step trains one task, so the "
                             "other tasks' decoders get no gradient in it, which DDP has to be told of: run with "
                             "--trainer.strategy ddp_find_unused_parameters_true")

    def val_dataloader(self) -> list:
        return [dm.val_dataloader() for dm in self.datamodules.values()]

    def test_dataloader(self) -> list:
        return [dm.test_dataloader() for dm in self.datamodules.values()]

    def state_dict(self) -> dict[str, Any]:
        """The tasks' datamodules' states (e.g. their augmentation streams) and alternate mode's step in the epoch
        (0 after its last step: a run resumed there starts the next epoch's turns afresh)."""
        state: dict[str, Any] = {"tasks": {name: dm.state_dict() for name, dm in self.datamodules.items()}}
        loader = getattr(self, "_train_loader", None)
        if loader is not None:
            state["alternate_step"] = loader.step if loader.step < len(loader) else 0
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name, dm in self.datamodules.items():
            dm.load_state_dict(state_dict.get("tasks", {}).get(name, {}))
        self._resume_step = state_dict.get("alternate_step", 0)

    def predict_dataloader(self) -> list:
        """Each task's predict loader, one after the other, as evaluation's (``task_names`` names their tasks)."""
        return [dm.predict_dataloader() for dm in self.datamodules.values()]
