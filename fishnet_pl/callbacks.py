"""Callbacks the module adds to every run: prediction files and resumable random streams."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
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
        # Tensors and plain values only, so checkpoints still load with torch.load(weights_only=True).
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {"torch": torch.get_rng_state(), "python": random.getstate(),
                 "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        random.setstate(state_dict["python"])
        name, keys, pos, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class ImagesPerSecond(L.Callback):
    """Logs training images per second over all processes (``train/img_per_s``, shown in the progress bar).

    Measured from the end of one training batch to the end of the next, so data loading counts.
    """

    def __init__(self):
        self._last: float | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._last = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last is not None:
            images = len(batch.get("image", batch.get("images", ()))) * trainer.world_size
            pl_module.log("train/img_per_s", images / (now - self._last), prog_bar=True, on_step=True,
                          on_epoch=False, rank_zero_only=True)
        self._last = now


class LastCheckpoint(L.Callback):
    """Writes ``last.ckpt`` (beside the best checkpoints) after every epoch and, if asked, every N steps.

    ``--ckpt_path last`` resumes from it, so a killed run loses at most the steps since. A plain
    callback rather than a ``ModelCheckpoint``: Lightning 2.6 writes ``ModelCheckpoint``'s
    ``last.ckpt`` only when a best checkpoint is saved at the same step.
    """

    def __init__(self, every_n_train_steps: int = 0):
        self.every_n_train_steps = every_n_train_steps

    def _save(self, trainer) -> None:
        best = trainer.checkpoint_callback
        folder = Path(best.dirpath) if best is not None and best.dirpath else Path(trainer.default_root_dir)
        trainer.save_checkpoint(folder / "last.ckpt", weights_only=False)  # full state: resumable

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_train_steps and trainer.global_step % self.every_n_train_steps == 0:
            self._save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._save(trainer)
