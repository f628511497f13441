"""Image classification: the timm classifier itself (FishNet's score layer for FishNet), cross-entropy,
top-1/top-5 accuracy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from fishnet_pl.metrics import ClassificationMetrics
from fishnet_pl.models.registry import create_backbone
from fishnet_pl.tasks.base import TaskHead


class ClassificationHead(TaskHead):
    """The backbone's own classifier (FishNet's: BN-ReLU-1x1-BN-ReLU, pool, 1x1) trained with cross-entropy.

    Batches: ``image`` float [B, C, H, W] in [0, 1] (normalised here with the backbone's mean and std),
    ``label`` int64 [B]; for evaluation also ``index`` (the images' dataset indices), so that under DDP
    every image counts once. Validation and test log ``{stage}/loss``, ``acc1`` and ``acc5``. Predict writes
    ``predictions.jsonl`` (``write_predictions``); export is ``TaskHead.export_wrapper``'s: ``images``
    [B, C, H, W] -> ``logits`` [B, num_classes] at the evaluation crop.

    Args:
        label_smoothing: cross-entropy label smoothing (0 = the authors' recipe).
        mixup_alpha: Beta(alpha, alpha) of MixUp; 0 disables it.
        cutmix_alpha: Beta(alpha, alpha) of CutMix; 0 disables it. With both on, each batch
            uses one of the two at random (torchvision's MixUp / CutMix).
    """

    monitor = "val/acc1"
    monitor_mode = "max"
    progress_bar = ("loss", "acc1")

    def __init__(self, label_smoothing: float = 0.0, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing, self.mixup_alpha, self.cutmix_alpha = label_smoothing, mixup_alpha, cutmix_alpha

    def build(self, backbone: str, num_classes: int, in_chans: int) -> nn.Module:
        network = create_backbone(backbone, num_classes=num_classes, in_chans=in_chans)
        self.set_normalization(network, in_chans)
        self.num_classes = num_classes
        mixes = [cls(alpha=a, num_classes=num_classes)
                 for cls, a in ((v2.MixUp, self.mixup_alpha), (v2.CutMix, self.cutmix_alpha)) if a > 0]
        self.mix = v2.RandomChoice(mixes) if mixes else None
        self.metrics = nn.ModuleDict({stage: ClassificationMetrics(num_classes) for stage in ("val", "test")})
        return network

    def forward(self, network: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return network(self.normalize(images))

    def training_step(self, network: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images, labels = batch["image"], batch["label"]
        if self.mix is not None:
            images, labels = self.mix(images, labels)  # labels become class probabilities
        logits = self(network, images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        return loss, {"loss": loss}

    def evaluation_step(self, network: nn.Module, batch: dict, stage: str) -> None:
        self.metrics[stage].update(self(network, batch["image"]), batch["label"], batch.get("index"))

    def predict_step(self, network: nn.Module, batch: dict) -> list[dict[str, Any]]:
        probs = self(network, batch["image"]).float().softmax(dim=1)  # fp32 scores also under bf16 autocast
        scores, classes = probs.topk(min(5, probs.shape[1]), dim=1)
        return [{"path": path, "classes": c.tolist(), "scores": s.tolist()}
                for path, c, s in zip(batch["path"], classes.cpu(), scores.cpu())]

    def write_predictions(self, records: list[dict[str, Any]], paths: list[str], folder: Path, first: bool) -> None:
        """One JSON line per image in ``predictions.jsonl``: ``path`` (relative, mirroring the input), ``file``
        (as read), top-5 class indices, names (``class_names``, when known), probabilities."""
        names = self.class_names  # the datamodule's, passed on by the module's setup
        with open(folder / "predictions.jsonl", "w" if first else "a") as f:
            for r, relative in zip(records, paths):
                r = {"path": relative, "file": r["path"], **{k: v for k, v in r.items() if k != "path"}}
                if names is not None:
                    r["names"] = [names[c] for c in r["classes"]]
                f.write(json.dumps(r) + "\n")
