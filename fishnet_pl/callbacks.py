"""Callbacks the module adds to every run for fault tolerance and resuming (random streams, ``last.ckpt``,
stopping at a non-finite loss); and optional ones (images per second). The tasks' result files are written by
``fishnet_pl.writers``."""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import CombinedLoader
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

log = logging.getLogger(__name__)


class RNGStateCheckpoint(L.Callback):
    """Saves the torch, numpy and Python random states in every checkpoint and restores them on resume.

    Shuffling, the data workers' augmentation seeds and MixUp/CutMix all draw from these states, so a run resumed
    from a checkpoint continues with exactly the random streams it had. Lightning saves the train loader's own
    ``state_dict`` (torchdata's ``StatefulDataLoader``: position, seeds, workers' augmentation streams) and loads it
    before the resumed run builds its iterator. Building it draws the workers' base seed from torch's random state
    (the saved one replaces it), so a run resumed inside an epoch takes the saved random state once more when
    training starts; at an epoch's end the new iterator draws from the saved state as the interrupted run's did.

    Under DDP, Lightning's checkpoint holds rank 0's states only, but each process has its own (its workers
    augment other images, its GPU has its own generator): every process's random and train-loader states are
    gathered into the checkpoint, and each process of a resumed run with as many processes takes its own.
    Not covered: a ``DistributedSampler`` with loading workers resumed after epoch 0 (``fishnet_pl.lightning_compat``).
    """

    def __init__(self):
        self._restored: dict[str, Any] | None = None  # the random state to continue from, mid-epoch
        self._batches_in_epoch = 0  # training batches started in this epoch (a checkpoint's place)
        self._trainer = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer  # state_dict and load_state_dict are called without it

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._batches_in_epoch = batch_idx + 1

    def state_dict(self) -> dict[str, Any]:
        state = _rng_states()
        trainer = self._trainer
        if trainer is None:
            return state
        # Inside the epoch, or after its last batch (its validation, on_train_epoch_end)?
        state["mid_epoch"] = self._batches_in_epoch < trainer.num_training_batches
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            # Called by every process while a checkpoint is written (trainer.save_checkpoint is collective).
            mine = {"random": {k: v for k, v in state.items() if k != "mid_epoch"},
                    "train_loaders": _train_loader_states(trainer)}
            state["processes"] = [None] * trainer.world_size
            torch.distributed.all_gather_object(state["processes"], mine)
        return state

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        # Runs before Lightning's fit loop takes its train-loader states from the checkpoint: give it this process's.
        processes = checkpoint.get("callbacks", {}).get(self.state_key, {}).get("processes")
        if processes is None or len(processes) != trainer.world_size:
            return
        for loop in checkpoint.get("loops", {}).values():
            loop_state = loop.get("state_dict", {}) if isinstance(loop, dict) else {}
            if "combined_loader" in loop_state:
                loop_state["combined_loader"] = processes[trainer.global_rank]["train_loaders"]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        processes, trainer, mid_epoch = state_dict.get("processes"), self._trainer, state_dict.get("mid_epoch", True)
        if processes is not None and trainer is not None and len(processes) == trainer.world_size:
            state_dict = processes[trainer.global_rank]["random"]
        self._restored = state_dict if mid_epoch else None
        _set_rng_states(state_dict)

    def on_train_start(self, trainer, pl_module) -> None:
        # The resumed iterator took its seeds from the checkpoint: continue from the saved random state, not from
        # where building the iterator left it.
        if self._restored is not None:
            _set_rng_states(self._restored)
            self._restored = None


def _train_loader_states(trainer) -> list[dict[str, Any]]:
    """The ``state_dict`` of each stateful train loader, in the order Lightning saves them in a checkpoint."""
    loaders = trainer.train_dataloader
    if loaders is None:
        return []
    return [dl.state_dict() for dl in CombinedLoader(loaders).flattened
            if callable(getattr(dl, "state_dict", None)) and callable(getattr(dl, "load_state_dict", None))]


def _rng_states() -> dict[str, Any]:
    # Tensors and plain values only, so checkpoints still load with torch.load(weights_only=True).
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_states(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def images_in(batch: dict) -> int:
    """The number of images in a batch of our datamodules (its ``image``: a tensor or, for detection, a list; a
    multi-task batch's in all);
    ThroughputMonitor's ``batch_size_fn`` (``--trainer.callbacks.batch_size_fn fishnet_pl.callbacks.images_in``)."""
    images = batch.get("image")
    if images is None:  # a multi-task batch: one batch per task
        return sum(images_in(part) for part in batch.values() if isinstance(part, dict))
    return len(images)


class ImagesPerSecond(L.Callback):
    """Logs training images per second over all processes (``train/img_per_s``, shown in the progress bar).

    Measured from the end of one training batch to the end of the next, so data loading counts.

    Lightning's ``ThroughputMonitor`` works on the CPU too (``--trainer.callbacks+=ThroughputMonitor
    --trainer.callbacks.batch_size_fn fishnet_pl.callbacks.images_in --trainer.callbacks.window_size 10``): it logs
    ``train/device/samples_per_sec`` (``train/samples_per_sec`` over all processes), averaged over the last
    ``window_size`` batches, and the FLOPs utilisation when the module has a ``flops_per_batch`` (it warns that
    ours has none). It is an option beside this one, not its replacement: it writes to the loggers only (through
    the trainer, not ``LightningModule.log``, so nothing reaches the progress bar) and only once its window is full.
    """

    def __init__(self):
        self._last: float | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._last = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last is not None:
            pl_module.log("train/img_per_s", images_in(batch) * trainer.world_size / (now - self._last),
                          prog_bar=True, on_step=True, on_epoch=False, rank_zero_only=True)
        self._last = now


class LastCheckpoint(L.Callback):
    """Writes ``last.ckpt`` (beside the best checkpoints) after every epoch, if asked every N steps, and
    when the run is stopped by SIGTERM.

    ``--ckpt_path last`` resumes from it, so a killed run loses at most the steps since. A plain
    callback rather than a ``ModelCheckpoint``: Lightning 2.6 writes ``ModelCheckpoint``'s
    ``last.ckpt`` only when a best checkpoint is saved at the same step.

    SIGTERM (a scheduler's notice before it kills a job, SLURM's at the time limit or on preemption):
    Lightning's signal handler notes it, the loop finishes the current batch (under DDP every process
    stops at the same batch) and raises ``SIGTERMException``; this callback then saves ``last.ckpt``,
    and the process exits with status 0.
    """

    def __init__(self, every_n_train_steps: int = 0):
        self.every_n_train_steps = every_n_train_steps
        self.last_saved: tuple[Path, int] | None = None  # (file, global step) of this run's latest save

    def _save(self, trainer) -> Path:
        best = trainer.checkpoint_callback
        folder = Path(best.dirpath) if best is not None and best.dirpath else Path(trainer.default_root_dir)
        trainer.save_checkpoint(folder / "last.ckpt", weights_only=False)  # full state: resumable
        self.last_saved = (folder / "last.ckpt", trainer.global_step)
        if trainer.is_global_zero:
            link_latest(folder / "last.ckpt", Path(trainer.default_root_dir) / "last.ckpt")
        return folder / "last.ckpt"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_train_steps and trainer.global_step % self.every_n_train_steps == 0:
            self._save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._save(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Also in the middle of a validation, which a resumed run finishes first (its metrics then count
        # only the batches after the resume).
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit" and not trainer.sanity_checking:
            path = self._save(trainer)
            rank_zero_info(f"SIGTERM: saved {path} at step {trainer.global_step}; resume with --ckpt_path last")


class StopOnNonFiniteLoss(L.Callback):
    """Stops training at the first NaN or infinite loss, before its backward pass and optimizer step, with an
    error that names the step and the last checkpoint written (the weights to go back to; nothing is saved after).

    Every process takes the decision together (one all-reduce of a flag per step), so a DDP run stops as one.
    """

    def __init__(self):
        self._batch_idx = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._batch_idx = batch_idx  # for the message

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        finite = bool(torch.isfinite(loss.detach()).all())
        if trainer.strategy.reduce_boolean_decision(finite, all=True):
            return
        where = f"global step {trainer.global_step} (epoch {trainer.current_epoch}, batch {self._batch_idx})"
        value = f"is {loss.detach().float().mean().item()}" if not finite else "is not finite on another process"
        raise FloatingPointError(f"the training loss at {where} {value}; stopped before its optimizer step. "
                                 f"Last good checkpoint: {_last_checkpoint(trainer)}. Resume from it with "
                                 "a lower learning rate, gradient clipping (--trainer.gradient_clip_val) or "
                                 "fp32 / bf16 instead of fp16, or look for a broken input in this batch.")


def link_latest(target: Path, link: Path) -> None:
    """Point the symbolic link ``link`` at ``target`` (relative, so the run folder can move), replacing the link
    atomically; a file that is not a link is never replaced. Each run writes in its own version folder, so this
    is the stable path to the newest run's checkpoint (``runs/quickstart/classification/last.ckpt``)."""
    if link.resolve() == target.resolve() or (link.exists() and not link.is_symlink()):
        return
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(os.path.relpath(target, link.parent))
        os.replace(tmp, link)
    except OSError as err:  # e.g. a filesystem without symbolic links: the checkpoint itself is saved
        tmp.unlink(missing_ok=True)
        log.warning("could not link %s to %s (%s)", link, target, err)


def _last_checkpoint(trainer) -> str:
    """The latest checkpoint this run wrote (or resumed from), for messages."""
    saved = [cb.last_saved for cb in trainer.callbacks if isinstance(cb, LastCheckpoint) and cb.last_saved]
    if saved:
        path, step = max(saved, key=lambda s: s[1])
        return f"{path} (step {step})"
    if trainer.ckpt_path:
        return f"{trainer.ckpt_path} (resumed from)"
    return "none written yet in this run"
