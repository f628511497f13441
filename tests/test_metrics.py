"""The evaluation metrics: the same numbers as torchmetrics' reference metrics, each image counted once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from fishnet_pl.metrics import ClassificationMetrics, SegmentationIoU


def test_classification_metrics_count_a_repeated_image_once_and_match_torchmetrics():
    torch.manual_seed(0)
    logits, labels = torch.randn(11, 7), torch.randint(0, 7, (11,))
    metric = ClassificationMetrics(num_classes=7)
    metric.update(logits[:6], labels[:6], torch.arange(6))
    metric.update(logits[6:], labels[6:], torch.arange(6, 11))
    metric.update(logits[:2], labels[:2], torch.arange(2))  # what DDP's sampler repeats
    result = metric.compute()
    assert result["acc1"] == pytest.approx(MulticlassAccuracy(7, top_k=1, average="micro")(logits, labels).item())
    assert result["acc5"] == pytest.approx(MulticlassAccuracy(7, top_k=5, average="micro")(logits, labels).item())
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)


def test_without_image_keys_every_row_counts():
    metric = ClassificationMetrics(num_classes=3)
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0]])
    metric.update(logits, torch.tensor([0, 0]))
    metric.update(logits[:1], torch.tensor([0]))
    assert metric.compute()["acc1"].item() == pytest.approx(2 / 3)


def test_segmentation_iou_matches_torchmetrics_and_counts_a_repeated_image_once():
    torch.manual_seed(0)
    preds, target = torch.randint(0, 5, (4, 9, 13)), torch.randint(0, 5, (4, 9, 13))
    target[:, :2] = 255
    target[target == 3] = 4  # class 3 only predicted: IoU 0; no class is absent from both
    reference = MulticlassJaccardIndex(5, average="none", ignore_index=255, zero_division=float("nan"))
    expected = reference(preds, target)
    metric = SegmentationIoU(num_classes=5, class_names=["a", "b", "c", "d", "e"])
    metric.update(preds[:3], target[:3], torch.tensor([0, 1, 2]))
    metric.update(preds[3:], target[3:], torch.tensor([3]))
    metric.update(preds[:1], target[:1], torch.tensor([0]))
    result = metric.compute()
    assert [result[f"iou_{n}"].item() for n in "abcde"] == pytest.approx(expected.tolist())
    assert result["miou"].item() == pytest.approx(expected.mean().item())


def test_segmentation_iou_names_the_class_ids_it_cannot_count():
    metric = SegmentationIoU(num_classes=3)
    with pytest.raises(ValueError, match=r"outside 0..2.*\[7\]"):
        metric.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([[[0, 7], [255, 1]]]))


def test_the_written_coco_results_file_scores_exactly_what_was_logged(tmp_path):
    """pycocotools on the results file we write gives the AP we logged, for any detections: here a box whose IoU
    (0.54996) sits just under the 0.55 threshold, and two scores 4e-6 apart (rounding would move the box across
    the threshold and tie the scores, which pycocotools then orders differently)."""
    import contextlib
    import io
    import json

    import numpy as np
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from fishnet_pl.metrics import coco_evaluate, write_coco_results

    record = {"image_id": 7, "height": 200, "width": 300,
              "gt_boxes": np.array([[10.0, 10.0, 100.0, 100.0], [150.0, 20.0, 100.0, 100.0]]),
              "gt_labels": np.array([1, 1]), "gt_iscrowd": np.array([0, 0]), "gt_area": np.array([1e4, 1e4]),
              "boxes": np.array([[10.0, 10.0, 54.996, 100.0], [150.0, 20.0, 100.0, 100.0], [160.0, 30.0, 90.0, 90.0]]),
              "scores": np.array([0.900004, 0.900001, 0.899], np.float32), "labels": np.array([1, 1, 1])}
    logged = coco_evaluate([record], "bbox", num_classes=1)
    results = tmp_path / "val_detections.json"
    write_coco_results([record], results, {1: 5})
    annotations = tmp_path / "instances.json"
    annotations.write_text(json.dumps({
        "images": [{"id": 7, "height": 200, "width": 300}], "categories": [{"id": 5, "name": "thing"}],
        "annotations": [{"id": j + 1, "image_id": 7, "category_id": 5, "bbox": box.tolist(), "area": 1e4,
                         "iscrowd": 0} for j, box in enumerate(record["gt_boxes"])]}))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotations))
        evaluator = COCOeval(gt, gt.loadRes(str(results)), "bbox")
        evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
    assert list(evaluator.stats[:6]) == pytest.approx(logged, abs=1e-12)


def test_top_k_accuracy_is_reported_only_with_more_than_k_classes():
    logits, labels = torch.randn(6, 4), torch.randint(0, 4, (6,))
    few, many = ClassificationMetrics(num_classes=4), ClassificationMetrics(num_classes=6)
    few.update(logits, labels), many.update(torch.randn(6, 6), labels)
    assert set(few.compute()) == {"loss", "acc1"}  # top-4 of 4 classes is always 1
    assert set(many.compute()) == {"loss", "acc1", "acc5"}
