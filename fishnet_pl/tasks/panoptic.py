"""Panoptic segmentation: Panoptic FPN (Kirillov et al., CVPR 2019) on any timm backbone.

One network owns one backbone and one FPN: torchvision's Mask R-CNN on the FPN that ``DetectionHead`` builds
(``TimmBackboneWithFPN``) predicts the things, and the semantic FPN branch of the paper predicts the stuff
classes plus one "things" class on the same pyramid. Inference merges both into one panoptic map
(``fishnet_pl.panoptic.merge_panoptic``, the paper's and Detectron2's rules), scored by PQ as panopticapi and
cityscapesScripts score it (``fishnet_pl.panoptic.PanopticEvaluation``), with box and mask AP of the instance
branch beside it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from datamodules.dataset_info import DatasetInfo
from fishnet_pl.drawing import text_colour, text_font
from fishnet_pl.metrics import write_coco_results
from fishnet_pl.panoptic import PanopticEvaluation, ids_to_rgb, merge_panoptic, read_panoptic_png, write_panoptic
from fishnet_pl.tasks.detection import FPN_REDUCTIONS, DetectionHead

log = logging.getLogger(__name__)
#: The semantic targets' unlabelled value (Detectron2's and the datamodules' 255).
IGNORE_INDEX = 255
#: The losses a panoptic network returns, as ``loss_weights`` names them.
LOSS_NAMES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg", "loss_semantic")


class SemanticFPNBranch(nn.Module):
    """The semantic branch of Panoptic FPN: each FPN level from stride 32 down to 4 goes through as many
    [3x3 conv, GroupNorm, ReLU, 2x bilinear up-sampling] steps as it takes to reach stride 4 (the stride-4 level
    one step without up-sampling), the levels are summed and a 1x1 convolution gives the class logits at stride 4.

    Args:
        in_channels: channels of every FPN level.
        num_classes: output classes (the stuff classes plus one "things" class).
        channels: width of the branch (128 in the paper); a multiple of 32, GroupNorm's groups.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 128):
        super().__init__()
        if channels < 32 or channels % 32:
            raise ValueError(f"semantic_channels must be a positive multiple of 32 (GroupNorm groups), got {channels}")
        self.scales = nn.ModuleList()
        for level in range(len(FPN_REDUCTIONS)):  # level l is at stride 4 * 2**l
            steps: list[nn.Module] = []
            for step in range(max(1, level)):
                steps += [nn.Conv2d(in_channels if step == 0 else channels, channels, 3, padding=1, bias=False),
                          nn.GroupNorm(32, channels), nn.ReLU(inplace=True)]
                if level > 0:
                    steps.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scales.append(nn.Sequential(*steps))
        self.predictor = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """FPN maps at strides 4, 8, 16, 32 -> logits [B, num_classes, H/4, W/4]."""
        return self.predictor(sum(scale(f) for scale, f in zip(self.scales, features)))


class PanopticFPN(nn.Module):
    """torchvision's Mask R-CNN and a ``SemanticFPNBranch`` sharing the detector's backbone and FPN.

    Takes a list of float [3, H, W] images in [0, 1] (the detector resizes and normalises them). In training,
    with targets (detection keys plus ``semantic`` int64 [H, W]: 0 things, 1..S stuff, 255 unlabelled), returns
    Mask R-CNN's losses and ``loss_semantic`` (cross-entropy at the resized image's size); in evaluation, per image
    Mask R-CNN's detections (at the input's size) and ``semantic``, float [S + 1, H, W] logits.
    """

    def __init__(self, detector: nn.Module, semantic: SemanticFPNBranch):
        super().__init__()
        self.detector, self.semantic = detector, semantic

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None
                ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        instance_targets = None if targets is None else [
            {k: t[k] for k in ("boxes", "labels", "masks")} for t in targets]
        batch, instance_targets = self.detector.transform(list(images), instance_targets)
        features = self.detector.backbone(batch.tensors)
        proposals, proposal_losses = self.detector.rpn(batch, features, instance_targets)
        detections, detector_losses = self.detector.roi_heads(features, proposals, batch.image_sizes,
                                                               instance_targets)
        logits = self.semantic([features[str(level)] for level in range(len(FPN_REDUCTIONS))])
        logits = F.interpolate(logits, size=batch.tensors.shape[-2:], mode="bilinear", align_corners=False)
        if self.training:
            semantic = semantic_targets(targets, batch.image_sizes, batch.tensors.shape[-2:])
            loss = F.cross_entropy(logits, semantic, ignore_index=IGNORE_INDEX)
            return {**proposal_losses, **detector_losses, "loss_semantic": loss}
        detections = self.detector.transform.postprocess(detections, batch.image_sizes, original_sizes)
        for detection, image_logits, (h, w), size in zip(detections, logits, batch.image_sizes, original_sizes):
            detection["semantic"] = F.interpolate(image_logits[None, :, :h, :w], size=size, mode="bilinear",
                                                  align_corners=False)[0]
        return detections


def semantic_targets(targets: list[dict[str, torch.Tensor]] | None, sizes: list[tuple[int, int]],
                     padded: tuple[int, int]) -> torch.Tensor:
    """Each target's ``semantic`` map resized (nearest) as the detector resized its image, padded with the
    unlabelled value to the batch's padded size: int64 [B, H, W]."""
    if not targets or any("semantic" not in t for t in targets):
        raise ValueError("Panoptic FPN trains on panoptic targets (a 'semantic' map per image): set the "
                         "datamodule's targets: panoptic")
    out = torch.full((len(targets), *padded), IGNORE_INDEX, dtype=torch.long, device=targets[0]["semantic"].device)
    for i, (target, (h, w)) in enumerate(zip(targets, sizes)):
        resized = F.interpolate(target["semantic"][None, None].float(), size=(h, w), mode="nearest")
        out[i, :h, :w] = resized[0, 0].long()
    return out


def outline_things(drawn: np.ndarray, ids: np.ndarray, things: list[dict], table: np.ndarray) -> Image.Image:
    """``drawn`` (uint8 [H, W, 3]) with each thing segment's border in its colour and its class name on a tag at
    its top left, the text scaled to the image (``fishnet_pl.drawing.text_font``)."""
    inner = np.zeros_like(ids, dtype=bool)  # pixels whose four neighbours share their segment
    inner[1:-1, 1:-1] = ((ids[1:-1, 1:-1] == ids[:-2, 1:-1]) & (ids[1:-1, 1:-1] == ids[2:, 1:-1])
                         & (ids[1:-1, 1:-1] == ids[1:-1, :-2]) & (ids[1:-1, 1:-1] == ids[1:-1, 2:]))
    out = drawn.copy()
    for s in things:
        mask = ids == s["id"]
        out[mask & ~inner] = table[s["id"]]
    picture = Image.fromarray(out)
    draw, font = ImageDraw.Draw(picture), text_font(*ids.shape)
    for s in things:
        rows, cols = np.nonzero(ids == s["id"])
        colour = tuple(int(c) for c in table[s["id"]])
        left, top, right, bottom = draw.textbbox((int(cols.min()), int(rows.min())), s["name"], font=font)
        draw.rectangle((left, top, right, bottom), fill=colour)
        draw.text((left, top), s["name"], fill=text_colour(colour), font=font)
    return picture


class PanopticHead(DetectionHead):
    """Panoptic FPN: Mask R-CNN for the things and the semantic FPN branch for the stuff, on one backbone + FPN.

    Batches are the detection batches (``image``, ``target``, ``path``) whose targets also hold ``semantic``
    (int64 [H, W]: 0 for any thing, 1..S the stuff classes, 255 unlabelled) and, for evaluation, the panoptic
    ground truth ``panoptic`` (segment ids [H, W], 0 void) with its ``segments`` (``id``, ``category_id``,
    ``iscrowd``), as ``CityscapesDataModule(targets="panoptic")`` gives them. The datamodule's
    ``dataset_info.categories`` name the classes: thing label k is the k-th thing category, semantic class s the
    s-th stuff category. ``num_classes`` is the number of thing classes.

    The loss is Mask R-CNN's losses plus the semantic cross-entropy, each weighted by ``loss_weights`` (default
    1, and 0.5 for ``loss_semantic`` as in the paper). Validation and test log ``pq``, ``sq``, ``rq`` (also
    ``_things``, ``_stuff`` and ``pq_<class>``) and the instance branch's ``bbox_*`` and ``segm_*`` AP;
    ``write_results`` writes ``{stage}_panoptic.json`` with its PNG folder (COCO panoptic format, for
    panopticapi and cityscapesScripts) and ``{stage}_detections.json``. Predict writes per image
    ``a/img.jpg.png`` (the segments drawn over the image), ``a/img.jpg.panoptic.png`` (COCO panoptic ids) and a
    ``panoptic.jsonl`` line. The arguments after ``stuff_area_thresh`` are ``DetectionHead``'s (the detector is
    Mask R-CNN).

    Args:
        num_stuff_classes: S stuff classes (Cityscapes 11, COCO 53); the semantic branch predicts S + 1.
        semantic_channels: width of the semantic branch (128).
        loss_weights: weight per loss name (``loss_classifier``, ``loss_box_reg``, ``loss_mask``,
            ``loss_objectness``, ``loss_rpn_box_reg``, ``loss_semantic``); unnamed ones weigh 1.
        overlap_thresh: merge: an instance more than this fraction covered by higher-scoring ones is dropped.
        instance_score_thresh: merge: instances scoring below this are left out of the panoptic map.
        stuff_area_thresh: merge: stuff regions smaller than this (pixels) become void.
    """

    monitor = "val/pq"
    monitor_mode = "max"
    progress_bar = ("loss", "pq", "bbox_ap", "segm_ap")
    backbone_path = "detector.backbone.body"

    def __init__(
        self,
        num_stuff_classes: int,
        semantic_channels: int = 128,
        loss_weights: dict[str, float] | None = None,
        overlap_thresh: float = 0.5,
        instance_score_thresh: float = 0.5,
        stuff_area_thresh: int = 4096,
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
        super().__init__("maskrcnn", fpn_channels, anchor_sizes, aspect_ratios, min_size, max_size, box_score_thresh,
                         box_nms_thresh, box_detections_per_img, box_batch_size_per_image, representation_size,
                         mask_head_channels, mask_threshold, predict_score_thresh)
        if num_stuff_classes < 1:
            raise ValueError(f"num_stuff_classes must be >= 1, got {num_stuff_classes}")
        unknown = sorted(set(loss_weights or {}) - set(LOSS_NAMES))
        if unknown:
            raise ValueError(f"loss_weights names unknown losses {unknown}; the losses are {list(LOSS_NAMES)}")
        for name, value in (("overlap_thresh", overlap_thresh), ("instance_score_thresh", instance_score_thresh)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.num_stuff_classes, self.semantic_channels = num_stuff_classes, semantic_channels
        self.loss_weights = {"loss_semantic": 0.5, **(loss_weights or {})}
        self.overlap_thresh, self.instance_score_thresh = overlap_thresh, instance_score_thresh
        self.stuff_area_thresh = stuff_area_thresh
        self.thing_ids: list[int] = []  # the category id of each thing label - 1 (set_dataset_info)
        self.stuff_ids: list[int] = []  # the category id of each semantic class - 1

    def build(self, backbone: str, num_classes: int, in_chans: int) -> nn.Module:
        detector = super().build(backbone, num_classes, in_chans)
        semantic = SemanticFPNBranch(self.fpn_channels, self.num_stuff_classes + 1, self.semantic_channels)
        self.metrics = nn.ModuleDict({stage: PanopticEvaluation(num_classes, self.mask_threshold)
                                      for stage in ("val", "test")})
        return PanopticFPN(detector, semantic)

    def set_dataset_info(self, info: DatasetInfo) -> None:
        """The data's categories must be as many things and stuff classes as the network predicts."""
        if not info.categories:
            raise ValueError("PanopticHead needs the dataset's categories (things and stuff): use a panoptic "
                             "datamodule, e.g. CityscapesDataModule with targets: panoptic")
        things = [c for c in info.categories if c["isthing"]]
        stuff = [c for c in info.categories if not c["isthing"]]
        if (len(things), len(stuff)) != (self.num_classes, self.num_stuff_classes):
            raise ValueError(f"the data has {len(things)} thing and {len(stuff)} stuff classes, the panoptic network "
                             f"{self.num_classes} and {self.num_stuff_classes}: set --model.head.init_args."
                             f"num_stuff_classes {len(stuff)} (num_classes follows the data)")
        super().set_dataset_info(info)
        self.thing_ids, self.stuff_ids = [c["id"] for c in things], [c["id"] for c in stuff]
        for metric in self.metrics.values():
            metric.set_categories(info.categories)

    # ------------------------------------------------------------------ steps
    def training_step(self, network: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        losses = network(list(batch["image"]), list(batch["target"]))
        loss = sum(self.loss_weights.get(name, 1.0) * value for name, value in losses.items())
        return loss, {"loss": loss, **losses}

    def merge(self, output: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[dict]]:
        """One image's panoptic map (ids [H, W], 0 void) and segments from the network's output."""
        labels = output["labels"].tolist()
        category_ids = torch.tensor([self.thing_ids[k - 1] for k in labels], dtype=torch.long)
        return merge_panoptic(output["masks"][:, 0] > self.mask_threshold, output["scores"], category_ids,
                              output["semantic"].argmax(dim=0), self.stuff_ids, overlap_thresh=self.overlap_thresh,
                              stuff_area_thresh=self.stuff_area_thresh,
                              instance_score_thresh=self.instance_score_thresh)

    def evaluation_step(self, network: nn.Module, batch: dict, stage: str) -> None:
        outputs = network(list(batch["image"]))
        self.metrics[stage].update([image.shape[-2:] for image in batch["image"]], batch["target"], outputs,
                                   [self.merge(output) for output in outputs])

    # ------------------------------------------------------------------ predict
    def predict_step(self, network: nn.Module, batch: dict) -> list[dict[str, Any]]:
        records = []
        for image, path, output in zip(batch["image"], batch["path"], network(list(batch["image"]))):
            ids, segments = self.merge(output)
            records.append({"path": path, "panoptic": ids.to(torch.int32).cpu(), "segments": segments,
                            "image": (image.detach() * 255).round().clamp(0, 255).to(torch.uint8).cpu()})
        return records

    def write_predictions(self, records: list[dict[str, Any]], paths: list[str], folder: Path, first: bool) -> None:
        """Per image ``a/img.jpg``: ``a/img.jpg.png``, each segment's colour blended half-and-half over the image
        (stuff in its category's colour, things each in their own, outlined and tagged with their class);
        ``a/img.jpg.panoptic.png``, the segment ids in the COCO panoptic encoding (id = R + 256 G + 256² B);
        ``a/img.jpg.segments.json``, its segments with ``id``, ``category_id``, ``name``, ``isthing``, ``area`` (and
        ``score``); and the same as a ``panoptic.jsonl`` line with ``path`` and ``file`` (as read)."""
        names = {c["id"]: c["name"] for c in self.dataset_info.categories or []}
        colours = {c["id"]: tuple(c["color"]) for c in self.dataset_info.categories or [] if c.get("color")}
        with open(folder / "panoptic.jsonl", "w" if first else "a") as f:
            for r, relative in zip(records, paths):
                ids = r["panoptic"].numpy()
                table = np.zeros((len(r["segments"]) + 1, 3), np.uint8)
                for s in r["segments"]:
                    thing_colour = self.PALETTE[s["id"] % len(self.PALETTE)]
                    table[s["id"]] = thing_colour if s["isthing"] else colours.get(s["category_id"], thing_colour)
                image = r["image"].permute(1, 2, 0).numpy()
                drawn = np.where(ids[..., None] > 0, (0.5 * image + 0.5 * table[ids]).round(), image).astype(np.uint8)
                segments = [{**s, "name": names.get(s["category_id"], str(s["category_id"]))} for s in r["segments"]]
                (folder / relative).parent.mkdir(parents=True, exist_ok=True)
                things = [s for s in segments if s["isthing"]]
                outline_things(drawn, ids, things, table).save(folder / f"{relative}.png")
                Image.fromarray(ids_to_rgb(ids)).save(folder / f"{relative}.panoptic.png")
                (folder / f"{relative}.segments.json").write_text(json.dumps(segments))
                f.write(json.dumps({"path": relative, "file": r["path"], "drawn": f"{relative}.png",
                                    "panoptic": f"{relative}.panoptic.png", "segments": segments}) + "\n")

    def write_results(self, stage: str, folder: Path) -> None:
        """``{folder}/{stage}_panoptic.json`` and its PNG folder (COCO panoptic format, image ids as the data
        names them: what panopticapi's ``pq_compute`` and cityscapesScripts' ``evalPanopticSemanticLabeling``
        read), and the instance branch's COCO results ``{stage}_detections.json``. A run rewrites its own files
        each evaluation; earlier runs have their own folders."""
        metric = self.metrics[stage]
        records = [{"image_id": r["results_id"], "file_name": f"{r['results_id']}.png",
                    "panoptic_seg": read_panoptic_png(r["panoptic_png"]), "segments_info": r["segments_info"]}
                   for r in metric.images]
        path = write_panoptic(records, folder, f"{stage}_panoptic.json", self.dataset_info.categories, overwrite=True)
        write_coco_results(metric.images, folder / f"{stage}_detections.json", self.dataset_info.label_to_category_id)
        log.info("%s panoptic results of %d images written to %s", stage, len(records), path)

    # ------------------------------------------------------------------ deployment
    #: Exported after Mask R-CNN's outputs: the semantic logits, float [S + 1, H, W] (``export_wrapper``).
    extra_outputs = ("semantic",)
    # export_wrapper is DetectionHead's: one image -> boxes, labels, scores, masks and semantic, the network before
    # the merge (ONNX only); ``merge`` (``fishnet_pl.panoptic.merge_panoptic``) turns them into the panoptic map.
