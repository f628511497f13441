"""Callbacks the tests inject through the CLI (``--trainer.callbacks+=tests.helpers....``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

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
    when training is about to run step ``step``; with ``group``, its whole process group, data-loading workers
    included, as SLURM, ``timeout``, ``docker stop`` and Kubernetes do (run it in a session of its own)."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM), group: bool = False):
        self.step, self.signum, self.group = step, signum, group

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        if not self.group:
            os.kill(os.getpid(), self.signum)
        elif os.getpgid(0) != os.getpid():  # would signal the test runner too
            raise RuntimeError("SignalAtStep(group=True) needs a process group of its own: run_cli_subprocess(..., "
                               "new_session=True)")
        else:  # from another process, as a scheduler's (torch's workers exit quietly when their parent signals them)
            subprocess.run([sys.executable, "-c", f"import os; os.killpg({os.getpid()}, {self.signum})"])


class NaNInputAtStep(L.Callback):
    """Puts a NaN into the first image of the batch of step ``step``, so that step's loss is NaN."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            batch["image"][0] = float("nan")
