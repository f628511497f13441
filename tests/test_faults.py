"""Faults a user meets, each stopped with one message naming the step, the file or the folder: a NaN loss,
a checkpoint that is truncated, foreign or weights-only, an output folder that cannot be written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fishnet_pl.checkpoint import CKPT_BACKBONE_KEY

from .conftest import csv_logger, run_cli
from .test_classification_run import mid_epoch_checkpoints, small_run


def test_a_nan_loss_stops_the_run_naming_the_step_and_the_last_good_checkpoint(in_tmp):
    args = ["fit", *small_run(in_tmp), "--data.init_args.num_workers", "0", "--trainer.max_epochs", "1",
            *csv_logger("run"), *mid_epoch_checkpoints(every=1),
            "--trainer.callbacks+=tests.helpers.NaNInputAtStep", "--trainer.callbacks.step=2"]
    last = Path("run", "checkpoints", "last.ckpt")
    with pytest.raises(FloatingPointError) as err:
        run_cli(args)
    message = str(err.value)
    assert "the training loss at global step 2 (epoch 0, batch 2) is nan" in message, message
    assert f"Last good checkpoint: {last} (step 2)" in message, message
    ckpt = torch.load(last, weights_only=True)  # not overwritten by the NaN step
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def _write_checkpoint(path, kind: str) -> None:
    ours = {"state_dict": {"network.w": torch.zeros(4096)}, "hyper_parameters": {"backbone": "fishnet_tiny"},
            CKPT_BACKBONE_KEY: {"name": "fishnet_tiny", "prefix": "network."}}
    if kind == "text":
        path.write_text("epoch=3 step=1200\n")
    elif kind == "truncated":  # a copy or a save that did not finish
        torch.save({**ours, "optimizer_states": [], "loops": {}}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "foreign":  # another project's Lightning checkpoint
        torch.save({"state_dict": {"model.w": torch.zeros(4)}, "hyper_parameters": {}}, path)
    else:  # weights only: ModelCheckpoint(save_weights_only=True), or trainer.save_checkpoint(weights_only=True)
        torch.save(ours, path)


@pytest.mark.parametrize(("kind", "message"), [
    ("truncated", "not a readable PyTorch checkpoint; the file is truncated"),
    ("text", "not a readable PyTorch checkpoint"),
    ("foreign", "a Lightning checkpoint, but not one of fishnet-pl's"),
    ("weights_only", "holds the weights only (no optimizer_states or loops), not the training state"),
])
def test_a_bad_checkpoint_stops_fit_before_it_starts_with_one_error_naming_the_file(in_tmp, kind, message):
    path = in_tmp / f"{kind}.ckpt"
    _write_checkpoint(path, kind)
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        run_cli(["fit", *small_run(in_tmp), *csv_logger("run"), "--ckpt_path", path])
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value), str(err.value)
    assert not (in_tmp / "run" / "checkpoints").exists()  # nothing ran


def test_plain_weights_given_as_ckpt_path_are_refused_by_validate_naming_the_file(in_tmp):
    path = in_tmp / "resnet18.pth"  # a timm or torchvision file belongs in --model.backbone_weights
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7)}, path)
    with pytest.raises(ValueError, match=f"{path}: not a fishnet-pl Lightning checkpoint"):
        run_cli(["validate", *small_run(in_tmp), *csv_logger("run"), "--ckpt_path", path])


@pytest.mark.parametrize("where", ["--trainer.default_root_dir", "logger", "--predict_dir"])
def test_an_unwritable_output_folder_is_reported_before_the_run_starts(in_tmp, where):
    blocker = in_tmp / "a_file"
    blocker.write_text("a file where the run wants a folder")
    folder = blocker / "out"
    if where == "logger":
        args, what = ["fit", *small_run(in_tmp), *csv_logger(folder)], "the save_dir of CSVLogger"
    elif where == "--predict_dir":
        args, what = ["predict", *small_run(in_tmp), *csv_logger("run"), "--predict_dir", folder], where
    else:
        args, what = ["fit", *small_run(in_tmp), *csv_logger("run"), where, folder], where
    with pytest.raises(PermissionError) as err:
        run_cli(args)
    assert str(err.value).startswith(f"{folder}: cannot write there") and f"it is {what}," in str(err.value)
