"""What every panoptic dataset shares: the labels of its categories and the targets of an image from its segments.

A panoptic ground truth is a segment id map (0 = void) with a list of segments ``{"id", "category_id",
"iscrowd"}`` over COCO-panoptic-style categories ``{"id", "name", "isthing", "color"}``, as COCO's panoptic
annotations and cityscapesScripts' ``createPanopticImgs`` give it. Panoptic FPN (Mask R-CNN on the things, a
semantic FPN branch on the stuff) learns from targets derived from it, with labels in the categories' order:

- thing label k (1..T) is the k-th thing category (torchvision's detection labels; 0 is the background);
- semantic class s (1..S) is the s-th stuff category, 0 (``THINGS``) any thing pixel, crowd regions included, and
  255 (``IGNORE_INDEX``) void: Detectron2's panoptic-separated convention.
"""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import numpy as np
import torch
from torchvision.ops import masks_to_boxes

from datamodules.common import DatasetError
from datamodules.segmentation import IGNORE_INDEX

THINGS = 0  # the semantic class of every thing pixel


def thing_labels(categories: Sequence[dict]) -> dict[int, int]:
    """Category id -> detection label 1..T of the thing categories, in their order."""
    return {c["id"]: k for k, c in enumerate((c for c in categories if c["isthing"]), 1)}


def stuff_classes(categories: Sequence[dict]) -> dict[int, int]:
    """Category id -> semantic class 1..S of the stuff categories, in their order (0 is ``THINGS``)."""
    return {c["id"]: s for s, c in enumerate((c for c in categories if not c["isthing"]), 1)}


class PanopticLabels:
    """What a panoptic datamodule's ``categories`` give (a mixin): the stuff count and the thing labels' ids."""

    categories: list[dict]

    @property
    def num_stuff_classes(self) -> int:
        """S stuff categories, semantic classes 1..S of panoptic targets (0 is any thing)."""
        return len(stuff_classes(self.categories))

    @property
    def label_to_category_id(self) -> dict[int, int]:
        """Thing label 1..T -> its category id."""
        return {label: category_id for category_id, label in thing_labels(self.categories).items()}


def panoptic_target(segment_ids: np.ndarray, segments: Sequence[dict], categories: Sequence[dict], *, image_id: int,
                    crowds: bool, semantic: bool, panoptic: bool, source: str) -> dict:
    """The target of one image, in torchvision's detection format plus what Panoptic FPN and its evaluation read.

    Args:
        segment_ids: int [H, W] segment id of each pixel, 0 = void.
        segments: ``{"id", "category_id", "iscrowd"}`` of each segment id of the map (more entries are allowed).
        categories: the dataset's categories, in label order (``thing_labels``, ``stuff_classes``).
        image_id: the image's key (a dataset index, so that DDP evaluation counts each image once).
        crowds: keep crowd thing segments as instances with ``iscrowd`` 1 (evaluation); training leaves them out.
        semantic: add ``semantic``.
        panoptic: add the ground truth itself, ``panoptic`` and ``segments`` (for panoptic quality).
        source: the file the segments come from, named in errors.

    Returns:
        ``{"boxes": float32 [N, 4] xyxy pixels (of the mask's pixel edges), "labels": int64 [N] (1..T), "masks":
        uint8 [N, H, W], "iscrowd": int64 [N], "area": float32 [N] (mask pixels), "image_id": int}``, one instance
        per thing segment with pixels, plus ``"semantic": int64 [H, W]`` (0 things, 1..S stuff, 255 void) and
        ``"panoptic": int64 [H, W]`` (the segment ids), ``"segments": [{"id", "category_id", "iscrowd"}]``.
    """
    things, stuff = thing_labels(categories), stuff_classes(categories)
    by_id = {int(s["id"]): s for s in segments}
    ids, inverse = np.unique(segment_ids, return_inverse=True)
    inverse = inverse.reshape(segment_ids.shape)
    semantic_of = np.full(len(ids), IGNORE_INDEX, np.int64)  # per position in ids
    instances = []  # (position in ids, label, iscrowd)
    for index, segment_id in enumerate(ids.tolist()):
        if segment_id == 0:
            continue
        if segment_id not in by_id:
            raise DatasetError(f"{source}: segment id {segment_id} has pixels but no entry in the segments list")
        category, iscrowd = by_id[segment_id]["category_id"], int(bool(by_id[segment_id].get("iscrowd", 0)))
        if category in things:
            semantic_of[index] = THINGS
            if crowds or not iscrowd:
                instances.append((index, things[category], iscrowd))
        elif category in stuff:
            semantic_of[index] = stuff[category]
        else:
            raise DatasetError(f"{source}: segment {segment_id} has category_id {category}, not one of "
                               f"{[c['id'] for c in categories]}")
    positions = np.array([index for index, _, _ in instances], np.int64)
    masks = torch.from_numpy(inverse[None] == positions[:, None, None]).to(torch.uint8)
    boxes = masks_to_boxes(masks).reshape(-1, 4)
    boxes[:, 2:] += 1  # the last pixel's far edge: a one-pixel mask has a one-pixel box
    target = {
        "boxes": boxes,
        "labels": torch.tensor([label for _, label, _ in instances], dtype=torch.int64),
        "masks": masks,
        "iscrowd": torch.tensor([iscrowd for _, _, iscrowd in instances], dtype=torch.int64),
        "area": masks.sum((1, 2), dtype=torch.float32),
        "image_id": int(image_id),
    }
    if semantic:
        target["semantic"] = torch.from_numpy(semantic_of[inverse])
    if panoptic:
        target["panoptic"] = torch.from_numpy(segment_ids.astype(np.int64))
        target["segments"] = [{"id": int(s["id"]), "category_id": int(s["category_id"]),
                               "iscrowd": int(bool(s.get("iscrowd", 0)))} for s in segments]
    return target


def panoptic_sample(image: np.ndarray, segment_ids: np.ndarray, segments: Sequence[dict],
                    categories: Sequence[dict], transform: A.Compose, **target_options) -> dict:
    """``{"image", "target"}`` of a decoded image (uint8 [H, W, 3]) and its segment id map through ``transform``
    (``datamodules.coco``'s ``train_transform`` or ``eval_transform``): the map follows the image (nearest), so
    masks, boxes and the semantic map, all derived from it afterwards, agree with the image and each other.
    ``target_options`` are ``panoptic_target``'s keyword arguments (``source`` names the segments' file)."""
    if segment_ids.shape != image.shape[:2]:
        raise DatasetError(f"{target_options['source']}: segments are {segment_ids.shape[0]}x{segment_ids.shape[1]} "
                           f"(height x width), the image is {image.shape[0]}x{image.shape[1]}")
    # int32 is what OpenCV resizes (nearest) and holds any panoptic id (< 256**3); no boxes go in, but a
    # transform with bbox_params needs the (empty) fields.
    out = transform(image=image, mask=segment_ids.astype(np.int32), bboxes=np.zeros((0, 4), np.float32),
                    ann_index=np.zeros(0, np.int64))
    mask = out["mask"]
    mask = mask.numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    return {"image": out["image"], "target": panoptic_target(mask, segments, categories, **target_options)}
