"""Callbacks the tests inject through the CLI (``--trainer.callbacks+=tests.helpers....``)."""

from __future__ import annotations

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    """SIGKILLs the process when training is about to run step ``step``: a crash with no clean-up."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class InterruptAtStep(L.Callback):
    """Interrupts training (as Ctrl-C does) when it is about to run step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


class SignalAtStep(L.Callback):
    """Sends this process ``signum`` (SIGTERM by default, as a cluster's scheduler does before it kills a job)
    when training is about to run step ``step``."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM)):
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class NaNInputAtStep(L.Callback):
    """Puts a NaN into the first image of the batch of step ``step``, so that step's loss is NaN."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            batch["image"][0] = float("nan")
