"""PanopticHead's parts on a tiny network: the semantic FPN branch, its targets, the weighted loss, the data it
accepts, and the plain network out of a checkpoint."""

from __future__ import annotations

import pytest
import torch

from datamodules.cityscapes_labels import PANOPTIC_CATEGORIES
from datamodules.dataset_info import DatasetInfo
from fishnet_pl import FishNetModule
from fishnet_pl.inference import load_network
from fishnet_pl.tasks import PanopticHead
from fishnet_pl.tasks.panoptic import SemanticFPNBranch, semantic_targets

CITYSCAPES = DatasetInfo(categories=PANOPTIC_CATEGORIES)  # 8 things, 11 stuff


def tiny(**kwargs) -> FishNetModule:
    torch.manual_seed(0)
    head = PanopticHead(num_stuff_classes=11, semantic_channels=32, fpn_channels=32, min_size=64, max_size=96,
                        representation_size=32, mask_head_channels=8, box_batch_size_per_image=16, **kwargs)
    module = FishNetModule(head, backbone="fishnet_tiny", num_classes=8)
    module.head.set_dataset_info(CITYSCAPES)
    return module


def sample(h: int = 64, w: int = 96) -> tuple[torch.Tensor, dict]:
    masks = torch.zeros(1, h, w, dtype=torch.uint8)
    masks[0, 10:30, 20:50] = 1
    semantic = torch.ones(h, w, dtype=torch.long)  # road
    semantic[masks[0].bool()] = 0  # the car
    semantic[-8:] = 255  # unlabelled
    target = {"boxes": torch.tensor([[20.0, 10.0, 50.0, 30.0]]), "labels": torch.tensor([3]), "masks": masks,
              "semantic": semantic}
    return torch.rand(3, h, w), target


def test_the_semantic_branch_steps_each_level_down_to_stride_4():
    branch = SemanticFPNBranch(in_channels=32, num_classes=12, channels=32)
    convs = [sum(isinstance(m, torch.nn.Conv2d) for m in scale.modules()) for scale in branch.scales]
    assert convs == [1, 1, 2, 3]  # strides 4, 8, 16, 32
    features = [torch.rand(2, 32, 64 // s, 96 // s) for s in (4, 8, 16, 32)]
    assert branch(features).shape == (2, 12, 16, 24)
    with pytest.raises(ValueError, match="semantic_channels must be a positive multiple of 32"):
        SemanticFPNBranch(32, 12, channels=48)


def test_semantic_targets_follow_the_detectors_resize_and_pad_with_unlabelled():
    semantic = torch.tensor([[1, 2], [3, 255]])
    out = semantic_targets([{"semantic": semantic}], sizes=[(4, 4)], padded=(4, 6))
    assert out.shape == (1, 4, 6) and (out[0, :, 4:] == 255).all()
    assert out[0, :2, :2].unique().tolist() == [1] and out[0, 2:, 2:4].unique().tolist() == [255]
    with pytest.raises(ValueError, match="set the datamodule's targets: panoptic"):
        semantic_targets([{}], sizes=[(4, 4)], padded=(4, 4))


def test_the_loss_is_the_weighted_sum_of_mask_rcnns_losses_and_the_semantic_one():
    model = tiny(loss_weights={"loss_semantic": 2.0, "loss_mask": 0.0}).train()
    image, target = sample()
    torch.manual_seed(1)
    loss, logs = model.head.training_step(model.network, {"image": [image], "target": [target]})
    names = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg", "loss_semantic"}
    assert set(logs) == names | {"loss"}
    expected = sum(logs[n] for n in names - {"loss_semantic", "loss_mask"}) + 2.0 * logs["loss_semantic"]
    assert loss.item() == pytest.approx(expected.item()) and logs["loss_semantic"] > 0
    loss.backward()
    assert model.network.semantic.predictor.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"loss_weights names unknown losses \['loss_sem'\]"):
        PanopticHead(num_stuff_classes=11, loss_weights={"loss_sem": 1.0})


def test_the_head_refuses_data_whose_classes_it_does_not_predict():
    model = tiny()
    with pytest.raises(ValueError, match="needs the dataset's categories"):
        model.head.set_dataset_info(DatasetInfo(class_names=["car"]))
    stuff_only = [c for c in PANOPTIC_CATEGORIES if not c["isthing"]][:5]
    things = [c for c in PANOPTIC_CATEGORIES if c["isthing"]]
    with pytest.raises(ValueError, match="the data has 8 thing and 5 stuff classes, the panoptic network 8 and 11: "
                                         "set --model.head.init_args.num_stuff_classes 5"):
        model.head.set_dataset_info(DatasetInfo(categories=things + stuff_only))


def test_evaluation_gives_a_panoptic_map_and_the_checkpoint_gives_the_plain_network(tmp_path):
    model = tiny().eval()
    image, _ = sample()
    with torch.no_grad():
        (output,) = model([image])
        ids, segments = model.head.merge(output)
    assert output["semantic"].shape == (12, 64, 96) and ids.shape == (64, 96)
    assert {s["id"] for s in segments} == set(ids.unique().tolist()) - {0}
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "panoptic.ckpt")
    network = load_network(tmp_path / "panoptic.ckpt")
    with torch.no_grad():
        (again,) = network([image])
    torch.testing.assert_close(again["semantic"], output["semantic"])
    merged_ids, merged_segments = network.merge(again)  # the merge travels with the plain network
    assert torch.equal(merged_ids, ids) and merged_segments == segments


@torch.no_grad()
def test_onnx_export_is_the_network_before_the_merge(tmp_path):
    import onnxruntime as ort

    from fishnet_pl.export import export_checkpoint

    model = tiny().eval()
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "panoptic.ckpt")
    session = ort.InferenceSession(str(export_checkpoint(tmp_path / "panoptic.ckpt", "onnx", tmp_path / "p.onnx")))
    assert [o.name for o in session.get_outputs()] == ["boxes", "labels", "scores", "masks", "semantic"]
    for h, w in ((64, 96), (80, 64)):  # any image size
        image = torch.rand(3, h, w)
        ref = model([image])[0]
        boxes, labels, scores, masks, semantic = session.run(None, {"image": image.numpy()})
        assert len(boxes) == len(ref["boxes"]) and semantic.shape == (12, h, w)
        torch.testing.assert_close(torch.from_numpy(semantic), ref["semantic"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.from_numpy(scores), ref["scores"], atol=1e-4, rtol=1e-4)
