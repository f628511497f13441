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
