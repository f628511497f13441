"""FishNetModule pieces a user configures: learning-rate rules, heads from checkpoints, bad names."""

from __future__ import annotations

import pytest
import torch

from fishnet_pl import ClassificationHead, FishNetModule
from fishnet_pl.module import LRFactor


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


def test_default_lr_is_0_1_times_global_batch_over_256():
    module = FishNetModule(backbone="fishnet_tiny", num_classes=3)

    class Trainer:  # what configure_optimizers reads: 2 devices x 64 images x 2 accumulated batches
        world_size, accumulate_grad_batches, estimated_stepping_batches = 2, 2, 100
        num_training_batches, max_epochs = 100, 1
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
        world_size, accumulate_grad_batches, estimated_stepping_batches = 1, 1, 10
        num_training_batches, max_epochs = 10, 1
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
