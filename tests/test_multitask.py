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

def test_the_panoptic_head_is_a_task_like_the_others():
    from datamodules.cityscapes_labels import PANOPTIC_CATEGORIES
    from fishnet_pl.tasks import PanopticHead

    from .test_panoptic_head import sample

    torch.manual_seed(0)
    panoptic = PanopticHead(num_stuff_classes=11, semantic_channels=32, fpn_channels=32, min_size=64, max_size=96,
                            representation_size=32, mask_head_channels=8, box_batch_size_per_image=16)
    module = FishNetModule(MultiTaskHead({"cls": ClassificationHead(), "pan": panoptic}), backbone="fishnet_tiny",
                           num_classes={"cls": 4, "pan": 8})
    module.head.set_dataset_info(DatasetInfo(tasks={"pan": DatasetInfo(categories=PANOPTIC_CATEGORIES)}))
    body = module.network.tasks["pan"].get_submodule(panoptic.backbone_path)
    assert {id(p) for p in body.parameters()} <= {id(p) for p in module.backbone.parameters()}
    image, target = sample()
    loss, logs = module.head.training_step(module.network, {"cls": batches()["cls"],
                                                            "pan": {"image": [image], "target": [target]}})
    loss.backward()
    assert logs["pan/loss_semantic"] > 0 and module.network.tasks["pan"].semantic.predictor.weight.grad.abs().sum() > 0


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


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The multi-task quickstart through the CLI, as ``make demo`` runs it, once for this module: (cli, folder)."""
    from .conftest import CONFIGS, run_cli

    cwd = tmp_path_factory.mktemp("multitask")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        cli = run_cli(["fit", "--config", CONFIGS / "quickstart" / "multitask.yaml",
                       "--trainer.enable_progress_bar", "false"])
    return cli, cwd


#: The single-task quickstarts' own floors (tests/test_classification_run.py, test_segmentation_run.py,
#: test_detection.py), which they clear by a margin: measured by make demo, accuracy 1.00, mIoU 0.69, box AP 0.33,
#: mask AP 0.37. Sharing one backbone, each task of the multi-task quickstart must clear the same floor.
SINGLE_TASK_FLOORS = {"val/cls/acc1": 0.6, "val/seg/miou": 0.4, "val/det/bbox_ap": 0.15, "val/det/segm_ap": 0.15}


def test_the_multitask_quickstart_trains_every_task_to_its_single_task_floor(quickstart):
    cli, _ = quickstart
    metrics = {name: float(cli.trainer.callback_metrics[name]) for name in SINGLE_TASK_FLOORS}
    assert all(metrics[name] > floor for name, floor in SINGLE_TASK_FLOORS.items()), metrics


def test_the_three_quickstart_datasets_train_one_backbone_through_the_cli(quickstart):
    cli, cwd = quickstart
    assert cli.model.hparams.num_classes == {"cls": 4, "seg": 19, "det": 3}  # linked from each datamodule
    metrics = set(cli.trainer.callback_metrics)
    assert {"train/cls/loss", "train/seg/loss", "train/det/loss", "train/loss"} <= metrics
    run = cwd / cli.trainer.log_dir
    assert (run / "det" / "val_detections.json").is_file()  # each task's results in its own folder
    assert [p.name for p in (run / "checkpoints").glob("*val_det_bbox_ap*")]  # the monitored task's headline
    info = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["fishnet_pl_dataset"]["tasks"]
    assert info["seg"]["palette"][0] == [128, 64, 128] and info["det"]["label_to_category_id"]


def test_the_demo_tests_the_multitask_quickstart_on_every_tasks_test_set(quickstart):
    from fishnet_pl import demo

    cli, cwd = quickstart
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        metrics = demo.test_best(cli)
    text = demo.summary({"multitask": (metrics, cwd, cwd / "best.ckpt")})
    assert all(f"test/{name.removeprefix('val/')}=" in text for name in SINGLE_TASK_FLOORS), text


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


def test_alternate_mode_under_ddp_stops_before_its_first_step_unless_ddp_allows_unused_parameters(in_tmp):
    # One process is enough: DDP's reducer checks every parameter got a gradient whatever the world size. Run as
    # new processes: DDP in this one would leave its process group behind for the next tests.
    from .conftest import csv_logger, run_checkpoint, run_cli_subprocess

    args = ["fit", "--config", multitask_config(in_tmp), "--data.init_args.mode", "alternate",
            "--trainer.devices", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "0",
            "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false", *csv_logger("run")]
    stopped = run_cli_subprocess([*args, "--trainer.strategy", "ddp"], cwd=in_tmp)
    assert stopped.returncode == 1, stopped.stderr[-3000:]
    message = "fishnet-pl: error: MultiTaskDataModule(mode='alternate') under DDP"
    assert message in stopped.stderr and "ddp_find_unused_parameters_true" in stopped.stderr, stopped.stderr[-3000:]
    assert not list(in_tmp.glob("run/checkpoints/*.ckpt"))  # stopped before its first step
    ran = run_cli_subprocess([*args, "--trainer.strategy", "ddp_find_unused_parameters_true"], cwd=in_tmp)
    assert ran.returncode == 0, ran.stderr[-3000:]
    # Each task's 2 batches (limit_train_batches), one task a step.
    assert torch.load(run_checkpoint(in_tmp / "run"), weights_only=True)["global_step"] == 6


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


def test_alternate_turns_spread_each_task_by_its_ratio():
    from datamodules.multitask import turns

    assert turns({"det": 2, "seg": 1, "cls": 1}) == ["det", "seg", "cls", "det"]
    assert turns({"a": 1, "b": 1}) == ["a", "b"]
    order = turns({"a": 3, "b": 2})
    assert sorted(order) == ["a", "a", "a", "b", "b"] and "bb" not in "".join(order)


@pytest.mark.parametrize(("epoch", "steps"), [("max_size_cycle", 8), ("min_size", 6)])
def test_the_alternating_loader_takes_one_tasks_batch_per_step_until_the_epoch_ends(epoch, steps):
    from torchdata.stateful_dataloader import StatefulDataLoader

    from datamodules.multitask import AlternatingLoader

    loaders = {"det": StatefulDataLoader(list(range(4))), "cls": StatefulDataLoader(list(range(100, 103)))}
    loader = AlternatingLoader(loaders, {"det": 2, "cls": 1}, epoch)
    out = [(batch, idx) for batch, idx, _ in loader]
    assert len(loader) == len(out) == steps and [idx for _, idx in out] == list(range(steps))
    assert all(len(batch) == 1 for batch, _ in out)  # one task's batch per step
    tasks = ["".join(batch)[0] for batch, _ in out]
    assert tasks == list("dcd" * 4)[:steps]  # det twice as often
    drawn = {task: [int(b[task]) for b, _ in out if task in b] for task in loaders}
    if epoch == "max_size_cycle":  # until cls too has been through its 3 batches, det starting its second pass
        assert drawn == {"det": [0, 1, 2, 3, 0], "cls": [100, 101, 102]}
    else:  # until the first task runs out: det, at its fifth turn
        assert drawn == {"det": [0, 1, 2, 3], "cls": [100, 101]}


def test_alternate_mode_refuses_ratios_it_cannot_follow():
    from datamodules.multitask import MultiTaskDataModule

    dms = {"cls": object(), "seg": object()}
    with pytest.raises(ValueError, match="ratio gives a whole number of turns"):
        MultiTaskDataModule(dms, mode="alternate", ratio={"cls": 2, "det": 1})
    with pytest.raises(ValueError, match="ratio applies to mode: alternate"):
        MultiTaskDataModule(dms, ratio={"cls": 2})


def test_an_alternating_multitask_run_killed_mid_epoch_ends_with_the_weights_of_an_uninterrupted_run(in_tmp):
    # 7 steps an epoch (det, seg, cls, det, det, seg, cls: det's 2 batches, then 1 of its second pass); SIGKILL
    # after step 5's checkpoint, inside det's second pass: the loaders and the turns continue where they stood, into
    # a second epoch that starts every task afresh.
    import signal

    from .conftest import assert_same_final_weights, csv_logger, run_cli, run_cli_subprocess

    args = ["fit", "--config", multitask_config(in_tmp), "--data.init_args.mode", "alternate",
            "--data.init_args.ratio", "{det: 2, seg: 1, cls: 1}", "--trainer.limit_train_batches", "2",
            "--trainer.limit_val_batches", "1", "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks+=fishnet_pl.callbacks.LastCheckpoint", "--trainer.callbacks.every_n_train_steps=5"]
    run_cli([*args, *csv_logger("a")])
    killed = run_cli_subprocess([*args, *csv_logger("b"), "--trainer.callbacks+=tests.helpers.KillAtStep",
                                 "--trainer.callbacks.step=6"], cwd=in_tmp)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert torch.load("b/checkpoints/last.ckpt", weights_only=True)["global_step"] == 5
    run_cli([*args, *csv_logger("b"), "--ckpt_path", "last"])
    assert_same_final_weights("a/checkpoints/last.ckpt", "b/checkpoints/last.ckpt", global_step=14)
