"""FishNetModule pieces a user configures: learning-rate rules, heads from checkpoints, bad names, its default
callbacks beside the user's."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from fishnet_pl import ClassificationHead, FishNetModule
from fishnet_pl.module import LRFactor

from .conftest import csv_logger, run_cli
from .test_classification_run import small_run


def test_step_schedule_divides_by_ten_at_each_milestone_epoch():
    factor = LRFactor("step", total_steps=1000, steps_per_epoch=10, milestones=(30, 60, 90), gamma=0.1,
                      warmup_epochs=0)
    assert [factor(s) for s in (0, 299, 300, 599, 600, 900)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.001])


def test_cosine_and_poly_schedules_start_after_linear_warmup_and_end_at_zero():
    cosine = LRFactor("cosine", total_steps=100, steps_per_epoch=10, milestones=(), gamma=0.1, warmup_epochs=1)
    assert cosine(0) == pytest.approx(0.1) and cosine(9) == pytest.approx(1.0)
    assert cosine(10) == pytest.approx(1.0) and cosine(55) == pytest.approx(0.5) and cosine(100) == pytest.approx(0)
    poly = LRFactor("poly", total_steps=100, steps_per_epoch=10, milestones=(), gamma=0.1, warmup_epochs=0)
    assert poly(0) == 1.0 and poly(50) == pytest.approx(0.5**0.9) and poly(100) == 0.0


def test_the_schedule_takes_the_runs_length_when_training_starts_without_loading_the_data_early(in_tmp, caplog):
    # The quickstart's lr 0.02, cosine after 1 warm-up epoch; 2 epochs of 4 steps. Asking the run's length in
    # configure_optimizers loaded the train data before a checkpoint was restored (Lightning #20550) and said so.
    lightning_log = logging.getLogger("lightning.pytorch")  # Lightning's messages do not reach the root logger
    lightning_log.addHandler(caplog.handler)
    try:
        run_cli(["fit", *small_run(in_tmp), "--trainer.max_epochs", "2", "--trainer.log_every_n_steps", "1",
                 *csv_logger("run")])
    finally:
        lightning_log.removeHandler(caplog.handler)
    messages = [record.getMessage() for record in caplog.records]
    assert any("max_epochs=2` reached" in m for m in messages), messages  # Lightning's messages are seen here
    assert not any("to estimate number of stepping batches" in m for m in messages), messages
    with open("run/metrics.csv") as f:
        lrs = [float(row["lr-SGD"]) for row in csv.DictReader(f) if row.get("lr-SGD")]
    warmup = [0.02 * (step + 1) / 4 for step in range(4)]
    cosine = [0.02 * 0.5 * (1 + math.cos(math.pi * step / 4)) for step in range(4)]
    assert lrs == pytest.approx(warmup + cosine)


def test_a_users_model_checkpoint_is_kept_with_its_monitor_and_last_ckpt_beside_its_files(in_tmp):
    cli = run_cli(["fit", *small_run(in_tmp), "--trainer.max_epochs", "2", *csv_logger("run"),
                   "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.monitor", "val/loss",
                   "--trainer.callbacks.filename", "loss-{epoch}", "--trainer.callbacks.save_top_k", "2"])
    (checkpoint,) = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]  # the user's, not ours
    assert checkpoint.monitor == "val/loss" and checkpoint.dirpath == str(Path("run", "checkpoints"))
    assert sorted(p.name for p in Path(checkpoint.dirpath).iterdir()) == [
        "last.ckpt", "loss-epoch=0.ckpt", "loss-epoch=1.ckpt"]
    saved = torch.load(Path(checkpoint.dirpath, "last.ckpt"), weights_only=True)
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("ModelCheckpoint")]
    assert state["monitor"] == "val/loss" and state["best_model_path"].startswith(checkpoint.dirpath)
    with open("run/metrics.csv") as f:
        val_losses = [float(row["val/loss"]) for row in csv.DictReader(f) if row["val/loss"]]
    assert len(val_losses) == 2 and state["best_model_score"].item() == pytest.approx(min(val_losses))
    link = Path(cli.trainer.default_root_dir, "last.ckpt")  # LastCheckpoint's link to the newest run's
    assert link.resolve() == Path(checkpoint.dirpath, "last.ckpt").resolve()


def test_lightnings_throughput_monitor_counts_our_batches_on_the_cpu_beside_images_per_second(in_tmp):
    # The command ImagesPerSecond's docstring gives; a window of 2 batches, so 4 steps log it.
    run_cli(["fit", *small_run(in_tmp), "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "1",
             *csv_logger("run"), "--trainer.callbacks+=ThroughputMonitor",
             "--trainer.callbacks.batch_size_fn", "fishnet_pl.callbacks.images_in",
             "--trainer.callbacks.window_size", "2"])
    with open("run/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    monitored = [float(r["train/device/samples_per_sec"]) for r in rows if r.get("train/device/samples_per_sec")]
    ours = [float(r["train/img_per_s"]) for r in rows if r.get("train/img_per_s")]
    assert len(monitored) >= 2 and all(v > 0 for v in monitored) and len(ours) == 3 and all(v > 0 for v in ours)
    samples = [float(r["train/samples"]) for r in rows if r.get("train/samples")]
    assert samples[-1] == 4 * 16  # 4 batches of the quickstart's 16 images: images_in counted each image


def test_default_lr_is_0_1_times_global_batch_over_256():
    module = FishNetModule(backbone="fishnet_tiny", num_classes=3)

    class Trainer:  # what configure_optimizers reads: 2 devices x 64 images x 2 accumulated batches
        world_size, accumulate_grad_batches = 2, 2
        datamodule = type("DM", (), {"batch_size": 64})()

    module.trainer = Trainer()
    opt = module.configure_optimizers()["optimizer"]
    assert [g["initial_lr"] for g in opt.param_groups] == pytest.approx([0.1 * 256 / 256])
    assert opt.defaults["momentum"] == 0.9 and all(g["weight_decay"] == 1e-4 for g in opt.param_groups)


def test_head_options_survive_a_checkpoint(tmp_path):
    module = FishNetModule(head=ClassificationHead(label_smoothing=0.1, mixup_alpha=0.2), backbone="fishnet_tiny",
                           num_classes=3)
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": "2.6.6"}, path)
    loaded = FishNetModule.load_from_checkpoint(path)
    assert isinstance(loaded.head, ClassificationHead)
    assert (loaded.head.label_smoothing, loaded.head.mixup_alpha) == (0.1, 0.2)


def test_unknown_backbone_or_head_is_one_clear_error():
    with pytest.raises(ValueError, match="Unknown backbone 'fishnet15'. Did you mean fishnet150"):
        FishNetModule(backbone="fishnet15")
    with pytest.raises(ValueError, match="'os.path' is not a fishnet_pl TaskHead"):
        FishNetModule(head={"class_path": "os.path", "init_args": {}}, backbone="fishnet_tiny")


def test_adamw_alternative_scales_its_default_lr_with_the_batch_too():
    module = FishNetModule(backbone="fishnet_tiny", num_classes=3, optimizer="adamw", weight_decay=0.05)

    class Trainer:
        world_size, accumulate_grad_batches = 1, 1
        datamodule = type("DM", (), {"batch_size": 512})()

    module.trainer = Trainer()
    opt = module.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["initial_lr"] == pytest.approx(2e-3) and opt.param_groups[0]["weight_decay"] == 0.05


@pytest.mark.parametrize("mix", [{"mixup_alpha": 0.4}, {"cutmix_alpha": 1.0},
                                 {"mixup_alpha": 0.2, "cutmix_alpha": 1.0}])
def test_mixup_and_cutmix_train_on_mixed_images_and_labels(mix):
    torch.manual_seed(0)
    plain = FishNetModule(backbone="fishnet_tiny", num_classes=3).eval()  # eval: BN statistics stay fixed
    mixed = FishNetModule(head=ClassificationHead(**mix), backbone="fishnet_tiny", num_classes=3).eval()
    mixed.load_state_dict(plain.state_dict())
    batch = {"image": torch.rand(4, 3, 32, 32), "label": torch.tensor([0, 1, 2, 0])}
    loss, _ = mixed.head.training_step(mixed.network, batch)
    loss.backward()
    assert torch.isfinite(loss) and mixed.backbone.fc.weight.grad is not None
    assert loss.item() != pytest.approx(plain.head.training_step(plain.network, batch)[0].item())


@pytest.mark.parametrize("backbone", ["fishnet_tiny", "resnet18"])
def test_classification_normalises_with_the_backbones_pretrained_cfg(backbone):
    module = FishNetModule(backbone=backbone, num_classes=3).eval()
    cfg = module.backbone.pretrained_cfg
    images = torch.rand(2, 3, 64, 64)
    expected = module.network((images - torch.tensor(cfg["mean"]).view(1, 3, 1, 1))
                              / torch.tensor(cfg["std"]).view(1, 3, 1, 1))
    torch.testing.assert_close(module(images), expected)


def test_frozen_stages_and_frozen_bn_work_on_any_timm_backbone():
    module = FishNetModule(backbone="resnet18", num_classes=3, frozen_stages=2, freeze_bn=True).train()
    frozen = {n for n, p in module.backbone.named_parameters() if not p.requires_grad}
    assert "conv1.weight" in frozen and "layer1.0.conv1.weight" in frozen  # stem + layer1: timm's first 2 groups
    assert "layer2.0.conv1.weight" not in frozen and "fc.weight" not in frozen
    assert not module.backbone.layer3[0].bn1.training  # every BatchNorm keeps its statistics
    before = module.backbone.bn1.running_mean.clone()
    module(torch.rand(2, 3, 64, 64))
    torch.testing.assert_close(module.backbone.bn1.running_mean, before)
    with pytest.raises(ValueError, match="frozen_stages must be in 0..5 for resnet18"):
        FishNetModule(backbone="resnet18", num_classes=3, frozen_stages=6)


def test_compile_compiles_the_network_in_place_so_checkpoints_keep_their_keys():
    plain = FishNetModule(backbone="fishnet_tiny", num_classes=4)
    compiled = FishNetModule(backbone="fishnet_tiny", num_classes=4, compile={"mode": "reduce-overhead"})
    assert compiled.network._compiled_call_impl is not None and plain.network._compiled_call_impl is None
    assert compiled.state_dict().keys() == plain.state_dict().keys()
    assert compiled.hparams.compile == {"mode": "reduce-overhead"}  # restored from checkpoints like the rest


def test_channels_last_keeps_weights_and_batches_in_that_layout_with_the_same_results(in_tmp):
    from fishnet_pl import DetectionHead, SegmentationHead

    heads = {"classification": (ClassificationHead, {}),
             "segmentation": (SegmentationHead, {"decoder_kwargs": {"decoder_pyramid_channels": 32,
                                                                    "decoder_segmentation_channels": 32}}),
             "detection": (DetectionHead, {"fpn_channels": 32, "min_size": 64, "max_size": 64,
                                           "representation_size": 32, "mask_head_channels": 8})}
    for task, (head, kwargs) in heads.items():
        torch.manual_seed(0)
        nchw = FishNetModule(head(**kwargs), backbone="fishnet_tiny", num_classes=3).eval()
        nhwc = FishNetModule(head(**kwargs), backbone="fishnet_tiny", num_classes=3, channels_last=True).eval()
        nhwc.load_state_dict(nchw.state_dict())  # checkpoints load either way
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in nhwc.parameters() if p.dim() == 4)
        images = torch.rand(2, 3, 64, 64)
        batch = nhwc.in_layout({"image": images})
        assert batch["image"].is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous(
            memory_format=torch.channels_last)
        with torch.no_grad():
            if task == "detection":  # a list of images, which torchvision batches itself
                ours, theirs = nhwc(list(images)), nchw(list(images))
                ours, theirs = ours[0]["boxes"][:5], theirs[0]["boxes"][:5]
            else:
                ours, theirs = nhwc(batch["image"]), nchw(images)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4, msg=task)
    # The CLI option: a short quickstart fit and predict with it.
    cli = run_cli(["fit", *small_run(in_tmp, "--model.channels_last", "true", "--trainer.max_epochs", "1",
                                     "--trainer.limit_train_batches", "2")])
    assert cli.model.hparams.channels_last and torch.isfinite(cli.trainer.callback_metrics["val/loss"])


def test_predict_runs_the_fused_network_and_gives_the_trained_one_back(in_tmp):
    import lightning as L

    cli = run_cli(["fit", *small_run(in_tmp, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                                     "--trainer.precision", "32-true")])  # fp32: compared to 1e-5 below
    trained, norms = cli.model.network, []

    class CountNorms(L.Callback):
        def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            norms.append(sum(isinstance(m, torch.nn.BatchNorm2d) for m in pl_module.network.modules()))

    cli.trainer.callbacks.append(CountNorms())
    records = [r for batch in cli.trainer.predict(cli.model, datamodule=cli.datamodule) for r in batch]
    assert cli.model.network is trained and norms  # the trained network is back
    assert norms[0] < sum(isinstance(m, torch.nn.BatchNorm2d) for m in trained.modules())  # folded ones gone
    # The same predictions as the trained network's, up to float rounding.
    cli.datamodule.setup("predict")
    batch = next(iter(cli.datamodule.predict_dataloader()))
    with torch.no_grad():
        expected = cli.model.eval()(batch["image"]).softmax(dim=1)
    for record, probs in zip(records, expected):
        assert record["classes"][0] == int(probs.argmax())
        assert record["scores"] == pytest.approx(probs.topk(len(record["scores"])).values.tolist(), abs=1e-5)
