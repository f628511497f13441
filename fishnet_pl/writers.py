"""The callbacks that put a task's results on disk: ``PredictionWriter`` (predict) and ``ResultsWriter``
(validation and test).

They do Lightning's part (where files go, one folder per process under DDP, never over another run's files,
the closing line) and ask the head for the task's files (``TaskHead.write_predictions``,
``TaskHead.write_results``, plain Python), so a new task adds no code here.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from fishnet_pl.tasks.base import TaskHead


class PredictionWriter(BasePredictionWriter):
    """Writes the files of each predict batch as it comes (one folder ``rank<N>`` per process under DDP), in the
    head's format (``TaskHead.write_predictions``).

    Outputs mirror the inputs: the image ``<root>/a/img.jpg`` gives ``a/img.jpg.<kind>.png`` (or ``a/img.jpg.png``)
    under the output folder, ``<root>`` being the datamodule's ``predict_root``, else its dataset ``root``
    (``prediction_path``). The full file name stays, so same-named images in two folders, or ``x.jpg`` beside
    ``x.png``, never share an output; the JSON lines carry that relative ``path`` and the ``file`` as read.

    A run never replaces another's files: ``output_dir``, when given, must be new or empty unless ``overwrite``;
    without it each run takes the first free (missing or empty) of ``<default_root_dir>/predictions``,
    ``predictions_1``, ``predictions_2``, ... Files a batch lists as ``unreadable`` (``datamodules.predict`` skips
    them) go to ``unreadable.txt``, one path per line. The run ends with one line: the folder, the images
    predicted and those skipped.
    """

    def __init__(self, output_dir: str | Path | None = None, overwrite: bool = False):
        super().__init__(write_interval="batch")
        self.output_dir, self.overwrite = output_dir, overwrite
        self.folder: Path | None = None  # this run's (setup)
        self.predicted: dict[int, int] = {}  # images per predict loader (a multi-task datamodule's: per task)
        self.unreadable: list[str] = []

    @staticmethod
    def for_head(head: TaskHead, output_dir: str | Path | None = None,
                 overwrite: bool = False) -> PredictionWriter | None:
        """A writer if the head writes prediction files; None if not (``trainer.predict`` still returns its
        records)."""
        return PredictionWriter(output_dir, overwrite) if writes(head, "write_predictions") else None

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "predict":
            return
        # Every process takes rank 0's folder (and its error): none writes before setup ends (Lightning's barrier).
        folder, error = trainer.strategy.broadcast(self._free_folder(trainer), src=0)
        if error:
            raise FileExistsError(error)
        self.folder, self.predicted, self.unreadable = Path(folder), {}, []

    def _free_folder(self, trainer) -> tuple[str, str | None]:
        if self.output_dir is not None:
            folder = Path(self.output_dir)
            if not self.overwrite and folder.is_dir() and any(folder.iterdir()):
                return str(folder), (f"{folder}: holds files of an earlier run; to write into it anyway pass "
                                     "--overwrite true, or give another --predict_dir")
            return str(folder), None
        base = Path(trainer.default_root_dir) / "predictions"
        for n in itertools.count():
            folder = base.with_name(f"{base.name}_{n}") if n else base
            if not folder.is_dir() or not any(folder.iterdir()):
                return str(folder), None

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        out = self.folder / f"rank{trainer.global_rank}" if trainer.world_size > 1 else self.folder
        out.mkdir(parents=True, exist_ok=True)
        datamodule = trainer.datamodule
        paths = [prediction_path(record["path"], datamodule) for record in prediction]
        pl_module.head.write_predictions(prediction, paths, out, first=batch_idx == 0)
        self.predicted[dataloader_idx] = self.predicted.get(dataloader_idx, 0) + len(prediction)
        if batch_idx == 0 and dataloader_idx == 0:
            (out / "unreadable.txt").unlink(missing_ok=True)
        skipped = batch.get("unreadable") if isinstance(batch, dict) else None
        skipped = [path for path in skipped or () if path not in self.unreadable]  # each task reads the folder
        if skipped:
            self.unreadable += skipped
            with open(out / "unreadable.txt", "a") as f:
                f.writelines(f"{path}\n" for path in skipped)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        super().on_predict_epoch_end(trainer, pl_module)
        loaders = len(trainer.num_predict_batches)
        counts = torch.tensor([*(self.predicted.get(i, 0) for i in range(loaders)), len(self.unreadable)],
                              device=pl_module.device)
        *predicted, skipped = (int(n) for n in trainer.strategy.reduce(counts, reduce_op="sum").tolist())
        listed = f" (listed in unreadable.txt, e.g. {self.unreadable[0]})" if self.unreadable else ""
        tasks = getattr(trainer.datamodule, "task_names", None)
        if tasks and len(tasks) == loaders:  # a multi-task model: each task's files in <folder>/<task>/
            counted = (f"{predicted[0]} images predicted by each task ({', '.join(tasks)})" if len(set(predicted)) == 1
                       else "images predicted by task: " + ", ".join(f"{t} {n}" for t, n in zip(tasks, predicted)))
            where = f"{self.folder}, a folder per task ({', '.join(f'{t}/' for t in tasks)})"
        else:
            counted, where = f"{sum(predicted)} images predicted", self.folder
        rank_zero_info(f"predict: {counted}, {skipped} skipped as unreadable{listed}; files written to {where}")


def prediction_path(path: str | os.PathLike, datamodule: Any) -> str:
    """Where the outputs of the image ``path`` go inside the output folder (``a/img.jpg``, POSIX): ``path``
    relative to the datamodule's ``predict_root``, else to its ``root``; a path under neither keeps its own
    relative form (streamed samples), or loses only its anchor when absolute or climbing out with ``..``."""
    full = Path(os.path.abspath(path))
    for root in (getattr(datamodule, "predict_root", None), getattr(datamodule, "root", None)):
        if root is not None and "://" not in str(root) and full.is_relative_to(os.path.abspath(root)):
            return full.relative_to(os.path.abspath(root)).as_posix()
    given = Path(path)
    if given.is_absolute() or ".." in given.parts:
        return full.relative_to(full.anchor).as_posix()
    return given.as_posix()


class ResultsWriter(L.Callback):
    """After each validation and test epoch, has the head write its results file of the epoch
    (``TaskHead.write_results``, e.g. detection's COCO results ``{stage}_detections.json``) into the run's log
    folder, on the first process, once the stage's metric is synchronised. Not during the sanity check."""

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "test")

    def _write(self, trainer, pl_module, stage: str) -> None:
        metric = pl_module.head.metrics[stage]
        if trainer.sanity_checking or not metric.update_called:
            return
        metric.compute()  # synchronised and cached: the module logs the same result after this hook
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: every rank asks
        if trainer.is_global_zero:
            pl_module.head.write_results(stage, log_dir)


def writes(head: TaskHead, method: str) -> bool:
    """Whether the head writes files with ``method`` (``write_predictions``, ``write_results``: optional)."""
    return is_overridden(method, head, TaskHead)


def task_callbacks(head: TaskHead) -> list[L.Callback]:
    """The result-file callbacks the head asks for: the prediction writer, and the results writer if it writes
    results (detection's COCO results files)."""
    writer = PredictionWriter.for_head(head)
    return ([writer] if writer is not None else []) + ([ResultsWriter()] if writes(head, "write_results") else [])
