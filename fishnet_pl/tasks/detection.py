"""Object detection and instance segmentation: torchvision's Faster / Mask R-CNN with an FPN on any timm backbone.

FishNet's best maps at strides 4-32 are the last body map and the three head maps, which come out of
cross-stage concatenations rather than top-level children, so torchvision's ``BackboneWithFPN`` (and its
``IntermediateLayerGetter``) cannot pick them. ``TimmBackboneWithFPN`` is its counterpart over timm's
``features_only`` model (which extracts FishNet's maps through ``forward_intermediates``); the detector
around it is torchvision's own, composed, not subclassed.

Evaluation is pycocotools' ``COCOeval`` (AP, AP50, AP75, APs/m/l for boxes and masks) over every
validation image exactly once, also under DDP, where the distributed sampler repeats images to even
out the last batch. Masks are kept as RLE between the steps, so COCO's 5,000 val images fit in memory.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pycocotools.mask as mask_utils
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torchvision.io import write_png
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from fishnet_pl.models.registry import create_backbone
from fishnet_pl.tasks.base import TaskHead

log = logging.getLogger(__name__)

FPN_REDUCTIONS = (4, 8, 16, 32)
# COCOeval.stats[0:6], in its order.
COCO_METRICS = ("ap", "ap50", "ap75", "aps", "apm", "apl")
# Distinct colours for drawn classes (label k gets PALETTE[k % len]).
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40))


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
    once (-1 where no ground truth falls in an area range), and write the detections as a COCO results
    file ``{stage}_detections.json`` into the run's log folder. Predict saves each image with its
    detections drawn (``<name>.png``) and a ``detections.jsonl`` line per image.

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
        draw_score_thresh: predict draws detections scoring at least this (the JSON keeps all).
    """

    monitor = "val/bbox_ap"
    monitor_mode = "max"
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
        draw_score_thresh: float = 0.5,
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
                            ("mask_threshold", mask_threshold), ("draw_score_thresh", draw_score_thresh)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.detector, self.fpn_channels = detector, fpn_channels
        self.anchor_sizes, self.aspect_ratios = tuple(anchor_sizes), tuple(aspect_ratios)
        self.min_size, self.max_size = min_size if isinstance(min_size, int) else sizes, max_size
        self.box_score_thresh, self.box_nms_thresh = box_score_thresh, box_nms_thresh
        self.box_detections_per_img, self.box_batch_size_per_image = box_detections_per_img, box_batch_size_per_image
        self.representation_size, self.mask_head_channels = representation_size, mask_head_channels
        self.mask_threshold, self.draw_score_thresh = mask_threshold, draw_score_thresh
        self._evaluated: dict[str, list[dict]] = {}  # stage -> one compact record per evaluated image

    @property
    def with_masks(self) -> bool:
        return self.detector == "maskrcnn"

    @property
    def iou_types(self) -> tuple[str, ...]:
        return ("bbox", "segm") if self.with_masks else ("bbox",)

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

    def evaluation_step(self, network: nn.Module, batch: dict, stage: str) -> dict[str, Any]:
        outputs = network(list(batch["images"]))
        records = self._evaluated.setdefault(stage, [])
        for image, target, output in zip(batch["images"], batch["targets"], outputs):
            records.append(self._record(image.shape[-2:], target, output))
        return {}

    def _record(self, size: torch.Size, target: dict, output: dict) -> dict[str, Any]:
        """One image's ground truth and detections as small numpy arrays and RLE masks (no full-size masks)."""
        boxes = target["boxes"].detach().float().cpu().reshape(-1, 4)
        record = {
            "image_id": int(target["image_id"]), "height": int(size[0]), "width": int(size[1]),
            "gt_boxes": _xywh(boxes), "gt_labels": target["labels"].cpu().numpy().astype(np.int64),
            "gt_iscrowd": (target["iscrowd"].cpu().numpy() if "iscrowd" in target
                           else np.zeros(len(boxes), np.int64)),
            "gt_area": (target["area"].cpu().numpy() if "area" in target
                        else ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).numpy()),
            "boxes": _xywh(output["boxes"].detach().float().cpu()), "scores": output["scores"].cpu().numpy(),
            "labels": output["labels"].cpu().numpy().astype(np.int64),
        }
        if self.with_masks:
            record["gt_rles"] = _encode(target["masks"] > 0) if "masks" in target else None
            record["rles"] = _encode(output["masks"][:, 0] > self.mask_threshold)
        return record

    def evaluation_epoch_end(self, stage: str, trainer: Any) -> dict[str, torch.Tensor]:
        records = _gather_on_rank_zero(self._evaluated.pop(stage, []))
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: every rank asks
        metrics: dict[str, float] = {}
        if trainer.is_global_zero and records:
            images = list({r["image_id"]: r for r in reversed(records)}.values())  # DDP repeats: each image once
            images.sort(key=lambda r: r["image_id"])
            iou_types = self.iou_types if all(r.get("gt_rles") is not None for r in images) else ("bbox",)
            for iou_type in iou_types:
                stats = coco_evaluate(images, iou_type, self.num_classes)
                metrics.update({f"{stage}/{iou_type}_{name}": value for name, value in zip(COCO_METRICS, stats)})
            if not trainer.sanity_checking:
                path = log_dir / f"{stage}_detections.json"
                write_coco_results(images, path, getattr(trainer.datamodule, "label_to_category_id", None))
                log.info("%s detections of %d images written to %s", stage, len(images), path)
        metrics = trainer.strategy.broadcast(metrics, src=0)
        return {name: torch.tensor(value, dtype=torch.float32) for name, value in metrics.items()}

    # ------------------------------------------------------------------ predict
    def predict_step(self, network: nn.Module, batch: dict) -> list[dict[str, Any]]:
        outputs = network(list(batch["images"]))
        image_ids = batch.get("image_ids")
        records = []
        for i, (image, path, output) in enumerate(zip(batch["images"], batch["paths"], outputs)):
            record = {"path": path, "image": (image.detach() * 255).round().clamp(0, 255).to(torch.uint8).cpu(),
                      "boxes": output["boxes"].detach().cpu(), "labels": output["labels"].cpu(),
                      "scores": output["scores"].cpu()}
            if self.with_masks:
                record["masks"] = [_rle_json(r) for r in _encode(output["masks"][:, 0] > self.mask_threshold)]
            if image_ids is not None:
                record["image_id"] = int(image_ids[i])
            records.append(record)
        return records

    def write_predictions(self, records: list[dict[str, Any]], out_dir: Path, datamodule: Any, first: bool) -> None:
        """Per image ``<name>.png`` with masks, boxes, class names and scores (those of at least
        ``draw_score_thresh``) drawn, and one line of ``detections.jsonl`` with every detection:
        COCO category id, class name, score, ``bbox`` [x, y, width, height] and RLE ``segmentation``."""
        names = getattr(datamodule, "class_names", None)
        category_of = getattr(datamodule, "label_to_category_id", None) or {}
        with open(out_dir / "detections.jsonl", "w" if first else "a") as f:
            for r in records:
                labels = r["labels"].tolist()
                shown = [names[k - 1] if names and 0 < k <= len(names) else str(k) for k in labels]
                keep = (r["scores"] >= self.draw_score_thresh).nonzero().flatten().tolist()
                image = r["image"]
                colours = [PALETTE[labels[i] % len(PALETTE)] for i in keep]
                if keep and "masks" in r:
                    masks = torch.from_numpy(mask_utils.decode([r["masks"][i] for i in keep])).permute(2, 0, 1)
                    image = draw_segmentation_masks(image, masks.bool(), alpha=0.45, colors=colours)
                if keep:
                    image = draw_bounding_boxes(image, r["boxes"][keep], colors=colours, width=2,
                                                labels=[f"{shown[i]} {r['scores'][i]:.2f}" for i in keep])
                file = f"{Path(r['path']).stem}.png"
                write_png(image, str(out_dir / file))
                detections = [{"label": k, "category_id": category_of.get(k, k), "name": shown[i],
                               "score": round(float(r["scores"][i]), 5),
                               "bbox": [round(v, 2) for v in _xywh(r["boxes"][i:i + 1])[0].tolist()]}
                              for i, k in enumerate(labels)]
                for detection, rle in zip(detections, r.get("masks", ())):
                    detection["segmentation"] = rle
                line = {"path": r["path"], "drawn": file, "detections": detections}
                if "image_id" in r:
                    line["image_id"] = r["image_id"]
                f.write(json.dumps(line) + "\n")


# ---------------------------------------------------------------------- COCO evaluation
def _xywh(boxes: torch.Tensor) -> np.ndarray:
    boxes = boxes.reshape(-1, 4).numpy().astype(np.float64)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def _encode(masks: torch.Tensor) -> list[dict]:
    """Binary masks [N, H, W] -> N compressed RLEs (``counts`` bytes), as pycocotools stores them."""
    masks = masks.detach().cpu().numpy().astype(np.uint8)
    if not len(masks):
        return []
    return mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))


def _rle_json(rle: dict) -> dict:
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _gather_on_rank_zero(records: list[dict]) -> list[dict]:
    """Every process's records on rank 0 (an empty list elsewhere); no-op without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return records
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(records, gathered, dst=0)
    return [r for part in gathered for r in part] if gathered is not None else []


def _ground_truth(images: list[dict], iou_type: str, num_classes: int) -> COCO:
    annotations = []
    for r in images:
        rles = r.get("gt_rles") if iou_type == "segm" else None
        for j, label in enumerate(r["gt_labels"]):
            ann = {"id": len(annotations) + 1, "image_id": r["image_id"], "category_id": int(label),
                   "bbox": r["gt_boxes"][j].tolist(), "area": float(r["gt_area"][j]),
                   "iscrowd": int(r["gt_iscrowd"][j])}
            if rles is not None:
                ann["segmentation"] = _rle_json(rles[j])
            annotations.append(ann)
    coco = COCO()
    coco.dataset = {"images": [{"id": r["image_id"], "height": r["height"], "width": r["width"]} for r in images],
                    "annotations": annotations, "categories": [{"id": k} for k in range(1, num_classes + 1)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_evaluate(images: list[dict], iou_type: str, num_classes: int) -> list[float]:
    """COCOeval's AP, AP50, AP75, APs, APm, APl ("bbox" or "segm") over the records of distinct images.

    Labels 1..K serve as category ids. For "segm" the detections carry no box, so pycocotools takes
    their area (for the small / medium / large ranges) from the mask, as Detectron2 does.
    """
    detections = []
    for r in images:
        for j, label in enumerate(r["labels"]):
            det = {"image_id": r["image_id"], "category_id": int(label), "score": float(r["scores"][j])}
            if iou_type == "segm":
                det["segmentation"] = r["rles"][j]
            else:
                det["bbox"] = r["boxes"][j].tolist()
            detections.append(det)
    if not detections:
        return [0.0] * len(COCO_METRICS)  # nothing detected: no precision at any recall
    gt = _ground_truth(images, iou_type, num_classes)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        evaluator = COCOeval(gt, gt.loadRes(detections), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    log.info("COCO %s evaluation of %d images:\n%s", iou_type, len(images), out.getvalue())
    return [float(v) for v in evaluator.stats[: len(COCO_METRICS)]]


def write_coco_results(images: list[dict], path: Path, label_to_category_id: dict[int, int] | None) -> None:
    """The detections as a COCO results file (what ``COCO.loadRes`` and the evaluation server read):
    ``image_id``, ``category_id`` (labels mapped back to COCO's ids), ``bbox`` [x, y, width, height],
    ``score`` and, with masks, an RLE ``segmentation``."""
    category_of = label_to_category_id or {}
    results = []
    for r in images:
        for j, label in enumerate(r["labels"]):
            det = {"image_id": r["image_id"], "category_id": int(category_of.get(int(label), label)),
                   "bbox": [round(v, 2) for v in r["boxes"][j].tolist()], "score": round(float(r["scores"][j]), 5)}
            if "rles" in r:
                det["segmentation"] = _rle_json(r["rles"][j])
            results.append(det)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results))
