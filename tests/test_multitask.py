"""Several tasks on one backbone (the model half of issue 23): one set of backbone weights under every task's
network, the weighted loss, per-task evaluation and metrics, checkpoints both ways."""

from __future__ import annotations

import pytest
import torch

from datamodules.dataset_info import DatasetInfo
from fishnet_pl import FishNetModule
from fishnet_pl.tasks import ClassificationHead, DetectionHead, MultiTaskHead, SegmentationHead

SEG = {"decoder_kwargs": {"decoder_pyramid_channels": 32, "decoder_segmentation_channels": 32}}
DET = {"fpn_channels": 32, "min_size": 64, "max_size": 64, "representation_size": 32, "mask_head_channels": 8,
       "box_batch_size_per_image": 16}
CLASSES = {"cls": 4, "seg": 5, "det": 3}


def three_tasks(backbone: str = "fishnet_tiny", **kwargs) -> FishNetModule:
    torch.manual_seed(0)
    head = MultiTaskHead({"cls": ClassificationHead(), "seg": SegmentationHead(**SEG), "det": DetectionHead(**DET)},
                         **kwargs)
    return FishNetModule(head, backbone=backbone, num_classes=dict(CLASSES))


def batches() -> dict:
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:30, 20:50] = 1
    target = {"boxes": torch.tensor([[20.0, 10.0, 50.0, 30.0]]), "labels": torch.tensor([2]), "masks": masks}
    return {"cls": {"image": torch.rand(2, 3, 64, 64), "label": torch.tensor([0, 3])},
            "seg": {"image": torch.rand(2, 3, 64, 64), "mask": torch.randint(0, 5, (2, 64, 64))},
            "det": {"image": [torch.rand(3, 64, 64)], "target": [target]}}


@pytest.mark.parametrize("backbone", ["fishnet_tiny", "resnet18"])  # timm's getter and list feature wrappers
def test_every_task_network_holds_the_one_shared_backbone(backbone):
    module = three_tasks(backbone)
    network, shared = module.network, module.backbone
    assert shared is network.tasks["cls"]  # the classifier keeps its classifier
    shared_ids = {id(p) for p in shared.parameters()}
    for path in ("seg.encoder.model", "det.backbone.body"):
        inner = network.tasks.get_submodule(path)
        assert {id(p) for p in inner.parameters()} <= shared_ids, path
    singles = {n: FishNetModule(h, backbone=backbone, num_classes=CLASSES[n]) for n, h in
               (("cls", ClassificationHead()), ("seg", SegmentationHead(**SEG)), ("det", DetectionHead(**DET)))}

    def size(m):
        return sum(p.numel() for p in m.parameters())

    # One backbone's weights: the decoders' own, plus the classifier's backbone once.
    assert size(module) == size(singles["cls"]) + sum(size(singles[t]) - size(singles[t].backbone)
                                                      for t in ("seg", "det"))

def test_the_loss_is_the_weighted_sum_and_each_task_trains_the_shared_backbone():
    module = three_tasks(loss_weights={"seg": 0.5, "det": 2.0}).train()
    torch.manual_seed(1)
    loss, logs = module.head.training_step(module.network, batches())
    expected = logs["cls/loss"] + 0.5 * logs["seg/loss"] + 2.0 * logs["det/loss"]
    assert loss.item() == pytest.approx(expected.item()) and logs["seg/weighted_loss"] == 0.5 * logs["seg/loss"]
    stem = next(module.backbone.parameters())
    for task in CLASSES:  # each task alone reaches the shared weights
        module.zero_grad()
        task_loss, _ = module.head.training_step(module.network, {task: batches()[task]})
        task_loss.backward()
        assert stem.grad is not None and stem.grad.abs().sum() > 0, task
    with pytest.raises(ValueError, match="one batch per task"):
        module.head.training_step(module.network, {"depth": {}})


def test_evaluation_goes_to_the_batchs_task_and_metrics_are_logged_per_task():
    module = three_tasks().eval()
    head = module.head
    assert head.monitor == "val/cls/acc1" and head.monitor_mode == "max"
    assert {"loss", "cls/acc1", "seg/miou", "det/bbox_ap"} <= set(head.progress_bar)
    with torch.no_grad():
        head.evaluation_step(module.network, {"task": "cls", **batches()["cls"], "index": torch.tensor([0, 1])}, "val")
        head.evaluation_step(module.network, {"task": "seg", **batches()["seg"], "index": torch.tensor([0, 1])}, "val")
    logs = head.metrics["val"].compute()
    assert {"cls/acc1", "cls/loss", "seg/miou"} <= set(logs) and not any(k.startswith("det/") for k in logs)
    with pytest.raises(ValueError, match="names its task"):
        head.evaluation_step(module.network, batches()["cls"], "val")
    head.set_dataset_info(DatasetInfo(tasks={"cls": DatasetInfo(class_names=["a", "b", "c", "d"])}))
    assert head.heads["cls"].class_names == ["a", "b", "c", "d"] and head.heads["seg"].class_names is None


def test_a_multitask_checkpoint_rebuilds_itself_and_starts_a_single_task_run(tmp_path):
    module = three_tasks(loss_weights={"det": 2.0}).eval()
    info = DatasetInfo(tasks={"cls": DatasetInfo(class_names=["a", "b", "c", "d"])})
    module.head.set_dataset_info(info)
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "multi.ckpt")
    loaded = torch.load(tmp_path / "multi.ckpt", weights_only=True)
    again = FishNetModule(**{k: v for k, v in loaded["hyper_parameters"].items()}).eval()
    again.load_state_dict(loaded["state_dict"])
    again.on_load_checkpoint(loaded)
    assert again.head.heads["cls"].class_names == ["a", "b", "c", "d"] and again.head.loss_weights == {"det": 2.0}
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again(images)["seg"], module(images)["seg"])
    # Its backbone starts a single-task run.
    single = FishNetModule(SegmentationHead(**SEG), backbone="fishnet_tiny", num_classes=5,
                           backbone_weights=str(tmp_path / "multi.ckpt"))
    shared = module.backbone.state_dict()
    assert all(torch.equal(v, shared[k.removeprefix("model.")]) for k, v in single.backbone.state_dict().items())


def test_the_three_quickstart_datasets_train_one_backbone_through_the_cli(in_tmp):
    from .conftest import CONFIGS, run_cli

    cli = run_cli(["fit", "--config", CONFIGS / "quickstart" / "multitask.yaml", "--trainer.max_epochs", "1",
                   "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
                   "--trainer.enable_progress_bar", "false"])
    assert cli.model.hparams.num_classes == {"cls": 4, "seg": 19, "det": 3}  # linked from each datamodule
    metrics = set(cli.trainer.callback_metrics)
    assert {"train/cls/loss", "train/seg/loss", "train/det/loss", "train/loss"} <= metrics
    assert {"val/cls/acc1", "val/seg/miou", "val/det/bbox_ap", "val/det/segm_ap"} <= metrics
    run = in_tmp / cli.trainer.log_dir
    assert (run / "det" / "val_detections.json").is_file()  # each task's results in its own folder
    assert [p.name for p in (run / "checkpoints").glob("*val_cls_acc1*")]  # the first task's headline metric
    info = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["fishnet_pl_dataset"]["tasks"]
    assert info["seg"]["palette"][0] == [128, 64, 128] and info["det"]["label_to_category_id"]


def multitask_config(folder, **overrides: dict) -> str:
    """The multi-task quickstart recipe without workers or loggers, written into ``folder``; ``overrides`` are
    further datamodule arguments by task."""
    import yaml

    from .conftest import CONFIGS

    config = yaml.safe_load((CONFIGS / "quickstart" / "multitask.yaml").read_text())
    for dm in config["data"]["init_args"]["datamodules"].values():
        dm["init_args"]["num_workers"] = 0
    for task, arguments in overrides.items():
        config["data"]["init_args"]["datamodules"][task]["init_args"].update(arguments)
    config["trainer"]["logger"] = False
    (folder / "multitask.yaml").write_text(yaml.safe_dump(config))
    return "multitask.yaml"


def test_a_multitask_run_killed_mid_epoch_ends_with_the_weights_of_an_uninterrupted_run(in_tmp):
    # SIGKILL after the mid-epoch checkpoint of step 4: the three tasks' loaders continue where they stood.
    import signal

    from .conftest import assert_same_final_weights, csv_logger, run_cli, run_cli_subprocess

    args = ["fit", "--config", multitask_config(in_tmp), "--trainer.limit_train_batches", "3",
            "--trainer.limit_val_batches", "1", "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks+=fishnet_pl.callbacks.LastCheckpoint", "--trainer.callbacks.every_n_train_steps=2"]
    run_cli([*args, *csv_logger("a")])
    killed = run_cli_subprocess([*args, *csv_logger("b"), "--trainer.callbacks+=tests.helpers.KillAtStep",
                                 "--trainer.callbacks.step=5"], cwd=in_tmp)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert torch.load("b/checkpoints/last.ckpt", weights_only=True)["global_step"] == 4
    run_cli([*args, *csv_logger("b"), "--ckpt_path", "last"])
    assert_same_final_weights("a/checkpoints/last.ckpt", "b/checkpoints/last.ckpt", global_step=6)


def test_multitask_validation_on_three_processes_gives_the_one_process_metrics(in_tmp):
    from .conftest import csv_logger, run_cli, validation_metrics

    # One detection image per step: torchvision pads a batch's images to one size, which moves an untrained
    # detector's boxes, so 4-image batches composed differently on 1 and 3 processes would differ in AP.
    config = multitask_config(in_tmp, det={"batch_size": 1})
    run_cli(["fit", "--config", config, "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
             "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false", *csv_logger("fit")])
    # Each task's val set on 3 processes (the distributed sampler repeats a few images): every image once per task.
    args = ["--config", config, "--ckpt_path", "fit/checkpoints/last.ckpt"]
    one, three = (validation_metrics(args, in_tmp, devices) for devices in (1, 3))
    assert {"val/cls/acc1", "val/seg/miou", "val/det/bbox_ap"} <= set(one) and set(one) == set(three)
    assert one == pytest.approx(three, abs=1e-6)
