"""Classification end to end through the CLI on the quickstart data: what a user runs from the README."""

from __future__ import annotations

import csv
import json
import shutil
import signal
from pathlib import Path

import pytest
import torch

from fishnet_pl import FishNetModule

from .conftest import CONFIGS, csv_logger, run_cli, run_cli_subprocess, validation_metrics

QUICKSTART = CONFIGS / "quickstart" / "classification.yaml"


def small_run(root: Path, *extra: str) -> list[str]:
    """A seconds-long quickstart run: 32x32 images, 4 batches an epoch, one worker."""
    return ["--config", QUICKSTART, "--data.init_args.root", root / "data", "--data.init_args.image_size", "32",
            "--data.init_args.val_resize", "36", "--data.init_args.num_workers", "1",
            "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "2",
            "--trainer.enable_progress_bar", "false", *extra]


@pytest.fixture
def quickstart(classification_quickstart):
    return classification_quickstart


def test_quickstart_learns_well_above_chance(quickstart):
    cli, _ = quickstart
    # 4 balanced classes: chance is 25%.
    assert cli.test_metrics["test/acc1"] > 0.6, cli.test_metrics


def test_checkpoints_logs_and_hyperparameters_of_a_run(quickstart):
    cli, cwd = quickstart
    run_dir = cwd / "runs" / "quickstart" / "classification"
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and any(n.startswith("epoch") and "val_acc1=" in n for n in checkpoints)
    with open(run_dir / "metrics.csv") as f:
        columns = set(next(csv.reader(f)))
    assert {"train/loss", "val/acc1", "val/loss", "lr-SGD"} <= columns
    assert list(run_dir.glob("events.out.tfevents.*")), "TensorBoard logger wrote nothing"

    # The checkpoint rebuilds the model with no config at hand and gives the same outputs.
    model = FishNetModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt").eval()
    assert model.hparams.backbone == "fishnet_tiny" and model.hparams.num_classes == 4
    x = torch.randn(2, 3, 64, 64)
    trained = cli.model.eval()
    trained.load_state_dict(torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"])
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained(x))


def test_predict_writes_top5_classes_with_scores(quickstart, tmp_path):
    cli, cwd = quickstart
    ckpt = cwd / "runs" / "quickstart" / "classification" / "checkpoints" / "last.ckpt"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        run_cli(["predict", "--config", QUICKSTART, "--ckpt_path", ckpt, "--predict_dir", tmp_path,
                 "--trainer.enable_progress_bar", "false"])
    records = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == len(cli.datamodule.datasets["val"])  # predicts the val split by default
    first = records[0]
    assert Path(first["path"]).is_file() and len(first["classes"]) == 4 == len(first["scores"])
    assert first["scores"] == sorted(first["scores"], reverse=True) and abs(sum(first["scores"]) - 1) < 1e-4
    assert first["names"][0] == cli.datamodule.classes[first["classes"][0]]


@pytest.mark.parametrize("workers", ["0", "1"])
def test_resume_after_an_epoch_ends_with_the_weights_of_an_uninterrupted_run(in_tmp, workers):
    # Shuffling, augmentation (in workers or in this process) and MixUp all draw random numbers:
    # resuming must continue every stream where the stopped run left it.
    args = ["fit", *small_run(in_tmp, "--model.head.init_args.mixup_alpha", "0.4"), "--trainer.max_epochs", "2",
            "--data.init_args.num_workers", workers]
    run_cli([*args, *csv_logger("a")])
    with pytest.raises(SystemExit):  # stopped at the start of the second epoch, like Ctrl-C
        run_cli([*args, *csv_logger("b"), "--trainer.callbacks+=tests.helpers.InterruptAtStep",
                 "--trainer.callbacks.step=4"])
    assert torch.load("b/checkpoints/last.ckpt", weights_only=True)["global_step"] == 4
    run_cli([*args, *csv_logger("b"), "--ckpt_path", "b/checkpoints/last.ckpt"])
    a = torch.load("a/checkpoints/last.ckpt", weights_only=True)
    b = torch.load("b/checkpoints/last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 8
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, msg=key)


def test_run_killed_mid_epoch_resumes_from_its_last_checkpoint_and_finishes(in_tmp):
    kill = ["--trainer.callbacks+=fishnet_pl.callbacks.LastCheckpoint",
            "--trainer.callbacks.every_n_train_steps=2",
            "--trainer.callbacks+=tests.helpers.KillAtStep", "--trainer.callbacks.step=6"]
    args = ["fit", *small_run(in_tmp), "--trainer.max_epochs", "2", *csv_logger("run")]
    killed = run_cli_subprocess([*args, *kill], cwd=in_tmp)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert torch.load("run/checkpoints/last.ckpt", weights_only=True)["global_step"] == 6  # mid-epoch 2

    resumed = run_cli_subprocess([*args, "--ckpt_path", "run/checkpoints/last.ckpt"], cwd=in_tmp)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = torch.load("run/checkpoints/last.ckpt", weights_only=True)
    assert final["global_step"] == 8 and final["epoch"] == 1


def test_ddp_on_two_cpu_processes_trains_and_syncs_validation_metrics(in_tmp):
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
           "--trainer.limit_val_batches", "1.0", "--data.init_args.batch_size", "8"]
    result = run_cli_subprocess(["fit", *small_run(in_tmp), "--trainer.max_epochs", "1",
                                 *csv_logger("ddp"), *ddp], cwd=in_tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    with open("ddp/metrics.csv") as f:
        logged = float(next(row["val/acc1"] for row in csv.DictReader(f) if row["val/acc1"]))
    # One process validating the same weights on the whole validation set gives the same accuracy:
    # the 2-process value was reduced over both halves, not taken from rank 0's half.
    single = run_cli(["validate", *small_run(in_tmp), "--trainer.limit_val_batches", "1.0",
                      "--data.init_args.batch_size", "8", "--ckpt_path", "ddp/checkpoints/last.ckpt",
                      *csv_logger("single")])
    assert single.trainer.callback_metrics["val/acc1"].item() == pytest.approx(logged, abs=1e-6)


def test_validation_on_three_processes_gives_the_one_process_metrics(quickstart, tmp_path):
    _, cwd = quickstart
    ckpt = cwd / "runs" / "quickstart" / "classification" / "checkpoints" / "last.ckpt"
    data = shutil.copytree(cwd / "data" / "quickstart" / "imagenet", tmp_path / "imagenet")
    next((data / "val").rglob("*.JPEG")).unlink()  # 47 val images on 3 processes: the sampler repeats 1
    args = ["--config", QUICKSTART, "--ckpt_path", ckpt, "--data.init_args.root", data,
            "--data.init_args.batch_size", "5"]
    one, three = (validation_metrics(args, tmp_path, devices) for devices in (1, 3))
    assert set(one) == {"val/loss", "val/acc1", "val/acc4"} == set(three)
    assert one == pytest.approx(three, abs=1e-6)


def test_bf16_mixed_precision_trains_on_the_cpu(in_tmp):
    cli = run_cli(["fit", *small_run(in_tmp), "--trainer.max_epochs", "1", "--trainer.precision", "bf16-mixed",
                   *csv_logger("bf16")])
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert cli.trainer.precision == "bf16-mixed"


def test_sync_batchnorm_on_cpu_gives_a_clear_message(in_tmp):
    with pytest.raises(RuntimeError, match="sync_batchnorm=True needs GPUs"):
        run_cli(["fit", *small_run(in_tmp), "--trainer.max_epochs", "1", "--trainer.strategy", "ddp",
                 "--trainer.devices", "1", "--trainer.sync_batchnorm", "true", *csv_logger("sync")])
