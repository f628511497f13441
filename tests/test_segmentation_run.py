"""Segmentation end to end through the CLI: fine-tuning the classification quickstart's backbone on
the quickstart data in the Cityscapes layout, then predicting colour masks."""

from __future__ import annotations

import signal

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.cityscapes_labels import PALETTE
from datamodules.quickstart_segmentation import write_cityscapes
from fishnet_pl import FishNetModule, SegmentationHead

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

QUICKSTART = CONFIGS / "quickstart" / "segmentation.yaml"
CLASSIFICATION_CKPT = "runs/quickstart/classification/last.ckpt"  # the link the config reads
#: The quickstart's precision (bf16-mixed), for a checkpoint-alone predict to compare with the config's.
SAME_PRECISION = ("--trainer.precision", "bf16-mixed")


@pytest.fixture(scope="module")
def quickstart(classification_quickstart_dir):
    """The README's segmentation quickstart, run after the classification one in its directory."""
    cwd = classification_quickstart_dir
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        cli = run_cli(["fit", "--config", QUICKSTART, "--trainer.enable_progress_bar", "false"])
    return cli, cwd


def test_fine_tuning_starts_from_the_classification_backbone_without_its_classifier(classification_quickstart_dir):
    cwd = classification_quickstart_dir
    ckpt = torch.load(cwd / CLASSIFICATION_CKPT, weights_only=True)["state_dict"]
    model = FishNetModule(head=SegmentationHead(), backbone="fishnet_tiny", num_classes=19,
                          backbone_weights=str(cwd / CLASSIFICATION_CKPT))
    ours = model.backbone.state_dict()  # timm's features_only FishNet, held by smp's encoder as .model
    classifier = [k for k in ckpt if k.startswith(("network.fc.", "network.pre_logits."))]
    assert classifier and not [k for k in ours if k.startswith(("model.fc.", "model.pre_logits."))]
    assert all(torch.equal(ckpt[f"network.{k.removeprefix('model.')}"], v) for k, v in ours.items())
    with pytest.raises(ValueError, match="its backbone is 'fishnet_tiny', not 'fishnet99'") as err:
        FishNetModule(head=SegmentationHead(), backbone="fishnet99", num_classes=19,
                      backbone_weights=str(cwd / CLASSIFICATION_CKPT))
    assert CLASSIFICATION_CKPT.split("/")[-1] in str(err.value)


def test_quickstart_reaches_an_miou_well_above_chance(quickstart):
    cli, _ = quickstart
    metrics = cli.trainer.callback_metrics
    # 7 classes on the quickstart images: a constant guess (road) scores an mIoU near 0.05.
    assert metrics["val/miou"] > 0.4, dict(metrics)
    assert {"val/iou_road", "val/iou_sky", "val/iou_car", "val/iou_person"} <= set(metrics)
    # The progress bar shows the headline numbers; per-class IoU goes to the loggers only.
    shown = set(cli.trainer.progress_bar_metrics)
    assert {"train/loss", "val/miou"} <= shown and not any(name.startswith("val/iou_") for name in shown), shown


def test_validation_on_three_processes_gives_the_one_process_metrics(quickstart):
    _, cwd = quickstart
    ckpt = run_checkpoint(cwd / "runs" / "quickstart" / "segmentation")
    # 8 val images on 3 processes: the distributed sampler repeats 1 to give each 3.
    args = ["--config", QUICKSTART, "--ckpt_path", ckpt, "--data.init_args.val_batch_size", "2"]
    one, three = (validation_metrics(args, cwd, devices) for devices in (1, 3))
    assert set(one) == set(three) and {"val/miou", "val/iou_road", "val/iou_car"} <= set(one)
    assert one == pytest.approx(three, abs=1e-6)


def test_predict_writes_a_cityscapes_colour_mask_and_an_overlay_per_image(quickstart, tmp_path):
    cli, cwd = quickstart
    ckpt = run_checkpoint(cwd / "runs" / "quickstart" / "segmentation")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        run_cli(["predict", "--config", QUICKSTART, "--ckpt_path", ckpt, "--predict_dir", tmp_path,
                 "--trainer.enable_progress_bar", "false"])
    images = sorted((cwd / "data/quickstart/cityscapes/leftImg8bit/test").rglob("*_leftImg8bit.png"))
    assert images
    for image in images:  # named by their paths under the dataset root, as the test split lays them out
        name = tmp_path / image.relative_to(cli.datamodule.root)
        mask, overlay = (Image.open(f"{name}.{kind}.png") for kind in ("mask", "overlay"))
        assert mask.mode == "P" and mask.size == Image.open(image).size  # 240x120, unpadded
        assert overlay.width == mask.width and overlay.height > mask.height  # the legend below the image
        labels = np.asarray(mask)
        assert labels.max() < 19
        colours = np.asarray(mask.convert("RGB"))
        np.testing.assert_array_equal(colours, np.asarray(PALETTE, np.uint8)[labels])

    # The checkpoint alone predicts a user's folder as the config did the test images (scale, palette),
    # one image per step: each keeps its own size.
    out, unreadable, readable = predict_from_checkpoint_alone(ckpt, images[:2], tmp_path / "alone", *SAME_PRECISION)
    # Same-named images in two folders, gray.jpg and gray.png: each its own files.
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == sorted(
        f"{r}.{kind}.png" for r in readable for kind in ("mask", "overlay"))
    for image in images[:2]:
        mine = Image.open(out / "nested" / f"{image.name}.mask.png")
        theirs = Image.open(tmp_path / f"{image.relative_to(cli.datamodule.root)}.mask.png")
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))
        assert mine.getpalette() == theirs.getpalette()
    assert Image.open(out / "nested" / "cmyk.JPG.mask.png").size == (33, 81)  # any size, cropped back from the padding
    assert (out / "unreadable.txt").read_text().splitlines() == unreadable


def test_backbone_can_stay_frozen_for_the_first_epochs(classification_quickstart_dir, tmp_path):
    cwd = classification_quickstart_dir
    data = write_cityscapes(cwd / "data/quickstart/cityscapes")  # not in the working directory: written here
    args = ["fit", "--config", QUICKSTART, "--model.backbone_weights", cwd / CLASSIFICATION_CKPT,
            "--data.init_args.root", data, "--data.init_args.num_workers", "0",
            "--model.frozen_stages", "11", "--model.unfreeze_at_epoch", "1", "--trainer.limit_train_batches", "1",
            "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
            *csv_logger(tmp_path / "frozen")]
    start = FishNetModule(head=SegmentationHead(), backbone="fishnet_tiny", num_classes=19,
                          backbone_weights=str(cwd / CLASSIFICATION_CKPT)).backbone.state_dict()
    for epochs, changed in (("1", False), ("2", True)):
        cli = run_cli([*args, "--trainer.max_epochs", epochs])
        weight = cli.model.backbone.state_dict()["model.stem.conv1.0.weight"]
        assert (not torch.equal(weight, start["model.stem.conv1.0.weight"])) == changed, epochs


def test_run_killed_mid_epoch_ends_with_the_weights_of_an_uninterrupted_run(in_tmp):
    # SIGKILL after the mid-epoch checkpoint of step 4 (epoch 1), data loaded in this process (loading workers:
    # tests/test_classification_run.py): the resumed run continues the shuffling and the random scale, crop, flip
    # and colour jitter of image and mask where they stood, and ends with the uninterrupted run's weights.
    args = ["fit", "--config", QUICKSTART, "--model.backbone_weights", "null", "--data.init_args.num_workers", "0",
            "--data.init_args.crop_size", "[64, 128]", "--trainer.limit_train_batches", "3",
            "--trainer.limit_val_batches", "1", "--trainer.max_epochs", "2",
            "--trainer.enable_progress_bar", "false", "--trainer.callbacks+=fishnet_pl.callbacks.LastCheckpoint",
            "--trainer.callbacks.every_n_train_steps=2"]
    run_cli([*args, *csv_logger("a")])
    killed = run_cli_subprocess([*args, *csv_logger("b"), "--trainer.callbacks+=tests.helpers.KillAtStep",
                                 "--trainer.callbacks.step=5"], cwd=in_tmp)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert torch.load("b/checkpoints/last.ckpt", weights_only=True)["global_step"] == 4
    run_cli([*args, *csv_logger("b"), "--ckpt_path", "last"])
    assert_same_final_weights("a/checkpoints/last.ckpt", "b/checkpoints/last.ckpt", global_step=6)


def test_the_quickstart_reaches_its_floor_in_fp32_as_in_bf16(classification_quickstart_dir, tmp_path):
    # The quickstart trains in bf16-mixed + channels_last (its fastest on this CPU, python -m bench.fit); in fp32
    # NCHW it reaches the same floor (test_quickstart_reaches_an_miou_well_above_chance).
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(classification_quickstart_dir)
        cli = run_cli(["fit", "--config", QUICKSTART, "--trainer.precision", "32-true", "--model.channels_last",
                       "false", "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", tmp_path])
    assert cli.trainer.precision == "32-true" and cli.trainer.callback_metrics["val/miou"] > 0.4
