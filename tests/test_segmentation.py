"""FishNet as an smp encoder, and the segmentation head: decoders, padding, sliding windows, TTA, weights."""

from __future__ import annotations

import pytest
import segmentation_models_pytorch as smp
import torch

import fishnet_pl
from fishnet_pl import FishNetModule, SegmentationHead

from .models.conftest import official_random_state_dict

# Every smp architecture that takes a convolutional encoder (DPT takes only timm transformers).
ARCHITECTURES = ("Unet", "UnetPlusPlus", "FPN", "PSPNet", "DeepLabV3", "DeepLabV3Plus", "Linknet", "MAnet", "PAN",
                 "UPerNet", "Segformer")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_smp_architecture_trains_on_a_fishnet_encoder_at_two_input_sizes(arch):
    model = smp.create_model(arch, encoder_name="fishnet_tiny", encoder_weights=None, classes=5)
    # PAN's pyramid attention halves its stride-16 input three more times: it needs larger images.
    sizes = ((128, 192), (192, 128)) if arch == "PAN" else ((64, 96), (96, 64))
    for h, w in sizes:
        model.zero_grad()
        out = model(torch.randn(2, 3, h, w))
        assert out.shape == (2, 5, h, w)
        out.square().mean().backward()
        assert model.encoder.stem.conv1[0].weight.grad.abs().sum() > 0


def test_every_variant_is_an_smp_encoder_with_fishnet_keys():
    names = set(smp.encoders.get_encoder_names())
    assert set(fishnet_pl.list_backbones()) <= names
    encoder = smp.encoders.get_encoder("fishnet150")
    assert encoder.out_channels == [3, 64, 320, 832, 1600, 2112]
    assert set(encoder.state_dict()) == set(fishnet_pl.fishnet150(features_only=True).state_dict())


@pytest.mark.parametrize("depth", [3, 4, 5])
def test_depth_gives_the_input_and_maps_down_to_stride_2_to_the_depth(depth):
    encoder = smp.encoders.get_encoder("fishnet_tiny", depth=depth)
    maps = encoder(torch.randn(1, 3, 64, 96))
    assert [m.shape[-1] for m in maps] == [96 // 2**i for i in range(depth + 1)]
    assert [m.shape[1] for m in maps] == encoder.out_channels


@pytest.mark.parametrize("in_channels", [1, 4])
def test_other_input_channels(in_channels):
    model = smp.create_model("FPN", encoder_name="fishnet_tiny", encoder_weights=None, in_channels=in_channels,
                             classes=2)
    assert model(torch.randn(1, in_channels, 64, 64)).shape == (1, 2, 64, 64)
    assert model.encoder.out_channels[0] == in_channels


@pytest.mark.parametrize("output_stride", [8, 16])
def test_dilated_output_stride_keeps_every_later_map_at_that_stride(output_stride):
    encoder = smp.encoders.get_encoder("fishnet_tiny", output_stride=output_stride)
    maps = encoder(torch.randn(1, 3, 64, 64))
    assert [64 // m.shape[-1] for m in maps] == [min(2**i, output_stride) for i in range(6)]
    model = smp.create_model("DeepLabV3Plus", encoder_name="fishnet_tiny", encoder_weights=None, classes=3,
                             encoder_output_stride=output_stride)
    assert model.encoder.output_stride == output_stride and model.eval()(torch.randn(1, 3, 64, 64)).shape[-1] == 64


def test_encoder_loads_official_weights_from_a_local_file(tmp_path):
    path = tmp_path / "fishnet99_ckpt.tar"
    torch.save({"state_dict": official_random_state_dict("fishnet99")}, path)  # keys hold "module."
    model = smp.create_model("FPN", encoder_name="fishnet99", encoder_weights=None, classes=19)
    dropped = model.encoder.load_weights(path)
    assert dropped  # the score layers
    reference = fishnet_pl.fishnet99()
    fishnet_pl.load_official_weights(reference, path)
    ours = model.encoder.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in reference.state_dict().items() if k in ours)


# ---------------------------------------------------------------------- the head in FishNetModule
def segmenter(**head) -> FishNetModule:
    return FishNetModule(head=SegmentationHead(**head), backbone="fishnet_tiny", num_classes=4)


def test_the_decoder_reads_the_modules_backbone_and_holds_no_copy_of_it():
    model = segmenter(decoder="Unet")
    assert model.head.model.encoder.fishnet is model.backbone
    assert not [k for k in model.state_dict() if k.startswith("head.model.encoder")]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        model.backbone.stem.conv1[0].weight.mul_(2)
        assert not torch.allclose(before, model(x))


def test_decoders_with_an_output_stride_get_smps_default_and_others_refuse_one():
    assert segmenter(decoder="DeepLabV3").backbone.output_stride == 8
    assert segmenter(decoder="DeepLabV3Plus").backbone.output_stride == 16
    assert segmenter(decoder="DeepLabV3Plus", output_stride=8).backbone.output_stride == 8
    with pytest.raises(ValueError, match="output stride 32"):
        SegmentationHead(decoder="FPN", output_stride=16)
    with pytest.raises(ValueError, match="unknown smp decoder 'Fpnn'"):
        SegmentationHead(decoder="Fpnn")
    with pytest.raises(ValueError, match="DPT"):
        SegmentationHead(decoder="DPT")


def test_sizes_that_are_not_multiples_of_32_are_padded_and_cropped_back():
    model = segmenter().eval()
    image = torch.randn(1, 3, 70, 100)
    with torch.no_grad():
        logits = model(image)
        padded = model.head.model(torch.nn.functional.pad(image, (0, 28, 0, 26)))
    assert logits.shape == (1, 4, 70, 100)
    torch.testing.assert_close(logits, padded[..., :70, :100])


def test_sliding_window_covering_the_image_is_whole_image_inference_and_smaller_windows_cover_every_pixel():
    model = segmenter().eval()
    image = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        whole = model.head.predict_probabilities(image)
        model.head.eval_mode, model.head.window = "slide", (64, 96)
        torch.testing.assert_close(model.head.predict_probabilities(image), whole)
        model.head.window, model.head.window_overlap = (32, 64), 0.5
        slid = model.head.predict_probabilities(image)
    assert slid.shape == whole.shape and torch.allclose(slid.sum(1), torch.ones(1, 64, 96))


def test_flip_and_multiscale_tta_average_probabilities_at_the_input_size():
    model = segmenter(eval_flip=True, eval_scales=(0.5, 1.0, 1.5)).eval()
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        probs = model.head.predict_probabilities(image)
        # Flip TTA is symmetric: the mirrored image gets the mirrored prediction.
        mirrored = model.head.predict_probabilities(image.flip(-1))
    torch.testing.assert_close(mirrored, probs.flip(-1), atol=1e-5, rtol=1e-4)
    assert torch.allclose(probs.sum(1), torch.ones(1, 64, 64))


@pytest.mark.parametrize("losses", [{}, {"dice_weight": 0.5}, {"lovasz_weight": 0.5}])
def test_loss_ignores_unlabelled_pixels_and_adds_dice_or_lovasz(losses):
    model = segmenter(**losses)
    mask = torch.randint(0, 4, (2, 64, 64))
    mask[:, :32] = 255
    loss, logs = model.head.training_step(model.backbone, {"image": torch.randn(2, 3, 64, 64), "mask": mask})
    assert torch.isfinite(loss) and set(losses) <= {f"{k}_weight" for k in logs}
    loss.backward()


def test_miou_is_over_the_classes_present_and_logged_per_class():
    model = segmenter()
    head = model.head
    labels = torch.tensor([[[0, 0, 1, 1]]])
    head.iou["val"].update(torch.tensor([[[0, 0, 1, 0]]]), labels)

    class Trainer:
        datamodule = type("DM", (), {"class_names": ["road", "car", "sky", "person"]})()

    logs = head.evaluation_epoch_end("val", Trainer())
    # road: 2 / 3, car: 1 / 2; sky and person appear nowhere: no IoU, not averaged.
    assert logs["val/iou_road"].item() == pytest.approx(2 / 3) and logs["val/iou_car"].item() == pytest.approx(0.5)
    assert "val/iou_sky" not in logs and logs["val/miou"].item() == pytest.approx((2 / 3 + 0.5) / 2)
