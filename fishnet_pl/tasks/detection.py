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

import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

import pycocotools.mask as mask_utils
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.utils import draw_segmentation_masks

from fishnet_pl.drawing import draw_boxes
from fishnet_pl.metrics import (
    CocoEvaluation,
    encode_masks,
    rle_json,
    write_cityscapes_instances,
    write_coco_results,
    xywh,
)
from fishnet_pl.models.registry import create_backbone
from fishnet_pl.tasks.base import ExportSpec, TaskHead

log = logging.getLogger(__name__)
FPN_REDUCTIONS = (4, 8, 16, 32)
#: ONNX opset of the detector's export (torch's TorchScript-based exporter), as tests/test_export.py runs it.
ONNX_OPSET = 17


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

    Batches follow torchvision's detection format (``COCODataModule``): ``image`` a list of float
    [3, H, W] in 0..1 (the detector resizes them and normalises with the backbone's mean and std),
    ``target`` a list of dicts with ``boxes`` (xyxy pixels), ``labels`` (1..K, 0 is background),
    ``masks`` (uint8 [N, H, W], Mask R-CNN), ``image_id``, ``iscrowd`` and ``area`` (evaluation).
    ``num_classes`` is K, without the background; the detector gets K + 1.

    Validation and test log COCO's ``{stage}/bbox_ap``, ``bbox_ap50``, ``bbox_ap75``, ``bbox_aps``,
    ``bbox_apm``, ``bbox_apl`` (and ``segm_*`` for Mask R-CNN), computed by pycocotools over each image
    once (-1 where no ground truth falls in an area range); ``write_results`` writes the detections as
    a COCO results file ``{stage}_detections.json`` into the run's log folder (on Cityscapes also
    cityscapesScripts' instance results, ``{stage}_cityscapes_instances/``). Predict keeps the detections
    scoring at least ``predict_score_thresh``; ``write_predictions`` saves each image with them drawn
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
    #: Distinct colours for drawn classes (label k gets PALETTE[k % len]).
    PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
               (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40))
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

    #: Outputs of the network beyond the detector's, exported after them (Panoptic FPN's ``semantic``).
    extra_outputs: tuple[str, ...] = ()

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
        for target in batch["target"]:
            if self.with_masks and "masks" not in target:
                raise ValueError("Mask R-CNN trains on instance masks, but the targets have none: set the "
                                 "datamodule's with_masks=true, or use detector=fasterrcnn")
            keys = ("boxes", "labels", "masks") if self.with_masks else ("boxes", "labels")
            targets.append({k: target[k] for k in keys})
        losses = network(list(batch["image"]), targets)
        loss = sum(losses.values())
        return loss, {"loss": loss, **losses}

    def evaluation_step(self, network: nn.Module, batch: dict, stage: str) -> None:
        outputs = network(list(batch["image"]))
        self.metrics[stage].update([image.shape[-2:] for image in batch["image"]], batch["target"], outputs)

    # ------------------------------------------------------------------ predict
    def predict_step(self, network: nn.Module, batch: dict) -> list[dict[str, Any]]:
        outputs = network(list(batch["image"]))
        image_ids = batch.get("image_id")
        records = []
        for i, (image, path, output) in enumerate(zip(batch["image"], batch["path"], outputs)):
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

    def write_predictions(self, records: list[dict[str, Any]], paths: list[str], folder: Path, first: bool) -> None:
        """Per image ``a/img.jpg``: ``a/img.jpg.png``, the image with its detections drawn: masks, boxes, class
        names and scores, lines and text scaled to the image; and one line of ``detections.jsonl``: ``path``,
        ``file`` (as read), ``drawn`` and the same detections with COCO category id (the dataset's
        ``label_to_category_id``), class name, score, ``bbox`` [x, y, width, height] and RLE ``segmentation``."""
        names = self.class_names  # the datamodule's, passed on by the module's setup
        category_of = self.dataset_info.label_to_category_id or {}
        with open(folder / "detections.jsonl", "w" if first else "a") as f:
            for r, relative in zip(records, paths):
                labels = r["labels"].tolist()
                shown = [names[k - 1] if names and 0 < k <= len(names) else str(k) for k in labels]
                colours = [self.PALETTE[k % len(self.PALETTE)] for k in labels]
                image = r["image"]
                if labels and "masks" in r:
                    masks = torch.from_numpy(mask_utils.decode(r["masks"])).permute(2, 0, 1)
                    image = draw_segmentation_masks(image, masks.bool(), alpha=0.45, colors=colours)
                drawn = draw_boxes(image, r["boxes"], [f"{s} {p:.2f}" for s, p in zip(shown, r["scores"])], colours)
                (folder / relative).parent.mkdir(parents=True, exist_ok=True)
                drawn.save(folder / f"{relative}.png")
                detections = [{"label": k, "category_id": category_of.get(k, k), "name": shown[i],
                               "score": round(float(r["scores"][i]), 5),
                               "bbox": [round(v, 2) for v in xywh(r["boxes"][i:i + 1])[0].tolist()]}
                              for i, k in enumerate(labels)]
                for detection, rle in zip(detections, r.get("masks", ())):
                    detection["segmentation"] = rle
                line = {"path": relative, "file": r["path"], "drawn": f"{relative}.png", "detections": detections}
                if "image_id" in r:
                    line["image_id"] = r["image_id"]
                f.write(json.dumps(line) + "\n")

    def write_results(self, stage: str, folder: Path) -> None:
        """The detections of every image evaluated in ``stage`` as a COCO results file
        ``{folder}/{stage}_detections.json`` (category ids mapped back with the dataset's
        ``label_to_category_id``), ready for ``COCO.loadRes`` or the evaluation server. On Cityscapes (the
        dataset's ``benchmark``), Mask R-CNN's masks also go to ``{folder}/{stage}_cityscapes_instances/`` in
        cityscapesScripts' instance results format (``write_cityscapes_instances``), rewritten each epoch."""
        metric, path = self.metrics[stage], folder / f"{stage}_detections.json"
        info = self.dataset_info
        write_coco_results(metric.images, path, info.label_to_category_id)
        log.info("%s detections of %d images written to %s", stage, len(metric.images), path)
        if info.benchmark == "cityscapes" and self.with_masks:
            out = folder / f"{stage}_cityscapes_instances"
            write_cityscapes_instances(metric.images, out, info.label_to_category_id)
            log.info("%s instance masks written to %s in cityscapesScripts' results format (evaluate with "
                     "CITYSCAPES_RESULTS=%s csEvalInstanceLevelSemanticLabeling)", stage, out, out)

    # ------------------------------------------------------------------ deployment
    def preprocessing(self) -> dict[str, Any]:
        """``min_size``, ``max_size``: the detector resizes (and normalises) each image itself."""
        return {"min_size": self.min_size, "max_size": self.max_size}

    def export_wrapper(self, network: nn.Module, preprocessing: dict[str, Any], in_channels: int,
                       input_size: tuple[int, int] | None = None) -> ExportSpec:
        """One ``image`` float [C, H, W] in [0, 1] of any size -> ``boxes`` [N, 4] (xyxy, input pixels),
        ``labels`` [N] (1..K), ``scores`` [N] and, for Mask R-CNN, ``masks`` [N, 1, H, W] probabilities (then the
        ``extra_outputs``, maps [C, H, W] at the image's size); the detector resizes and normalises the image itself.
        Only ONNX, with torch's TorchScript-based exporter:
        ``torch.export`` cannot take torchvision's detectors. The example is square, ``min_size`` a side."""
        side = self.min_size if isinstance(self.min_size, int) else self.min_size[-1]
        h, w = input_size or (side, side)
        wrapper = DetectorOutputs(network, self.with_masks, self.extra_outputs).eval()
        return ExportSpec(
            wrapper, torch.rand(in_channels, h, w), ["image"], list(wrapper.keys),
            dynamic_axes={"image": {1: "height", 2: "width"},
                          **{n: {0: "detections"} for n in wrapper.keys if n not in self.extra_outputs},
                          **{n: {1: "height", 2: "width"} for n in self.extra_outputs}},  # maps [C, H, W]
            opset=ONNX_OPSET,
            pt2_unsupported="torch.export (pt2) cannot export torchvision's Faster / Mask R-CNN on this torch: the "
                            "number of boxes after non-maximum suppression is data-dependent (torchvision's "
                            "batched_nms guards on it, GuardOnDataDependentSymNode); export detection with "
                            "--format onnx")


class DetectorOutputs(nn.Module):
    """torchvision's detector on one float [C, H, W] image in [0, 1] (it resizes and normalises itself),
    returning ``(boxes, labels, scores)`` plus ``masks`` for Mask R-CNN (and any ``extra`` keys of its output,
    e.g. Panoptic FPN's ``semantic``), as tensors."""

    def __init__(self, network: nn.Module, with_masks: bool, extra: tuple[str, ...] = ()):
        super().__init__()
        self.network = network
        self.keys = ("boxes", "labels", "scores", *(("masks",) if with_masks else ()), *extra)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.network([image])[0]
        return tuple(out[k] for k in self.keys)
