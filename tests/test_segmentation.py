"""FishNet in smp through smp's timm-universal encoder (``tu-fishnet_tiny``), and the segmentation head:
the smp network owning the module's backbone, decoders, padding, sliding windows, TTA, losses, weights."""

from __future__ import annotations

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
from PIL import Image

import fishnet_pl
from datamodules.common import collate_padded
from datamodules.dataset_info import DatasetInfo
from fishnet_pl import FishNetModule, SegmentationHead
from fishnet_pl.tasks.segmentation import default_palette, input_multiple

from .models.conftest import official_random_state_dict

# Every smp architecture that takes a convolutional encoder (DPT takes only timm transformers).
ARCHITECTURES = ("Unet", "UnetPlusPlus", "FPN", "PSPNet", "DeepLabV3", "DeepLabV3Plus", "Linknet", "MAnet", "PAN",
                 "UPerNet", "Segformer")


# ---------------------------------------------------------------------- FishNet as smp's tu- encoder
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_smp_architecture_trains_on_a_tu_fishnet_encoder_at_two_input_sizes(arch):
    model = smp.create_model(arch, encoder_name="tu-fishnet_tiny", encoder_weights=None, classes=5)
    # PAN's pyramid attention halves its stride-16 input three more times: it needs larger images.
    sizes = ((128, 192), (192, 128)) if arch == "PAN" else ((64, 96), (96, 64))
    first = model.encoder.model.model.stem.conv1[0].weight  # features_only wrapper -> the FishNet
    for h, w in sizes:
        model.zero_grad()
        out = model(torch.randn(2, 3, h, w))
        assert out.shape == (2, 5, h, w)
        out.square().mean().backward()
        assert first.grad.abs().sum() > 0


@pytest.mark.parametrize("depth", [3, 4])
@pytest.mark.parametrize("arch", ["Unet", "FPN", "DeepLabV3Plus"])
def test_shallow_encoder_depths_build_and_run_with_several_decoders(arch, depth):
    kwargs = {"decoder_channels": (64, 32, 16, 8)[:depth]} if arch == "Unet" else {}
    if arch == "FPN":  # smp's FPN reads its finest level at stride 2 ** (depth - 3): upsample that much
        kwargs["upsampling"] = 2 ** (depth - 3)
    model = smp.create_model(arch, encoder_name="tu-fishnet_tiny", encoder_weights=None, encoder_depth=depth,
                             classes=3, **kwargs)
    assert len(model.encoder.out_channels) == depth + 1
    assert model.eval()(torch.randn(1, 3, 64, 96)).shape == (1, 3, 64, 96)


def test_input_multiple_is_the_coarsest_stride_a_backbone_computes():
    assert input_multiple(smp.encoders.get_encoder("tu-resnet18", depth=3).model) == 8  # timm truncates ResNet
    assert input_multiple(smp.encoders.get_encoder("tu-resnet18", depth=5).model) == 32
    assert input_multiple(smp.encoders.get_encoder("tu-fishnet_tiny", output_stride=16).model) == 16
    # A FishNet's tail always runs down to its output stride: inputs stay multiples of 32 at any depth.
    assert input_multiple(smp.encoders.get_encoder("tu-fishnet_tiny", depth=3).model) == 32


@pytest.mark.parametrize("in_channels", [1, 4])
def test_other_input_channels(in_channels):
    module = FishNetModule(head=SegmentationHead(), backbone="fishnet_tiny", num_classes=2, in_channels=in_channels)
    with torch.no_grad():
        assert module.eval()(torch.rand(1, in_channels, 40, 50)).shape == (1, 2, 40, 50)


@pytest.mark.parametrize("output_stride", [8, 16])
def test_deeplab_takes_a_dilated_fishnet_at_its_output_stride(output_stride):
    model = smp.create_model("DeepLabV3Plus", encoder_name="tu-fishnet_tiny", encoder_weights=None, classes=3,
                             encoder_output_stride=output_stride)
    assert model.encoder.model.model.output_stride == output_stride
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape[-1] == 64


def test_backbone_weights_load_official_weights_into_the_segmentation_backbone(tmp_path):
    path = tmp_path / "fishnet99_ckpt.tar"
    torch.save({"state_dict": official_random_state_dict("fishnet99")}, path)  # keys hold "module."
    model = FishNetModule(head=SegmentationHead(), backbone="fishnet99", num_classes=19, backbone_weights=str(path))
    reference = fishnet_pl.fishnet99()
    fishnet_pl.load_official_weights(reference, path)
    ours = model.network.encoder.model.model.state_dict()
    shared = [k for k in reference.state_dict() if k in ours]
    assert len(shared) > 100 and "stem.conv1.0.weight" in shared
    assert all(torch.equal(reference.state_dict()[k], ours[k]) for k in shared)


# ---------------------------------------------------------------------- the head in FishNetModule
def segmenter(backbone: str = "fishnet_tiny", **head) -> FishNetModule:
    return FishNetModule(head=SegmentationHead(**head), backbone=backbone, num_classes=4)


def test_the_network_is_an_smp_model_owning_the_modules_backbone_once():
    model = segmenter(decoder="Unet")
    assert isinstance(model.network, smp.Unet) and model.network.encoder.model is model.backbone
    assert {id(p) for p in model.backbone.parameters()} <= {id(p) for p in model.network.encoder.parameters()}
    assert {id(p) for p in model.parameters()} == {id(p) for p in model.network.parameters()}
    state = model.state_dict()
    assert all(k.startswith("network.") for k in state)
    pointers = [v.data_ptr() for v in state.values() if v.numel()]
    assert len(pointers) == len(set(pointers)), "a tensor is stored twice"
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        model.backbone.model.stem.conv1[0].weight.mul_(2)
        assert not torch.allclose(before, model(x))


def test_checkpoint_records_where_the_backbone_sits():
    model = segmenter()
    ckpt = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(ckpt)
    info = ckpt["fishnet_pl_backbone"]
    assert info == {"name": "fishnet_tiny", "prefix": "network.encoder.model."}
    backbone = {k[len(info["prefix"]):] for k in ckpt["state_dict"] if k.startswith(info["prefix"])}
    assert backbone == set(model.backbone.state_dict())


def test_decoders_with_an_output_stride_get_smps_default_and_others_refuse_one():
    def stride(model):
        return model.backbone.model.output_stride

    assert stride(segmenter(decoder="DeepLabV3")) == 8
    assert stride(segmenter(decoder="DeepLabV3Plus")) == 16
    model = segmenter(decoder="DeepLabV3Plus", output_stride=8)
    assert stride(model) == 8 and model.head.pad_multiple == 8
    with pytest.raises(ValueError, match="output stride 32"):
        SegmentationHead(decoder="FPN", output_stride=16)
    with pytest.raises(ValueError, match="unknown smp decoder 'Fpnn'"):
        SegmentationHead(decoder="Fpnn")
    with pytest.raises(ValueError, match="DPT"):
        SegmentationHead(decoder="DPT")


@pytest.mark.parametrize("decoder, depth", [("FPN", 5), ("Unet", 3)])
def test_sizes_that_are_not_multiples_of_32_are_padded_and_cropped_back(decoder, depth):
    kwargs = {"decoder_channels": (32, 16, 8)} if depth == 3 else {}
    model = segmenter(decoder=decoder, encoder_depth=depth, decoder_kwargs=kwargs).eval()
    assert model.head.pad_multiple == 32  # FishNet: its output stride, even at depth 3
    image = torch.rand(1, 3, 70, 100)
    with torch.no_grad():
        logits = model(image)
        # Padded with zeros after normalisation (the mean colour), then cropped.
        padded = model.network(torch.nn.functional.pad(model.head.normalize(image), (0, 28, 0, 26)))
    assert logits.shape == (1, 4, 70, 100)
    torch.testing.assert_close(logits, padded[..., :70, :100])


# smp's FPN (upsampling=4) and PSPNet (upsampling=8) assume their default encoder depth (5 and 3); the head
# scales their up-sampling to the depth it uses, so the logits always come out at the input's size.
@pytest.mark.parametrize("decoder, depth", [
    ("FPN", 5), ("Unet", 3), ("DeepLabV3Plus", 4), ("UPerNet", 4), ("FPN", 3), ("FPN", 4), ("PSPNet", 5),
    ("PSPNet", 3)])
def test_the_network_predicts_at_the_padded_input_size_at_every_encoder_depth(decoder, depth):
    kwargs = {"decoder_channels": (64, 32, 16, 8, 4)[:depth]} if decoder == "Unet" else {}
    model = segmenter(decoder=decoder, encoder_depth=depth, decoder_kwargs=kwargs).eval()
    with torch.no_grad():
        assert model.network(torch.rand(1, 3, 64, 96)).shape[-2:] == (64, 96)
        assert model(torch.rand(1, 3, 50, 70)).shape == (1, 4, 50, 70)


def test_inputs_are_normalised_with_the_backbones_mean_and_std():
    model = segmenter().eval()
    cfg = model.backbone.pretrained_cfg
    image = torch.rand(1, 3, 64, 64)
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(image), model.network((image - mean) / std))


def test_sliding_window_covering_the_image_is_whole_image_inference_and_smaller_windows_cover_every_pixel():
    model = segmenter().eval()
    head, network = model.head, model.network
    image = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        whole = head.predict_probabilities(network, image)
        head.eval_mode, head.window = "slide", (64, 96)
        torch.testing.assert_close(head.predict_probabilities(network, image), whole)
        head.window, head.window_overlap = (32, 64), 0.5
        slid = head.predict_probabilities(network, image)
    assert slid.shape == whole.shape and torch.allclose(slid.sum(1), torch.ones(1, 64, 96))


def test_flip_and_multiscale_tta_average_probabilities_at_the_input_size():
    model = segmenter(eval_flip=True, eval_scales=(0.5, 1.0, 1.5)).eval()
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        probs = model.head.predict_probabilities(model.network, image)
        # Flip TTA is symmetric: the mirrored image gets the mirrored prediction.
        mirrored = model.head.predict_probabilities(model.network, image.flip(-1))
    torch.testing.assert_close(mirrored, probs.flip(-1), atol=1e-5, rtol=1e-4)
    assert torch.allclose(probs.sum(1), torch.ones(1, 64, 64))


@pytest.mark.parametrize("evaluation", [{}, {"eval_flip": True, "eval_scales": (0.75, 1.0)},
                                        {"eval_mode": "slide", "window": (32, 48)}])
def test_a_batch_padded_to_its_largest_image_predicts_each_image_as_alone_and_at_its_own_size(evaluation):
    model = segmenter(**evaluation).eval()
    images = [torch.rand(3, 40, 56), torch.rand(3, 64, 48), torch.rand(3, 40, 56)]
    batch = collate_padded([{"image": image, "mask": torch.zeros(image.shape[1:], dtype=torch.long), "path": f"{i}.png"}
                            for i, image in enumerate(images)])
    assert batch["image"].shape == (3, 3, 64, 56) and batch["size"].tolist() == [[40, 56], [64, 48], [40, 56]]
    assert (batch["mask"][0, 40:] == 255).all() and (batch["mask"][1, :, 48:] == 255).all()  # ignored
    with torch.no_grad():
        probs = model.head.predict_probabilities(model.network, batch["image"], batch["size"])
        records = model.predict_step(batch, 0)
        for image, prob, record in zip(images, probs, records):
            h, w = image.shape[1:]
            alone = model.head.predict_probabilities(model.network, image[None])[0]
            torch.testing.assert_close(prob[:, :h, :w], alone)
            assert not prob[:, h:].any() and not prob[:, :, w:].any()
            assert record["labels"].shape == record["image"].shape[:2] == (h, w)
            np.testing.assert_array_equal(record["labels"], alone.argmax(0).numpy())


@pytest.mark.parametrize("losses", [{}, {"dice_weight": 0.5}, {"lovasz_weight": 0.5}])
def test_loss_ignores_unlabelled_pixels_and_adds_dice_or_lovasz(losses):
    model = segmenter(**losses)
    mask = torch.randint(0, 4, (2, 64, 64))
    mask[:, :32] = 255
    loss, logs = model.head.training_step(model.network, {"image": torch.rand(2, 3, 64, 64), "mask": mask})
    assert torch.isfinite(loss) and set(losses) <= {f"{k}_weight" for k in logs}
    loss.backward()
    assert model.backbone.model.stem.conv1[0].weight.grad is not None


@pytest.mark.parametrize("decoder", ["FPN", "DeepLabV3Plus"])
def test_a_resnet18_segmenter_trains_one_step(decoder):
    model = segmenter("resnet18", decoder=decoder).train()
    assert model.head.pad_multiple == (16 if decoder == "DeepLabV3Plus" else 32)
    batch = {"image": torch.rand(2, 3, 72, 88), "mask": torch.randint(0, 4, (2, 72, 88))}
    loss, _ = model.head.training_step(model.network, batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert model.backbone.conv1.weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert model.eval()(batch["image"]).shape == (2, 4, 72, 88)


def test_frozen_stages_and_frozen_batchnorm_reach_the_segmentation_backbone():
    model = FishNetModule(head=SegmentationHead(), backbone="fishnet_tiny", num_classes=4, frozen_stages=2,
                          freeze_bn=True).train()
    fishnet = model.backbone.model
    assert not any(p.requires_grad for p in fishnet.stem.parameters())
    assert not any(p.requires_grad for p in fishnet.tail[0].parameters())
    assert any(p.requires_grad for p in fishnet.tail[1].parameters())
    assert all(not m.training for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert all(p.requires_grad for p in model.network.decoder.parameters())


def test_miou_is_over_the_classes_present_and_logged_per_class():
    model = segmenter()
    head = model.head
    head.set_dataset_info(DatasetInfo(class_names=["road", "car", "sky", "person"]))
    labels = torch.tensor([[[0, 0, 1, 1]]])
    head.metrics["val"].update(torch.tensor([[[0, 0, 1, 0]]]), labels)
    logs = head.metrics["val"].compute()
    # road: 2 / 3, car: 1 / 2; sky and person appear nowhere: no IoU, not averaged.
    assert logs["iou_road"].item() == pytest.approx(2 / 3) and logs["iou_car"].item() == pytest.approx(0.5)
    assert "iou_sky" not in logs and logs["miou"].item() == pytest.approx((2 / 3 + 0.5) / 2)


@pytest.mark.parametrize("palette", [None, [(128, 64, 128), (244, 35, 232), (70, 70, 70), (0, 0, 142)]])
def test_predict_writes_palette_masks_and_overlays(tmp_path, palette):
    model = segmenter().eval()
    batch = {"image": torch.rand(2, 3, 40, 50), "path": ["x/a.png", "y/b.jpg"]}
    with torch.no_grad():
        records = model.predict_step(batch, 0)
        expected = model(batch["image"]).argmax(1)
    model.head.set_dataset_info(DatasetInfo(palette=palette))
    model.head.write_predictions(records, batch["path"], tmp_path, first=True)
    colours = np.asarray(palette or default_palette(4), np.uint8)
    for name, labels in zip(batch["path"], expected):
        mask = Image.open(tmp_path / f"{name}.mask.png")
        assert mask.mode == "P" and mask.size == (50, 40)
        np.testing.assert_array_equal(np.asarray(mask), labels.numpy())
        assert np.array_equal(np.asarray(mask.getpalette()[:12], np.uint8).reshape(4, 3), colours)
        overlay = Image.open(tmp_path / f"{name}.overlay.png")
        assert overlay.mode == "RGB" and overlay.width == 50 and overlay.height > 40  # a legend below
