"""Callbacks the module adds to every run: prediction files and resumable random streams."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import BasePredictionWriter


class PredictionWriter(BasePredictionWriter):
    """After each predict batch, lets the task head write its files (one folder per process)."""

    def __init__(self, output_dir: str | Path | None = None):
        super().__init__(write_interval="batch")
        self.output_dir = output_dir

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        out = Path(self.output_dir or Path(trainer.default_root_dir) / "predictions")
        if trainer.world_size > 1:
            out = out / f"rank{trainer.global_rank}"
        out.mkdir(parents=True, exist_ok=True)
        pl_module.head.write_predictions(prediction, out, trainer.datamodule, first=batch_idx == 0)


class RNGStateCheckpoint(L.Callback):
    """Saves the torch, numpy and Python random states in every checkpoint and restores them on resume.

    Shuffling, the data workers' augmentation seeds and MixUp/CutMix all draw from these states,
    so a run resumed from a checkpoint continues with exactly the random streams it had.
    """

    def state_dict(self) -> dict[str, Any]:
        return _collect_rng_states(include_cuda=False)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _set_rng_states(state_dict)


class ThroughputProgressBar(L.pytorch.callbacks.TQDMProgressBar):
    """The standard progress bar, plus training images per second over all processes."""

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        bar = self._train_progress_bar
        rate = bar.format_dict.get("rate") if bar is not None else None
        batch_size = getattr(trainer.datamodule, "batch_size", None)
        if rate and batch_size and trainer.training:
            items["img/s"] = f"{rate * batch_size * trainer.world_size:.1f}"
        return items


class PeriodicCheckpoint(L.pytorch.callbacks.ModelCheckpoint):
    """Writes ``last.ckpt`` every N training steps, so a killed run loses at most N steps.

    A separate class from ``ModelCheckpoint``, because Lightning lets the module's own
    ``ModelCheckpoint`` (best by the task's metric) replace trainer callbacks of the same type.
    """

    def __init__(self, every_n_train_steps: int = 1000, dirpath: str | None = None):
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, every_n_train_steps=every_n_train_steps)
