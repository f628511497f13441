"""Detection and instance segmentation: torchvision's Faster / Mask R-CNN with an FPN on timm backbones,
COCO evaluation, and the quickstart through the CLI (fit, validate on 1 and 3 processes, predict)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.models.detection import FasterRCNN, MaskRCNN

from datamodules.coco import COCODataModule
from datamodules.dataset_info import DatasetInfo
from datamodules.quickstart_detection import write_detection
from fishnet_pl import DetectionHead, FishNetModule, SegmentationHead
from fishnet_pl.checkpoint import CKPT_BACKBONE_KEY
from fishnet_pl.metrics import coco_evaluate, write_coco_results
from fishnet_pl.tasks.detection import TimmBackboneWithFPN

from .conftest import CONFIGS, csv_logger, predict_from_checkpoint_alone, run_checkpoint, run_cli, validation_metrics

QUICKSTART = CONFIGS / "quickstart" / "detection.yaml"
SMALL_HEAD = {"fpn_channels": 32, "anchor_sizes": (16, 32, 64, 128, 256), "min_size": 128, "max_size": 192,
              "representation_size": 64, "mask_head_channels": 16, "box_batch_size_per_image": 32}


def small_detector(detector: str = "maskrcnn", backbone: str = "fishnet_tiny", **kwargs) -> FishNetModule:
    return FishNetModule(head=DetectionHead(detector, **SMALL_HEAD), backbone=backbone, num_classes=3, **kwargs)


def toy_batch() -> dict:
    masks = torch.zeros(2, 96, 128, dtype=torch.uint8)
    masks[0, 10:50, 20:70] = 1
    masks[1, 40:90, 60:120] = 1
    target = {"boxes": torch.tensor([[20.0, 10, 70, 50], [60, 40, 120, 90]]), "labels": torch.tensor([1, 3]),
              "masks": masks, "image_id": torch.tensor(5), "iscrowd": torch.zeros(2, dtype=torch.int64),
              "area": torch.tensor([2000.0, 3000.0])}
    return {"image": [torch.rand(3, 96, 128)], "target": [target], "path": ["a.jpg"]}


def test_fpn_feeds_fishnet_maps_at_strides_4_to_64_and_the_backbone_lives_once_under_network_backbone_body():
    model = small_detector("maskrcnn")
    assert isinstance(model.network, MaskRCNN)
    fpn = model.network.backbone
    assert isinstance(fpn, TimmBackboneWithFPN) and fpn.body is model.backbone
    assert fpn.body.feature_info.reduction() == [4, 8, 16, 32]
    # Every weight is in the state dict once, under network.; the backbone's under network.backbone.body.
    state = model.state_dict()
    assert all(k.startswith("network.") for k in state)
    assert {k for k in state if k.startswith("network.backbone.body.")} == {
        f"network.backbone.body.{k}" for k in model.backbone.state_dict()}
    pointers = [v.data_ptr() for v in state.values() if v.numel()]
    assert len(pointers) == len(set(pointers)), "a tensor is stored twice"
    assert {id(p) for p in model.parameters()} == {id(p) for p in model.network.parameters()}
    assert {id(p) for p in model.backbone.parameters()} <= {id(p) for p in fpn.parameters()}
    # Normalisation is torchvision's, with the backbone's mean and std.
    cfg = model.backbone.pretrained_cfg
    assert model.network.transform.image_mean == list(cfg["mean"])
    assert model.network.transform.image_std == list(cfg["std"])
    maps = fpn(torch.randn(1, 3, 128, 192))
    assert list(maps) == ["0", "1", "2", "3", "pool"]
    assert [tuple(m.shape[-2:]) for m in maps.values()] == [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)]
    assert all(m.shape[1] == fpn.out_channels == 32 for m in maps.values())


@pytest.mark.parametrize("detector", ["fasterrcnn", "maskrcnn"])
def test_train_step_gives_every_loss_and_eval_gives_torchvision_detections(detector):
    model = small_detector(detector)
    assert isinstance(model.network, MaskRCNN if detector == "maskrcnn" else FasterRCNN)
    loss, logs = model.head.training_step(model.network, toy_batch())
    expected = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert expected | ({"loss_mask"} if detector == "maskrcnn" else set()) <= set(logs)
    loss.backward()
    assert model.backbone.model.stem.conv1[0].weight.grad is not None  # the backbone trains through the FPN
    model.eval()
    with torch.no_grad():
        (out,) = model([torch.rand(3, 96, 128)])
    assert {"boxes", "labels", "scores"} <= set(out) and ("masks" in out) == (detector == "maskrcnn")


@pytest.mark.parametrize("detector", ["fasterrcnn", "maskrcnn"])
def test_a_resnet18_detector_trains_one_step_and_detects(detector):
    model = small_detector(detector, backbone="resnet18").train()
    assert model.backbone is model.network.backbone.body
    assert model.backbone.feature_info.reduction() == [4, 8, 16, 32]
    loss, logs = model.head.training_step(model.network, toy_batch())
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in logs.values())
    loss.backward()
    assert model.backbone.conv1.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        (out,) = model([torch.rand(3, 96, 128)])
    assert {"boxes", "labels", "scores"} <= set(out) and ("masks" in out) == (detector == "maskrcnn")


@torch.no_grad()
def test_predict_keeps_only_detections_scoring_at_least_predict_score_thresh():
    torch.manual_seed(0)
    model = FishNetModule(head=DetectionHead(**{**SMALL_HEAD, "box_score_thresh": 0.0}), backbone="fishnet_tiny",
                          num_classes=3).eval()
    image = torch.rand(3, 96, 128)
    (out,) = model([image])
    model.head.predict_score_thresh = thresh = out["scores"].median().item()
    kept = out["scores"] >= thresh
    assert 0 < kept.sum() < len(kept)  # an untrained detector: scores on both sides of the median
    (record,) = model.predict_step({"image": [image], "path": ["a.jpg"]}, 0)
    torch.testing.assert_close(record["scores"], out["scores"][kept])
    torch.testing.assert_close(record["boxes"], out["boxes"][kept])
    assert len(record["labels"]) == len(record["masks"]) == int(kept.sum())


def test_drawn_labels_and_lines_grow_with_the_image(tmp_path):
    """A 4000 x 6000 photo gets labels and box lines it can show, not the 11-pixel text of a 400 x 600 one."""
    head = DetectionHead()
    head.set_dataset_info(DatasetInfo(class_names=["circle", "square", "triangle"]))
    colour = DetectionHead.PALETTE[1]
    tag_rows, line_px = {}, {}
    for short in (400, 4000):
        h, w = short, short * 3 // 2
        record = {"path": f"photo{short}.jpg", "image": torch.zeros(3, h, w, dtype=torch.uint8),
                  "boxes": torch.tensor([[0.2 * w, 0.5 * h, 0.8 * w, 0.9 * h]]), "labels": torch.tensor([1]),
                  "scores": torch.tensor([0.93])}
        head.write_predictions([record], [record["path"]], tmp_path, first=True)
        coloured = np.all(np.asarray(Image.open(tmp_path / f"photo{short}.jpg.png")) == colour, axis=-1)
        tag_rows[short] = int(coloured[: h // 2].any(axis=1).sum())  # the label's tag, above the box
        line_px[short] = int(coloured[int(0.7 * h)].sum()) // 2  # the box's left and right lines
    assert tag_rows[4000] > 5 * tag_rows[400] > 0 and line_px[4000] > 5 * line_px[400] > 0


def test_mask_rcnn_refuses_targets_without_masks():
    batch = toy_batch()
    del batch["target"][0]["masks"]
    model = small_detector("maskrcnn")
    with pytest.raises(ValueError, match="with_masks"):
        model.head.training_step(model.network, batch)


@pytest.mark.parametrize("backbone, frozen, trained", [("fishnet_tiny", ("stem", "tail.0"), "tail.1"),
                                                      ("resnet18", ("conv1", "layer1"), "layer2")])
def test_frozen_stages_and_frozen_batchnorm_reach_the_detection_backbone(backbone, frozen, trained):
    model = small_detector(backbone=backbone, frozen_stages=2, freeze_bn=True).train()
    inner = model.backbone.model if backbone.startswith("fishnet") else model.backbone
    for name in frozen:
        assert not any(p.requires_grad for p in inner.get_submodule(name).parameters()), name
    convs = [m for m in inner.get_submodule(trained).modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(p.requires_grad for m in convs for p in m.parameters())
    assert all(not m.training for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert all(p.requires_grad for p in model.network.backbone.fpn.parameters())
    assert all(p.requires_grad for p in model.network.roi_heads.parameters())
    # Frozen BatchNorm statistics do not move in a training step.
    bn = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    model.head.training_step(model.network, toy_batch())[0].backward()
    assert torch.equal(bn.running_mean, before)


@pytest.mark.parametrize("backbone, other", [("fishnet_tiny", "resnet18"), ("resnet18", "fishnet_tiny")])
def test_backbone_weights_start_a_detector_from_a_segmentation_checkpoint(tmp_path, backbone, other):
    segmenter = FishNetModule(head=SegmentationHead(), backbone=backbone, num_classes=4)
    ckpt = {"state_dict": segmenter.state_dict()}
    segmenter.on_save_checkpoint(ckpt)
    path = tmp_path / "segmentation.ckpt"
    torch.save(ckpt, path)
    model = small_detector(backbone=backbone, backbone_weights=str(path))
    theirs, ours = segmenter.backbone.state_dict(), model.backbone.state_dict()
    assert set(theirs) == set(ours) and all(torch.equal(theirs[k], ours[k]) for k in ours)
    # A detection checkpoint names its backbone and prefix too; another backbone is refused by name.
    ckpt = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(ckpt)
    assert ckpt[CKPT_BACKBONE_KEY] == {"name": backbone, "prefix": "network.backbone.body."}
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=f"its backbone is '{backbone}'"):
        small_detector(backbone=other, backbone_weights=str(path))


def _evaluate_file(annotation_file: Path, results_file: Path, iou_type: str) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotation_file))
        evaluator = COCOeval(gt, gt.loadRes(str(results_file)), iou_type)
        evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
    return list(evaluator.stats[:6])


def test_evaluation_matches_pycocotools_on_the_annotation_file_and_writes_a_loadres_results_file(tmp_path):
    """Perfect detections, passed through the head's evaluation records, score AP 1 (crowds ignored,
    labels mapped back to COCO's non-contiguous ids), exactly as pycocotools scores the written file
    against the original annotation file."""
    dm = COCODataModule(write_detection(tmp_path / "coco"), num_workers=0)
    dm.setup("validate")
    head = DetectionHead(**SMALL_HEAD)
    head.build("fishnet_tiny", dm.num_classes, 3)
    metric = head.metrics["val"]
    batches = list(dm.val_dataloader())
    for batch in [*batches, batches[0]]:  # the first batch again, as DDP's sampler repeats: counted once
        outputs = []
        for target in batch["target"]:
            keep = target["iscrowd"] == 0
            outputs.append({"boxes": target["boxes"][keep], "labels": target["labels"][keep],
                            "scores": torch.linspace(0.9, 0.5, int(keep.sum())),
                            "masks": target["masks"][keep][:, None].float()})
        metric.update([image.shape[-2:] for image in batch["image"]], batch["target"], outputs)
    logged = metric.compute()
    records = metric.images
    assert len(records) == len(dm.datasets["val"]) == len({r["image_id"] for r in records})
    assert any(r["gt_iscrowd"].any() for r in records), "the quickstart val split has a crowd region"
    results = tmp_path / "results.json"
    write_coco_results(records, results, dm.label_to_category_id)
    assert {d["category_id"] for d in json.loads(results.read_text())} <= {1, 3, 7}
    for iou_type in ("bbox", "segm"):
        ours = coco_evaluate(records, iou_type, dm.num_classes)
        theirs = _evaluate_file(Path(dm.val_annotation_file), results, iou_type)
        assert ours[0] == pytest.approx(1.0) and ours == pytest.approx(theirs, abs=1e-9), iou_type
        assert logged[f"{iou_type}_ap"].item() == pytest.approx(theirs[0], abs=1e-6)


# ---------------------------------------------------------------------- quickstart through the CLI
@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The README's detection quickstart, fitted once for this module: (cli, working directory)."""
    cwd = tmp_path_factory.mktemp("detection")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        cli = run_cli(["fit", "--config", QUICKSTART, "--trainer.enable_progress_bar", "false"])
    return cli, cwd


def test_quickstart_reaches_a_box_and_mask_ap_well_above_zero(quickstart):
    cli, cwd = quickstart
    metrics = cli.trainer.callback_metrics
    # From scratch in 12 short epochs the quickstart reaches about 0.3 (box and mask); chance is 0.
    assert metrics["val/bbox_ap"] > 0.15 and metrics["val/segm_ap"] > 0.15, dict(metrics)
    run_dir = cwd / cli.trainer.log_dir
    assert run_dir.parent == cwd / "runs" / "quickstart" / "detection"
    assert any(p.name.startswith("epoch") and "val_bbox_ap=" in p.name for p in (run_dir / "checkpoints").iterdir())
    results = run_dir / "val_detections.json"
    stats = _evaluate_file(cwd / cli.datamodule.val_annotation_file, results, "bbox")  # root may be relative
    assert stats[0] == pytest.approx(metrics["val/bbox_ap"].item(), abs=1e-3)


def test_validation_on_three_processes_gives_the_one_process_metrics(quickstart):
    _, cwd = quickstart
    ckpt = run_checkpoint(cwd / "runs" / "quickstart" / "detection")
    # 10 val images on 3 processes: the distributed sampler repeats 2 to give each 4. One image per
    # batch, since torchvision pads a batch to its largest image, which moves the detections slightly.
    args = ["--config", QUICKSTART, "--ckpt_path", ckpt, "--data.init_args.batch_size", "1"]
    one, three = (validation_metrics(args, cwd, devices) for devices in (1, 3))
    assert set(one) == set(three) and {"val/bbox_ap", "val/segm_ap"} <= set(one)
    assert one == pytest.approx(three, abs=1e-9) and one["val/bbox_ap"] > 0


def test_predict_draws_detections_and_writes_them_as_json(quickstart, tmp_path):
    _, cwd = quickstart
    ckpt = run_checkpoint(cwd / "runs" / "quickstart" / "detection")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        run_cli(["predict", "--config", QUICKSTART, "--ckpt_path", ckpt, "--predict_dir", tmp_path,
                 "--data.init_args.batch_size", "1", "--trainer.enable_progress_bar", "false"])
    lines = [json.loads(line) for line in (tmp_path / "detections.jsonl").read_text().splitlines()]
    assert len(lines) == 10  # the val split
    assert all((tmp_path / line["drawn"]).is_file() for line in lines)
    detections = [d for line in lines for d in line["detections"]]
    assert detections and {d["name"] for d in detections} <= {"circle", "square", "triangle"}
    assert all({"bbox", "score", "category_id", "segmentation"} <= set(d) for d in detections)
    # Only what the drawings show: no pile of low-score detections (evaluation keeps those, down to 0.05).
    assert min(d["score"] for d in detections) >= DetectionHead().predict_score_thresh
    assert all((cwd / line["file"]).is_file() and line["file"].endswith(line["path"]) for line in lines)

    # The checkpoint alone predicts a user's folder as the config did the val images (names, COCO ids);
    # one image per batch in both, since torchvision pads a batch to its largest image.
    some = lines[:3]
    out, unreadable, readable = predict_from_checkpoint_alone(ckpt, [cwd / line["file"] for line in some],
                                                              tmp_path / "alone", "--data.init_args.batch_size", "1")
    alone = {line["path"]: line for line in map(json.loads, (out / "detections.jsonl").read_text().splitlines())}
    assert sorted(alone) == readable  # same-named images in two folders, gray.jpg and gray.png: each its own
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [f"{r}.png" for r in readable]
    for line in some:
        mine, theirs = alone[f"nested/{Path(line['file']).name}"]["detections"], line["detections"]
        assert [(d["name"], d["category_id"]) for d in mine] == [(d["name"], d["category_id"]) for d in theirs]
        assert [v for d in mine for v in d["bbox"]] == pytest.approx([v for d in theirs for v in d["bbox"]], abs=0.05)
    assert all((out / line["drawn"]).is_file() for line in alone.values())
    assert (out / "unreadable.txt").read_text().splitlines() == unreadable


def test_a_coco_format_set_with_its_own_category_ids_is_evaluated_and_written_in_those_ids(quickstart, tmp_path):
    """A user's COCO-format set: category ids 12, 40, 101 (not 1..K) with their own names, and a val image
    without annotations, which still counts (its detections are false positives). Validating the
    quickstart's model on it through the CLI logs what pycocotools gives for the results file, which is in
    the set's own ids."""
    _, cwd = quickstart
    ckpt = run_checkpoint(cwd / "runs" / "quickstart" / "detection")
    mine = tmp_path / "my_set"
    shutil.copytree(cwd / "data" / "quickstart" / "coco", mine)
    new_id, name = {1: 12, 3: 40, 7: 101}, {12: "ring", 40: "tile", 101: "wedge"}
    for split in ("train2017", "val2017"):
        path = mine / "annotations" / f"instances_{split}.json"
        data = json.loads(path.read_text())
        data["categories"] = [{"id": new_id[c["id"]], "name": name[new_id[c["id"]]]} for c in data["categories"]]
        for ann in data["annotations"]:
            ann["category_id"] = new_id[ann["category_id"]]
        if split == "val2017":
            unannotated = data["annotations"][0]["image_id"]
            data["annotations"] = [a for a in data["annotations"] if a["image_id"] != unannotated]
        path.write_text(json.dumps(data))
    out = tmp_path / "logs"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        cli = run_cli(["validate", "--config", QUICKSTART, "--ckpt_path", ckpt, "--data.init_args.root", mine,
                       "--data.init_args.quickstart", "false", "--data.init_args.batch_size", "1",
                       "--trainer.enable_progress_bar", "false", *csv_logger(out)])
    metrics = cli.trainer.callback_metrics
    assert cli.model.head.class_names == ["ring", "tile", "wedge"]
    results = json.loads((out / "val_detections.json").read_text())
    assert results and {d["category_id"] for d in results} <= {12, 40, 101}
    assert unannotated in {d["image_id"] for d in results}  # evaluated although it has no annotation
    # pycocotools scores every image of the json, the unannotated one too: equal AP means ours counted it.
    annotations = mine / "annotations" / "instances_val2017.json"
    for iou_type in ("bbox", "segm"):
        stats = _evaluate_file(annotations, out / "val_detections.json", iou_type)
        assert stats[0] == pytest.approx(metrics[f"val/{iou_type}_ap"].item(), abs=1e-3), iou_type
    assert metrics["val/bbox_ap"] > 0.1
