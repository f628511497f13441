"""The paper's baselines run every task: each quickstart with a timm ResNet instead of FishNet."""

from __future__ import annotations

import math

import torch

from fishnet_pl import FishNetModule, SegmentationHead
from fishnet_pl.cli import build_cli

from .conftest import CONFIGS, run_checkpoint, run_cli


def quickstart(task: str, *extra: str):
    return run_cli(["fit", "--config", CONFIGS / "quickstart" / f"{task}.yaml", "--model.backbone", "resnet18",
                    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                    "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false", *extra])


def test_every_quickstart_runs_on_resnet18(in_tmp):
    classification = quickstart("classification")
    assert math.isfinite(classification.trainer.callback_metrics["val/acc1"])
    last = run_checkpoint(in_tmp / "runs/quickstart/classification")
    assert last.is_file()

    # Segmentation fine-tunes from that checkpoint (the quickstart config names it): its encoder starts
    # from the trained ResNet-18, through smp's timm-universal encoder.
    start = FishNetModule(SegmentationHead(), backbone="resnet18", num_classes=7, backbone_weights=last)
    trained = torch.load(last, weights_only=True)["state_dict"]["network.layer1.0.conv1.weight"]
    torch.testing.assert_close(start.backbone.layer1[0].conv1.weight, trained)
    segmentation = quickstart("segmentation")
    assert type(segmentation.model.network.encoder).__name__ == "TimmUniversalEncoder"
    assert math.isfinite(segmentation.trainer.callback_metrics["val/miou"])

    detection = quickstart("detection")
    assert type(detection.model.backbone).__name__ == "FeatureListNet"
    assert math.isfinite(detection.trainer.callback_metrics["val/bbox_ap"])
    ckpt = run_checkpoint(in_tmp / "runs/quickstart/detection")
    assert FishNetModule.load_from_checkpoint(ckpt).hparams.backbone == "resnet18"


def test_imagenet_input_size_and_eval_resize_come_from_the_backbones_pretrained_cfg(in_tmp):
    def sizes(backbone: str, *extra: str) -> tuple[int, int]:
        args = ["--config", CONFIGS / "quickstart" / "classification.yaml", "--model.backbone", backbone,
                "--data.init_args.image_size", "null", "--data.init_args.val_resize", "null", *extra]
        cli = build_cli([str(a) for a in args], run=False)  # builds the classes, runs nothing
        return cli.datamodule.image_size, cli.datamodule.val_resize

    assert sizes("fishnet_tiny") == (224, 256)  # FishNet's cfg: 224 crops of 256-resized images
    assert sizes("resnet18") == (224, round(224 / 0.95))  # timm's ResNet-18 default tag: crop_pct 0.95
    assert sizes("fishnet_tiny", "--data.init_args.image_size", "64")[0] == 64  # a config value wins
