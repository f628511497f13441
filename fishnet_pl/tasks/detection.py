"""Object detection and instance segmentation: torchvision's Faster / Mask R-CNN with an FPN on any timm backbone.

FishNet's best maps at strides 4-32 are the last body map and the three head maps, which come out of
cross-stage concatenations rather than top-level children, so torchvision's ``BackboneWithFPN`` (and its
``IntermediateLayerGetter``) cannot pick them. ``TimmBackboneWithFPN`` is its counterpart over timm's
``features_only`` model (which extracts FishNet's maps through ``forward_intermediates``); the detector
around it is torchvision's own, composed, not subclassed.

Evaluation is pycocotools' ``COCOeval`` (AP, AP50, AP75, APs/m/l for boxes and masks) over every
validation image exactly once, also under DDP (``fishnet_pl.metrics.CocoEvaluation``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Literal

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from fishnet_pl.metrics import CocoEvaluation, encode_masks, rle_json
from fishnet_pl.models.registry import create_backbone
from fishnet_pl.tasks.base import TaskHead

FPN_REDUCTIONS = (4, 8, 16, 32)


class TimmBackboneWithFPN(nn.Module):
    """A timm backbone's stride 4, 8, 16, 32 maps through a feature pyramid: torchvision's ``BackboneWithFPN``
    for any timm model. Owns ``body`` (timm ``features_only``) and ``fpn``; returns an ``OrderedDict`` of
    ``out_channels``-channel maps ``"0".."3"`` (strides 4-32) and ``"pool"`` (stride 64), the names
    torchvision's default RoI poolers and anchors expect.
    """

    def __init__(self, backbone: str, out_channels: int = 256, in_chans: int = 3):
        super().__init__()
        with torch.device("meta"):
            info = create_backbone(backbone, features_only=True).feature_info
        last_with = {r: i for i, r in enumerate(info.reduction())}  # the richest (last) map of each stride
        if any(r not in last_with for r in FPN_REDUCTIONS):
            raise ValueError(f"the FPN needs backbone maps at strides {FPN_REDUCTIONS}, {backbone} gives "
                             f"{info.reduction()}")
        self.body = create_backbone(backbone, features_only=True, in_chans=in_chans,
                                    out_indices=tuple(last_with[r] for r in FPN_REDUCTIONS))
        self.fpn = FeaturePyramidNetwork(self.body.feature_info.channels(), out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(k), m) for k, m in enumerate(self.body(x))))


class DetectionHead(TaskHead):
    """Faster R-CNN (boxes) or Mask R-CNN (boxes and instance masks) from torchvision on a timm backbone + FPN.

    Batches follow torchvision's detection format (``COCODataModule``): ``images`` a list of float
    [3, H, W] in 0..1 (the detector resizes them and normalises with the backbone's mean and std),
    ``targets`` a list of dicts with ``boxes`` (xyxy pixels), ``labels`` (1..K, 0 is background),
    ``masks`` (uint8 [N, H, W], Mask R-CNN), ``image_id``, ``iscrowd`` and ``area`` (evaluation).
    ``num_classes`` is K, without the background; the detector gets K + 1.

    Validation and test log COCO's ``{stage}/bbox_ap``, ``bbox_ap50``, ``bbox_ap75``, ``bbox_aps``,
    ``bbox_apm``, ``bbox_apl`` (and ``segm_*`` for Mask R-CNN), computed by pycocotools over each image
    once (-1 where no ground truth falls in an area range); ``CocoResultsWriter`` writes the detections as
    a COCO results file ``{stage}_detections.json`` into the run's log folder. Predict keeps the detections
    scoring at least ``predict_score_thresh``; ``DetectionPredictionWriter`` saves each image with them drawn
    (``a/img.jpg.png``) and a ``detections.jsonl`` line per image.

    Args:
        detector: "maskrcnn" or "fasterrcnn".
        fpn_channels: channels of every FPN level (and of the RoI heads' input).
        anchor_sizes: anchor side in input pixels, one per FPN level "0", "1", "2", "3", "pool".
        aspect_ratios: anchor height / width ratios, used at every level.
        min_size: the detector resizes each image so its short side is this (pixels); a tuple picks
            one at random per training batch (multi-scale training) and the last for evaluation.
        max_size: ... unless the long side would exceed this.
        box_score_thresh: detections scoring below this are dropped (COCO evaluation uses 0.05).
        box_nms_thresh: IoU of the per-class non-maximum suppression.
        box_detections_per_img: at most this many detections per image (COCO: 100).
        box_batch_size_per_image: RoIs sampled per image to train the box head.
        representation_size: width of the box head's two fully connected layers.
        mask_head_channels: channels of the mask head's four 3x3 convolutions (Mask R-CNN).
        mask_threshold: a mask pixel belongs to the object when its probability exceeds this.
        predict_score_thresh: predict keeps (draws and writes) only detections scoring at least this;
            evaluation keeps all above ``box_score_thresh``.
    """

    monitor = "val/bbox_ap"
    monitor_mode = "max"
    progress_bar = ("loss", "bbox_ap", "segm_ap")
    backbone_path = "backbone.body"

    def __init__(
        self,
        detector: Literal["maskrcnn", "fasterrcnn"] = "maskrcnn",
        fpn_channels: int = 256,
        anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512),
        aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
        min_size: int | tuple[int, ...] = 800,
        max_size: int = 1333,
        box_score_thresh: float = 0.05,
        box_nms_thresh: float = 0.5,
        box_detections_per_img: int = 100,
        box_batch_size_per_image: int = 512,
        representation_size: int = 1024,
        mask_head_channels: int = 256,
        mask_threshold: float = 0.5,
        predict_score_thresh: float = 0.5,
    ):
        super().__init__()
        if detector not in ("maskrcnn", "fasterrcnn"):
            raise ValueError(f"detector must be 'maskrcnn' or 'fasterrcnn', got {detector!r}")
        if len(anchor_sizes) != len(FPN_REDUCTIONS) + 1:
            raise ValueError(f"anchor_sizes needs one size per FPN level ({len(FPN_REDUCTIONS) + 1}: strides "
                             f"{FPN_REDUCTIONS} and the pooled level), got {tuple(anchor_sizes)}")
        sizes = (min_size,) if isinstance(min_size, int) else tuple(min_size)
        if not sizes or min(sizes) < 1 or max_size < max(sizes):
            raise ValueError(f"min_size must be positive and at most max_size ({max_size}), got {min_size}")
        for name, value in (("box_score_thresh", box_score_thresh), ("box_nms_thresh", box_nms_thresh),
                            ("mask_threshold", mask_threshold), ("predict_score_thresh", predict_score_thresh)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.detector, self.fpn_channels = detector, fpn_channels
        self.anchor_sizes, self.aspect_ratios = tuple(anchor_sizes), tuple(aspect_ratios)
        self.min_size, self.max_size = min_size if isinstance(min_size, int) else sizes, max_size
        self.box_score_thresh, self.box_nms_thresh = box_score_thresh, box_nms_thresh
        self.box_detections_per_img, self.box_batch_size_per_image = box_detections_per_img, box_batch_size_per_image
        self.representation_size, self.mask_head_channels = representation_size, mask_head_channels
        self.mask_threshold, self.predict_score_thresh = mask_threshold, predict_score_thresh

    @property
    def with_masks(self) -> bool:
        return self.detector == "maskrcnn"

    def build(self, backbone: str, num_classes: int, in_chans: int) -> nn.Module:
        if num_classes < 1:
            raise ValueError(f"num_classes (object categories, background excluded) must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        fpn = TimmBackboneWithFPN(backbone, self.fpn_channels, in_chans)
        cfg = fpn.body.pretrained_cfg
        classes = num_classes + 1  # + background
        anchors = AnchorGenerator(tuple((s,) for s in self.anchor_sizes),
                                  (self.aspect_ratios,) * len(self.anchor_sizes))
        resolution = 7  # torchvision's default box RoI pooler output
        kwargs = dict(
            min_size=self.min_size, max_size=self.max_size, image_mean=list(cfg["mean"]), image_std=list(cfg["std"]),
            rpn_anchor_generator=anchors,
            box_head=TwoMLPHead(self.fpn_channels * resolution**2, self.representation_size),
            box_predictor=FastRCNNPredictor(self.representation_size, classes),
            box_score_thresh=self.box_score_thresh, box_nms_thresh=self.box_nms_thresh,
            box_detections_per_img=self.box_detections_per_img,
            box_batch_size_per_image=self.box_batch_size_per_image)
        self.metrics = nn.ModuleDict({stage: CocoEvaluation(num_classes, self.with_masks, self.mask_threshold)
                                      for stage in ("val", "test")})
        if self.with_masks:
            layers = (self.mask_head_channels,) * 4
            return MaskRCNN(fpn, mask_head=MaskRCNNHeads(self.fpn_channels, layers, 1),
                            mask_predictor=MaskRCNNPredictor(layers[-1], layers[-1], classes), **kwargs)
        return FasterRCNN(fpn, **kwargs)

    # ------------------------------------------------------------------ steps
    def forward(self, network: nn.Module, images: list[torch.Tensor] | torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """torchvision's detections per image: ``boxes`` (xyxy, input pixels), ``labels``, ``scores``
        and, for Mask R-CNN, ``masks`` (float [N, 1, H, W] probabilities)."""
        return network(list(images))

    def training_step(self, network: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        targets = []
        for target in batch["targets"]:
            if self.with_masks and "masks" not in target:
                raise ValueError("Mask R-CNN trains on instance masks, but the targets have none: set the "
                                 "datamodule's with_masks=true, or use detector=fasterrcnn")
            keys = ("boxes", "labels", "masks") if self.with_masks else ("boxes", "labels")
            targets.append({k: target[k] for k in keys})
        losses = network(list(batch["images"]), targets)
        loss = sum(losses.values())
        return loss, {"loss": loss, **losses}

    def evaluation_step(self, network: nn.Module, batch: dict, stage: str) -> None:
        outputs = network(list(batch["images"]))
        self.metrics[stage].update([image.shape[-2:] for image in batch["images"]], batch["targets"], outputs)

    # ------------------------------------------------------------------ predict
    def predict_step(self, network: nn.Module, batch: dict) -> list[dict[str, Any]]:
        outputs = network(list(batch["images"]))
        image_ids = batch.get("image_ids")
        records = []
        for i, (image, path, output) in enumerate(zip(batch["images"], batch["paths"], outputs)):
            keep = output["scores"] >= self.predict_score_thresh
            record = {"path": path, "image": (image.detach() * 255).round().clamp(0, 255).to(torch.uint8).cpu(),
                      "boxes": output["boxes"][keep].detach().cpu(), "labels": output["labels"][keep].cpu(),
                      "scores": output["scores"][keep].cpu()}
            if self.with_masks:
                masks = output["masks"][keep, 0] > self.mask_threshold
                record["masks"] = [rle_json(r) for r in encode_masks(masks)]
            if image_ids is not None:
                record["image_id"] = int(image_ids[i])
            records.append(record)
        return records
