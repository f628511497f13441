"""A scheduler's SIGTERM reaches every process of the job (SLURM's cgroup, ``timeout``, ``docker stop``,
Kubernetes), the data-loading workers too: the run still finishes its batch, saves ``last.ckpt``, exits with
status 0, and ``--ckpt_path last`` ends with the weights of the uninterrupted run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from .conftest import (
    CONFIGS,
    ROOT,
    assert_same_final_weights,
    csv_logger,
    run_checkpoint,
    run_cli,
    run_cli_subprocess,
)
from .test_classification_run import resumable_run, uninterrupted  # noqa: F401 (a fixture)

# Two loading workers serve their process ids; another process SIGTERMs them after a batch from each; they
# serve the rest, and the program ends with its iterator still open (the interpreter stops the workers).
WORKERS_OUTLIVE_OTHERS_SIGTERM = """
import os, subprocess, sys
import torch
from datamodules.common import make_loader

class Pids(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        return os.getpid()

batches = iter(make_loader(Pids(), batch_size=2, num_workers=2))
before = set(next(batches).tolist() + next(batches).tolist())  # one batch from each worker
subprocess.run([sys.executable, "-c", "import os, sys; [os.kill(int(p), 15) for p in sys.argv[1:]]", *map(str, before)])
after = set(next(batches).tolist() + next(batches).tolist())
print(len(before) == 2 and after == before)
"""


def test_loading_workers_outlive_another_processs_sigterm_and_end_with_their_main_process():
    run = subprocess.run([sys.executable, "-c", WORKERS_OUTLIVE_OTHERS_SIGTERM], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.split() == ["True"], run.stderr[-3000:]


def sigterm_to_the_process_group(args: list, cwd: Path, step: int) -> None:
    """``fishnet-pl ARGS`` in a process group of its own, whose every process gets SIGTERM from another process
    when training is about to run step ``step``; it must stop cleanly."""
    run = run_cli_subprocess([*args, "--trainer.callbacks+=tests.helpers.SignalAtStep",
                              f"--trainer.callbacks.step={step}", "--trainer.callbacks.group=true"],
                             cwd=cwd, new_session=True)
    assert run.returncode == 0 and "killed by signal" not in run.stderr, run.stderr[-3000:]
    assert f"at step {step + 1}; resume with --ckpt_path last" in run.stderr, run.stderr[-3000:]  # LastCheckpoint's


def test_classification_with_two_workers_stops_cleanly_and_resumes_exactly(in_tmp, uninterrupted):  # noqa: F811
    # Two epochs of 4 steps, last.ckpt every 3: the signal during step 4 saves step 5.
    args = [*resumable_run(in_tmp), *csv_logger("b")]
    sigterm_to_the_process_group(args, in_tmp, step=4)
    assert torch.load(run_checkpoint("b"), weights_only=True)["global_step"] == 5
    run_cli([*args, "--ckpt_path", "last"])
    assert_same_final_weights(uninterrupted, run_checkpoint("b"), global_step=8)


def test_segmentation_with_two_workers_stops_cleanly_and_resumes_exactly(in_tmp):
    # Two epochs of 3 steps on the quickstart scenes, last.ckpt every 2: the signal during step 4 saves step 5.
    args = ["fit", "--config", CONFIGS / "quickstart" / "segmentation.yaml", "--model.backbone_weights", "null",
            "--data.init_args.num_workers", "2", "--data.init_args.crop_size", "[64, 128]",
            "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1", "--trainer.max_epochs", "2",
            "--trainer.enable_progress_bar", "false", "--trainer.callbacks+=fishnet_pl.callbacks.LastCheckpoint",
            "--trainer.callbacks.every_n_train_steps=2"]
    run_cli([*args, *csv_logger("a")])
    sigterm_to_the_process_group([*args, *csv_logger("b")], in_tmp, step=4)
    assert torch.load(run_checkpoint("b"), weights_only=True)["global_step"] == 5
    run_cli([*args, *csv_logger("b"), "--ckpt_path", "last"])
    assert_same_final_weights(run_checkpoint("a"), run_checkpoint("b"), global_step=6)
