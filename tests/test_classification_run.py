"""Classification end to end through the CLI on the quickstart data: what a user runs from the README."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from datamodules.imagenet import QUICKSTART_ROOT
from fishnet_pl import FishNetModule
from fishnet_pl.checkpoint import CKPT_DATASET_KEY

from .conftest import (
    CONFIGS,
    assert_same_final_weights,
    csv_logger,
    predict_from_checkpoint_alone,
    run_checkpoint,
    run_cli,
    run_cli_subprocess,
    validation_metrics,
)

QUICKSTART = CONFIGS / "quickstart" / "classification.yaml"
#: The quickstart's precision (bf16-mixed), for a checkpoint-alone predict to compare with the config's.
SAME_PRECISION = ("--trainer.precision", "bf16-mixed")


def small_run(root: Path, *extra: str) -> list[str]:
    """A seconds-long quickstart run in the working directory ``root`` (the demo data in its quickstart folder there):
    32x32 images, 4 batches an epoch, one worker."""
    return ["--config", QUICKSTART, "--data.init_args.root", root / QUICKSTART_ROOT,
            "--data.init_args.image_size", "32", "--data.init_args.val_resize", "36",
            "--data.init_args.num_workers", "1", "--trainer.limit_train_batches", "4",
            "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false", *extra]


def mid_epoch_checkpoints(every: int) -> list[str]:
    """CLI arguments adding ``last.ckpt`` every ``every`` training steps."""
    return ["--trainer.callbacks+=fishnet_pl.callbacks.LastCheckpoint",
            f"--trainer.callbacks.every_n_train_steps={every}"]


@pytest.fixture
def quickstart(classification_quickstart):
    return classification_quickstart


def test_quickstart_learns_well_above_chance(quickstart):
    cli, _ = quickstart
    # 4 balanced classes: chance is 25%.
    assert cli.test_metrics["test/acc1"] > 0.6, cli.test_metrics


def test_checkpoints_logs_and_hyperparameters_of_a_run(quickstart):
    cli, cwd = quickstart
    recipe_dir = cwd / "runs" / "quickstart" / "classification"
    run_dir = cwd / cli.trainer.log_dir  # this run's own folder, shared by both loggers, its checkpoints and config
    assert run_dir.parent == recipe_dir and run_dir.name.startswith("version_")
    assert (run_dir / "config.yaml").is_file() and [p.name for p in recipe_dir.glob("version_*")] == [run_dir.name]
    assert (recipe_dir / "last.ckpt").resolve() == (run_dir / "checkpoints" / "last.ckpt").resolve()
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and any(n.startswith("epoch") and "val_acc1=" in n for n in checkpoints)
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"train/loss", "val/acc1", "val/loss", "lr-SGD"} <= set(rows[0])
    assert sum(bool(row["train/loss"]) for row in rows) >= 24, "too few training rows to draw a curve"
    assert "val/acc4" not in rows[0], "top-4 accuracy of 4 classes is always 1"
    assert set(cli.trainer.progress_bar_metrics) == {"test/loss", "test/acc1"}  # after the fixture's test run
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
    ckpt = run_checkpoint(cwd / "runs" / "quickstart" / "classification")
    args = ["predict", "--config", QUICKSTART, "--ckpt_path", ckpt, "--predict_dir", tmp_path,
            "--trainer.enable_progress_bar", "false"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        run_cli(args)
        written = (tmp_path / "predictions.jsonl").read_bytes()
        # Another run into the same folder is refused before predicting, unless told to overwrite.
        with pytest.raises(FileExistsError, match=f"{tmp_path}: holds files .* pass --overwrite true"):
            run_cli(args)
        assert (tmp_path / "predictions.jsonl").read_bytes() == written
        run_cli([*args, "--overwrite", "true"])
    records = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == len(cli.datamodule.datasets["val"])  # predicts the val split by default
    first = records[0]
    # "path" is relative to the dataset root (the predict root, for a folder), "file" the image as read.
    assert Path(first["file"]).is_file() and Path(first["file"]) == cli.datamodule.root / first["path"]
    assert len(first["classes"]) == 4 == len(first["scores"])
    assert first["scores"] == sorted(first["scores"], reverse=True) and abs(sum(first["scores"]) - 1) < 1e-4
    # Named by shape (the quickstart's LOC_synset_mapping.txt), not by class folder (wnid); so is the checkpoint.
    assert cli.datamodule.class_names == ["circle", "square", "triangle", "stripes"]
    assert first["names"][0] == cli.datamodule.class_names[first["classes"][0]]
    assert torch.load(ckpt, weights_only=True)[CKPT_DATASET_KEY]["class_names"] == cli.datamodule.class_names

    # The checkpoint alone predicts a user's folder as the config did the val images (crop, resize, names).
    some = records[::12]
    out, unreadable, readable = predict_from_checkpoint_alone(ckpt, [Path(r["file"]) for r in some],
                                                              tmp_path / "alone", *SAME_PRECISION)
    alone = {r["path"]: r for r in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}
    assert sorted(alone) == readable  # same-named images in two folders, gray.jpg and gray.png: each its own
    for r in some:
        mine = alone[f"nested/{Path(r['file']).name}"]
        assert mine["classes"] == r["classes"] and mine["names"] == r["names"], r["path"]
        assert mine["scores"] == pytest.approx(r["scores"], abs=1e-5)
    assert (out / "unreadable.txt").read_text().splitlines() == unreadable


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


def resumable_run(root: Path) -> list[str]:
    """Two epochs of 4 steps with two loading workers, the authors' augmentation and MixUp (random numbers drawn
    in workers and in this process), ``last.ckpt`` also every 3 steps."""
    return ["fit", *small_run(root, "--model.head.init_args.mixup_alpha", "0.4"), "--trainer.max_epochs", "2",
            "--data.init_args.num_workers", "2", *mid_epoch_checkpoints(every=3)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """``last.ckpt`` of ``resumable_run`` run without interruption."""
    cwd = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        run_cli([*resumable_run(cwd), *csv_logger("a")])
    return cwd / "a" / "checkpoints" / "last.ckpt"


def test_run_killed_twice_mid_epoch_ends_with_the_weights_of_an_uninterrupted_run(in_tmp, uninterrupted):
    # SIGKILL (no clean-up) after the mid-epoch checkpoint of step 3 (epoch 0), then, resumed with --ckpt_path last,
    # after that of step 6 (epoch 1): the twice resumed run ends with the uninterrupted run's weights, bit for bit
    # (data order, each worker's augmentation stream and the MixUp draws continue where the killed run stood).
    args = [*resumable_run(in_tmp), *csv_logger("b")]
    for kill_at, resume in ((3, []), (7, ["--ckpt_path", "last"])):
        killed = run_cli_subprocess([*args, *resume, "--trainer.callbacks+=tests.helpers.KillAtStep",
                                     f"--trainer.callbacks.step={kill_at}"], cwd=in_tmp)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        assert torch.load("b/checkpoints/last.ckpt", weights_only=True)["global_step"] == kill_at // 3 * 3
    run_cli([*args, "--ckpt_path", "last"])
    assert_same_final_weights(uninterrupted, "b/checkpoints/last.ckpt", global_step=8)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly_and_the_resumed_run_ends_exactly(in_tmp, uninterrupted):
    # A scheduler's SIGTERM during step 5 (epoch 1): the step finishes, last.ckpt is saved, the run exits with
    # status 0 (SystemExit without a code); resumed, it ends with the uninterrupted run's weights.
    args = [*resumable_run(in_tmp), *csv_logger("b")]
    with pytest.raises(SystemExit) as stopped:
        run_cli([*args, "--trainer.callbacks+=tests.helpers.SignalAtStep", "--trainer.callbacks.step=4"])
    assert stopped.value.code in (None, 0)
    assert torch.load("b/checkpoints/last.ckpt", weights_only=True)["global_step"] == 5  # not a multiple of 3
    run_cli([*args, "--ckpt_path", "last"])
    assert_same_final_weights(uninterrupted, "b/checkpoints/last.ckpt", global_step=8)


def ddp_run(root: Path) -> list[str]:
    """One epoch of 4 steps on two CPU processes (one loading worker each), ``last.ckpt`` also every 2 steps."""
    return ["fit", *small_run(root), "--trainer.max_epochs", "1", "--trainer.strategy", "ddp", "--trainer.devices", "2",
            "--trainer.accelerator", "cpu", "--trainer.limit_val_batches", "1.0", "--data.init_args.batch_size", "8",
            *mid_epoch_checkpoints(every=2)]


@pytest.fixture(scope="module")
def ddp_uninterrupted(tmp_path_factory) -> Path:
    """The working directory of ``ddp_run``, run without interruption (logs and checkpoints in ``ddp/``)."""
    cwd = tmp_path_factory.mktemp("ddp")
    result = run_cli_subprocess([*ddp_run(cwd), *csv_logger("ddp")], cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd


def test_ddp_on_two_cpu_processes_trains_and_syncs_validation_metrics(ddp_uninterrupted, monkeypatch):
    in_tmp = ddp_uninterrupted
    monkeypatch.chdir(in_tmp)
    with open("ddp/metrics.csv") as f:
        logged = float(next(row["val/acc1"] for row in csv.DictReader(f) if row["val/acc1"]))
    # One process validating the same weights on the whole validation set gives the same accuracy:
    # the 2-process value was reduced over both halves, not taken from rank 0's half.
    single = run_cli(["validate", *small_run(in_tmp), "--trainer.limit_val_batches", "1.0",
                      "--data.init_args.batch_size", "8", "--ckpt_path", "ddp/checkpoints/last.ckpt",
                      *csv_logger("single")])
    assert single.trainer.callback_metrics["val/acc1"].item() == pytest.approx(logged, abs=1e-6)


def test_ddp_run_killed_mid_epoch_ends_with_the_weights_of_an_uninterrupted_run(in_tmp, ddp_uninterrupted):
    # Both processes SIGKILLed after the checkpoint of step 2: resumed on two processes, each continues its own part
    # of the distributed sampler's order and its worker's augmentation stream, ending with the uninterrupted weights.
    args = [*ddp_run(in_tmp), *csv_logger("b")]
    killed = run_cli_subprocess([*args, "--trainer.callbacks+=tests.helpers.KillAtStep", "--trainer.callbacks.step=3"],
                                cwd=in_tmp)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert torch.load("b/checkpoints/last.ckpt", weights_only=True)["global_step"] == 2
    resumed = run_cli_subprocess([*args, "--ckpt_path", "last"], cwd=in_tmp)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_final_weights(ddp_uninterrupted / "ddp" / "checkpoints" / "last.ckpt", "b/checkpoints/last.ckpt",
                              global_step=4)


def test_slurm_requeue_signal_saves_an_hpc_checkpoint_requeues_and_last_resumes_from_it(in_tmp):
    # SLURM's --signal=USR1@90 before the time limit: Lightning's SLURMEnvironment (auto_requeue) saves
    # hpc_ckpt_1.ckpt in default_root_dir and runs `scontrol requeue <job id>`. This scontrol records its arguments,
    # then kills the job (as the end of its time would). --ckpt_path last takes the hpc checkpoint (newer than
    # last.ckpt of step 4, the end of epoch 0), and the run continues from step 5 to the end.
    bin_dir = in_tmp / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {in_tmp / "scontrol.args"}\nkill -KILL $PPID\n')
    (bin_dir / "scontrol").chmod(0o755)
    args = [*resumable_run(in_tmp), *csv_logger("b")]
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "fishnet", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost",
             "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    with pytest.MonkeyPatch.context() as mp:
        for name, value in slurm.items():
            mp.setenv(name, value)
        run = run_cli_subprocess([*args, "--trainer.callbacks+=tests.helpers.SignalAtStep",
                                  "--trainer.callbacks.step=5", f"--trainer.callbacks.signum={int(signal.SIGUSR1)}"],
                                 cwd=in_tmp)
    assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
    assert (in_tmp / "scontrol.args").read_text().split() == ["requeue", "4242"]
    hpc = in_tmp / "runs" / "quickstart" / "classification" / "hpc_ckpt_1.ckpt"
    assert torch.load(hpc, weights_only=True)["global_step"] == 5
    assert torch.load("b/checkpoints/last.ckpt", weights_only=True)["global_step"] == 4
    cli = run_cli([*args, "--ckpt_path", "last"])
    assert Path(cli.trainer.ckpt_path).absolute() == hpc and cli.trainer.global_step == 8


def test_validation_on_three_processes_gives_the_one_process_metrics(quickstart, tmp_path):
    _, cwd = quickstart
    ckpt = run_checkpoint(cwd / "runs" / "quickstart" / "classification")
    data = shutil.copytree(cwd / "data" / "quickstart" / "imagenet", tmp_path / "imagenet")
    next((data / "val").rglob("*.JPEG")).unlink()  # 47 val images on 3 processes: the sampler repeats 1
    args = ["--config", QUICKSTART, "--ckpt_path", ckpt, "--data.init_args.root", data,
            "--data.init_args.batch_size", "5"]
    one, three = (validation_metrics(args, tmp_path, devices) for devices in (1, 3))
    assert set(one) == {"val/loss", "val/acc1"} == set(three)  # no top-4 accuracy of 4 classes: always 1
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


def test_the_input_size_rule_is_the_backbones(in_tmp):
    """FishNet needs sides that are multiples of 32 and says so before any step; a backbone without that rule
    (Inception-v3, at the 299 pixels of its pretrained_cfg) trains at its own size."""
    rule = (r"fishnet_tiny needs input sides that are multiples of 32, but the data gives 100x100 images: set "
            r"--data.init_args.image_size to a multiple of 32 \(e.g. 96 or 128\)")
    with pytest.raises(ValueError, match=rule):
        run_cli(["fit", *small_run(in_tmp, "--data.init_args.image_size", "100", "--data.init_args.val_resize", "110")])
    assert not list(in_tmp.rglob("*.ckpt"))
    one_step = ["--model.backbone", "inception_v3", "--data.init_args.image_size", "null",
                "--data.init_args.val_resize", "null", "--data.init_args.batch_size", "2", "--trainer.max_steps", "1"]
    cli = run_cli(["fit", *small_run(in_tmp, *one_step)])
    assert (cli.datamodule.image_size, cli.trainer.global_step) == (299, 1)
    (metrics,) = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    assert math.isfinite(metrics["val/loss"])


def test_the_quickstart_reaches_its_floor_in_fp32_as_in_bf16(in_tmp):
    # The quickstart trains in bf16-mixed + channels_last (its fastest on this CPU, python -m bench.fit); in fp32
    # NCHW it reaches the same floor (test_quickstart_learns_well_above_chance).
    cli = run_cli(["fit", "--config", QUICKSTART, "--trainer.precision", "32-true", "--model.channels_last", "false",
                   "--trainer.enable_progress_bar", "false"])
    (metrics,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best", verbose=False)
    assert cli.trainer.precision == "32-true" and metrics["test/acc1"] > 0.6, metrics


def test_bf16_on_a_cpu_without_native_bf16_trains_in_fp32_and_says_so(monkeypatch, caplog):
    from fishnet_pl.cli import native_bf16_or_fp32

    trainer = {"accelerator": "cpu", "precision": "bf16-mixed"}
    native_bf16_or_fp32(trainer)
    assert trainer["precision"] == "bf16-mixed"  # this machine has it (AVX512-BF16 / AMX)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with caplog.at_level(logging.WARNING):
        native_bf16_or_fp32(trainer)
    assert trainer["precision"] == "32-true" and "no native bf16 arithmetic" in caplog.text
    gpu = {"accelerator": "gpu", "precision": "bf16-mixed"}
    native_bf16_or_fp32(gpu)
    assert gpu["precision"] == "bf16-mixed"
