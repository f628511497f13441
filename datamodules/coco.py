"""COCO detection and instance-segmentation data in the official 2017 layout, read with pycocotools.

Targets follow torchvision's detection format, so its detectors (and COCO-style evaluators) take
them as they are: contiguous labels 1..K (0 is background), xyxy boxes in pixels, images in [0, 1]
at their own size (the detector resizes and normalises).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import albumentations as A
import numpy as np
import pycocotools.mask as mask_utils
import torch
from albumentations.pytorch import ToTensorV2
from pycocotools.coco import COCO
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from datamodules.common import (
    AugmentedDataModule,
    AugmentedDataset,
    DatasetError,
    ResumableRandomSampler,
    find_images,
    is_quickstart_root,
    make_loader,
    read_rgb,
    require_dir,
    use_quickstart_data,
)
from datamodules.dataset_info import DatasetInfo
from datamodules.quickstart_detection import DETECTION_CATEGORIES, write_detection

log = logging.getLogger(__name__)
QUICKSTART_ROOT = "data/quickstart/coco"  # the demo data's folder, as configs/quickstart/detection.yaml has it


@dataclass
class CocoImage:
    """One image of a split and its usable annotations (boxes clipped to the image, degenerate ones dropped)."""

    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray  # float32 [N, 4], xyxy pixels
    labels: np.ndarray  # int64 [N], 1..K
    iscrowd: np.ndarray  # int64 [N]
    areas: np.ndarray  # float32 [N], the annotation's area (of its mask) in pixels
    segmentations: list  # N polygon lists or RLE dicts (empty without masks)

    def without_crowds(self) -> CocoImage:
        keep = self.iscrowd == 0
        segmentations = [s for s, k in zip(self.segmentations, keep) if k] if self.segmentations else []
        return CocoImage(self.image_id, self.path, self.width, self.height, self.boxes[keep], self.labels[keep],
                         self.iscrowd[keep], self.areas[keep], segmentations)


def decode_segmentation(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """Polygons, uncompressed RLE (``counts`` a list) or compressed RLE (``counts`` a string) -> uint8 [H, W]."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle)


def read_categories(annotation_file: Path) -> list[dict]:
    """The ``categories`` of a COCO annotation file, sorted by id (label = position + 1)."""
    if not annotation_file.is_file():
        raise DatasetError(f"{annotation_file}: annotation file does not exist")
    try:
        categories = json.loads(annotation_file.read_text())["categories"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DatasetError(f"{annotation_file}: not a COCO annotation file with 'categories' ({err!r})") from err
    if not categories or not all(isinstance(c, dict) and isinstance(c.get("id"), int) and "name" in c
                                 for c in categories):
        raise DatasetError(f"{annotation_file}: 'categories' must be a non-empty list of {{'id': int, 'name': ...}}")
    return sorted(categories, key=lambda c: c["id"])


def load_split(annotation_file: Path, image_dir: Path, label_of: dict[int, int], with_masks: bool) -> list[CocoImage]:
    """Every image of ``annotation_file`` with its annotations validated; fails naming the file or annotation."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            coco = COCO(str(annotation_file))
    except FileNotFoundError as err:
        raise DatasetError(f"{annotation_file}: annotation file does not exist") from err
    except (json.JSONDecodeError, AssertionError, KeyError, TypeError) as err:
        raise DatasetError(f"{annotation_file}: not a COCO annotation file ({err!r})") from err
    if set(coco.cats) != set(label_of):
        raise DatasetError(f"{annotation_file}: category ids {sorted(coco.cats)} differ from the val split's "
                           f"{sorted(label_of)}, which define the labels")
    images = {}
    for image_id, info in coco.imgs.items():
        if not all(key in info for key in ("file_name", "width", "height")):
            raise DatasetError(f"{annotation_file}: image {image_id} lacks file_name, width or height")
        images[image_id] = info
    _check_files_exist(image_dir, [info["file_name"] for info in images.values()], annotation_file)

    per_image: dict[int, list] = defaultdict(list)
    dropped = 0
    for ann in coco.anns.values():
        where = f"{annotation_file}: annotation {ann.get('id')}"
        info = images.get(ann.get("image_id"))
        if info is None:
            raise DatasetError(f"{where} refers to image {ann.get('image_id')}, which is not in 'images'")
        if ann.get("category_id") not in label_of:
            raise DatasetError(f"{where} has category_id {ann.get('category_id')}, not one of {sorted(label_of)}")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)
                and bbox[2] >= 0 and bbox[3] >= 0):
            raise DatasetError(f"{where} has bbox {bbox!r}, expected [x, y, width, height] with width, height >= 0")
        x, y, w, h = bbox
        box = [min(max(v, 0), limit) for v, limit in zip((x, y, x + w, y + h), (info["width"], info["height"]) * 2)]
        segmentation = _valid_segmentation(ann.get("segmentation"), info, where) if with_masks else None
        if box[2] <= box[0] or box[3] <= box[1] or (with_masks and not segmentation):
            dropped += 1  # zero size (or outside the image, or no polygon with 3 points): nothing to learn
            continue
        per_image[ann["image_id"]].append((box, label_of[ann["category_id"]], int(bool(ann.get("iscrowd", 0))),
                                           float(ann.get("area", w * h)), segmentation))
    if dropped:
        log.info("%s: dropped %d annotations with an empty box or mask", annotation_file, dropped)

    records = []
    for image_id, info in images.items():
        anns = per_image.get(image_id, [])
        records.append(CocoImage(
            image_id=image_id, path=image_dir / info["file_name"], width=info["width"], height=info["height"],
            boxes=np.array([a[0] for a in anns], np.float32).reshape(-1, 4),
            labels=np.array([a[1] for a in anns], np.int64), iscrowd=np.array([a[2] for a in anns], np.int64),
            areas=np.array([a[3] for a in anns], np.float32), segmentations=[a[4] for a in anns] if with_masks else [],
        ))
    return records


def _valid_segmentation(segmentation, info: dict, where: str) -> list | dict | None:
    """Polygons with at least 3 points, or an RLE of the image's size; None when no valid polygon is left."""
    if isinstance(segmentation, list):
        # COCO holds a few polygons with fewer than 3 points; pycocotools would read a 4-number one as a box.
        polygons = [p for p in segmentation if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
        return polygons or None
    if isinstance(segmentation, dict) and "counts" in segmentation:
        if list(segmentation.get("size", ())) != [info["height"], info["width"]]:
            raise DatasetError(f"{where} has an RLE of size {segmentation.get('size')}, but its image is "
                               f"{info['height']}x{info['width']} (height x width)")
        return segmentation
    raise DatasetError(f"{where} has a segmentation that is neither polygons nor RLE: {str(segmentation)[:80]}")


def _check_files_exist(image_dir: Path, file_names: list[str], annotation_file: Path) -> None:
    """Fail at setup, not in a worker mid-epoch, when an image of the json is not on disk."""
    present = {p.name for p in image_dir.iterdir()}
    missing = [n for n in file_names if n not in present and not (image_dir / n).is_file()]
    if missing:
        shown = ", ".join(str(image_dir / n) for n in missing[:3])
        raise DatasetError(f"{len(missing)} image(s) listed in {annotation_file} do not exist: {shown}"
                           + (", ..." if len(missing) > 3 else ""))


def train_transform(scale_range: tuple[float, float], flip_prob: float) -> A.Compose:
    """Flip, scale jitter around the image's own size and mild colour jitter; boxes and masks follow."""
    low, high = scale_range
    return A.Compose([
        A.HorizontalFlip(p=flip_prob),
        A.RandomScale(scale_limit=(low - 1, high - 1), p=1.0 if (low, high) != (1, 1) else 0.0),
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5),
        A.ToFloat(max_value=255),
        ToTensorV2(),
    ], bbox_params=A.BboxParams(format="pascal_voc", label_fields=["ann_index"]))


def eval_transform() -> A.Compose:
    return A.Compose([A.ToFloat(max_value=255), ToTensorV2()])


class CocoDataset(AugmentedDataset):
    """COCO images with torchvision detection targets; ``with_masks`` adds uint8 [N, H, W] instance masks."""

    def __init__(self, images: list[CocoImage], transform: A.Compose, with_masks: bool):
        self.images, self.transform, self.with_masks = images, transform, with_masks

    def __len__(self) -> int:
        return len(self.images)

    @property
    def group_ids(self) -> list[int]:
        """0 for wide (or square) images, 1 for tall ones, from the json's sizes (no image is decoded)."""
        return [int(record.width < record.height) for record in self.images]

    def __getitem__(self, index: int) -> dict:
        record = self.images[index]
        return {**detection_sample(record, read_rgb(record.path), self.transform, self.with_masks),
                "path": str(record.path)}


def detection_sample(record: CocoImage, image: np.ndarray, transform: A.Compose, with_masks: bool) -> dict:
    """``{"image", "target"}`` of one decoded image (uint8 [H, W, 3]) and its record, through ``transform``.

    Shared by ``CocoDataset`` and the LitData shards' ``datamodules.streaming.StreamingCocoDataset``.
    """
    if image.shape[:2] != (record.height, record.width):
        raise DatasetError(f"{record.path}: image is {image.shape[0]}x{image.shape[1]} (height x width), "
                           f"its annotations say {record.height}x{record.width}")
    masks = [decode_segmentation(s, record.height, record.width) for s in record.segmentations]
    out = transform(image=image, masks=masks, bboxes=record.boxes, ann_index=np.arange(len(record.boxes)))
    image = out["image"]
    # Boxes may vanish in a transform; the surviving annotation indices select labels and masks alike.
    boxes = torch.as_tensor(np.asarray(out["bboxes"], np.float32).reshape(-1, 4))
    keep = torch.as_tensor(np.asarray(out["ann_index"], np.int64))
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes, keep = boxes[valid], keep[valid]
    scale = image.shape[1] * image.shape[2] / (record.height * record.width)
    target = {
        "boxes": boxes,
        "labels": torch.from_numpy(record.labels)[keep],
        "image_id": record.image_id,
        "iscrowd": torch.from_numpy(record.iscrowd)[keep],
        "area": torch.from_numpy(record.areas)[keep] * scale,
    }
    if with_masks:
        masks = out["masks"]  # ToTensorV2 made each uint8 [H, W] mask a tensor
        masks = torch.stack(masks) if len(masks) else torch.zeros((0, *image.shape[1:]), dtype=torch.uint8)
        target["masks"] = masks[keep]
    return {"image": image, "target": target}


class PredictDataset(AugmentedDataset):
    """Images only, with their COCO id where known."""

    def __init__(self, samples: list[tuple[Path, int | None]], transform: A.Compose):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        path, image_id = self.samples[index]
        item = {"image": self.transform(image=read_rgb(path))["image"], "path": str(path)}
        if image_id is not None:
            item["image_id"] = image_id
        return item


def collate_detection(items: list[dict]) -> dict:
    """The items' keys, each holding a list, not a stacked tensor: detection images differ in size and targets
    in length."""
    keys = [key for key in ("image", "target", "path", "image_id") if all(key in item for item in items)]
    return {key: [item[key] for item in items] for key in keys}


class GroupedBatchSampler(BatchSampler):
    """Batches whose images share a group (wide or tall), so padding them to one size wastes little.

    As torchvision's detection references' sampler, the epoch has ``len(sampler) // batch_size``
    batches whatever the group sizes (so every DDP rank runs the same number of steps); the last
    batch of a group is completed with repeats of that group's images from this epoch. With
    ``drop_last=False`` (Lightning sets it when predicting) every index comes exactly once and
    only the final batches may mix groups. A ``BatchSampler`` with a ``sampler`` argument, so
    Lightning can re-create it around a ``DistributedSampler`` under DDP.

    ``Stateful`` for torchdata's ``StatefulDataLoader``: ``state_dict`` holds the batches of this epoch given
    so far and the sampler's state (a ``ResumableRandomSampler``'s epoch seed; a ``DistributedSampler``'s
    order follows from its epoch), so a resumed run continues the same epoch with the same batches.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool, group_ids: list[int]):
        super().__init__(sampler, batch_size, drop_last)
        self.group_ids = list(group_ids)
        self.yielded, self._skip = 0, 0

    def state_dict(self) -> dict:
        sampler = self.sampler.state_dict() if hasattr(self.sampler, "state_dict") else None
        return {"yielded": self.yielded, "sampler": sampler}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict["sampler"] is not None:
            self.sampler.load_state_dict(state_dict["sampler"])
        self._skip = state_dict["yielded"]

    def __iter__(self):
        # The restored place and the sampler's restored seed are taken when the loader makes its iterator, as
        # torchdata's own BatchSampler does, not at its first batch: an iterator made and never used must not hand
        # them on to the next one.
        skip, self._skip, self.yielded = self._skip, 0, 0
        return self._skipping(self._batches(iter(self.sampler)), skip)

    def _skipping(self, batches, skip: int):
        for batch in batches:
            self.yielded += 1
            if self.yielded > skip:
                yield batch

    def _batches(self, indices):
        buffers, seen, count = defaultdict(list), defaultdict(list), 0
        for index in indices:
            group = self.group_ids[index]
            buffers[group].append(index)
            seen[group].append(index)
            if len(buffers[group]) == self.batch_size:
                yield buffers.pop(group)
                count += 1
        leftovers = sorted(buffers.items(), key=lambda item: -len(item[1]))
        if not self.drop_last:
            rest = [index for _, batch in leftovers for index in batch]
            yield from (rest[i:i + self.batch_size] for i in range(0, len(rest), self.batch_size))
            return
        for group, batch in leftovers[:len(self) - count]:
            yield batch + list(itertools.islice(itertools.cycle(seen[group]), self.batch_size - len(batch)))


def check_augmentation(batch_size: int, num_workers: int | None, scale_range, flip_prob: float) -> None:
    """The loading and augmentation arguments of a COCO datamodule (folders or shards), or a ValueError."""
    if batch_size < 1 or (num_workers is not None and num_workers < 0):
        raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
    if not 0 < scale_range[0] <= scale_range[1]:
        raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}")
    if not 0 <= flip_prob <= 1:
        raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")


class CategoryLabels:
    """Labels of a COCO set's ``categories`` (sorted by id): label k (1..K, 0 is background) is the k-th."""

    categories: list[dict]
    batch_size: int

    @property
    def num_classes(self) -> int:
        """K object categories, background excluded."""
        return len(self.categories)

    @property
    def class_names(self) -> list[str]:
        """Category names; index = label - 1."""
        return [c["name"] for c in self.categories]

    @property
    def label_to_category_id(self) -> dict[int, int]:
        """Contiguous label 1..K -> COCO category id."""
        return {label: c["id"] for label, c in enumerate(self.categories, 1)}

    @property
    def category_id_to_label(self) -> dict[int, int]:
        return {c["id"]: label for label, c in enumerate(self.categories, 1)}

    @property
    def dataset_info(self) -> DatasetInfo:
        """Category names and ids (``DatasetInfo``; checkpoints keep it); images go in as they are (the detector
        resizes them itself)."""
        return DatasetInfo(class_names=self.class_names, label_to_category_id=self.label_to_category_id,
                           predict={"transform": "datamodules.coco.eval_transform", "batch_size": self.batch_size,
                                    "collate": "datamodules.coco.collate_detection"})


class AspectRatioBatches:
    """Training batches of wide or of tall images (``GroupedBatchSampler``) when ``group_aspect_ratio``, and the
    predict dataset of a folder or of the val split's images (a mixin before the datamodule base, for the COCO
    datamodules: their training datasets give ``group_ids``, their ``_split`` records ``path`` and ``image_id``)."""

    def loader(self, dataset: Dataset, train: bool) -> DataLoader:
        if train and self.group_aspect_ratio:  # batches of wide or of tall images
            sampler = GroupedBatchSampler(ResumableRandomSampler(dataset), self.batch_size, True, dataset.group_ids)
            return make_loader(dataset, batch_sampler=sampler, collate_fn=collate_detection,
                               num_workers=self.workers, pin_memory=self.pin_memory)
        return super().loader(dataset, train)

    def predict_dataset(self) -> PredictDataset:
        """Every image under ``predict_root``, else the val split's images with their COCO ids."""
        if self.predict_root:
            samples = [(path, None) for path in find_images(self.predict_root)]
        else:
            samples = [(record.path, record.image_id) for record in self._split(self.val_split)]
        return PredictDataset(samples, eval_transform())


class COCODataModule(CategoryLabels, AspectRatioBatches, AugmentedDataModule):
    """COCO 2017 detection / instance segmentation in the official layout, for torchvision-style detectors.

    Batches are ``{"image": [float32 [3, H, W] in 0..1], "target": [dict], "path": [str]}``; a target
    holds ``boxes`` (float32 [N, 4] xyxy pixels), ``labels`` (int64 [N], 1..K), ``masks`` (uint8
    [N, H, W], with ``with_masks``), ``image_id`` (the COCO id), ``iscrowd`` (int64 [N]) and ``area``
    (float32 [N]). Training targets hold no crowd regions, and images without any other annotation
    are left out of training; evaluation keeps both (crowds with ``iscrowd`` 1, for the evaluator to
    ignore). Predict batches hold ``image``, ``path`` and, for the val split, ``image_id``.
    Labels are the categories sorted by COCO id; ``label_to_category_id`` maps them back.

    Args:
        root: dataset folder holding ``<split>/*.jpg`` and ``annotations/instances_<split>.json``.
        train_split: training split name (images folder and annotation file suffix).
        val_split: validation split; its annotation file defines the categories.
        test_split: split evaluated by ``test``.
        batch_size: images per device and step.
        num_workers: data-loading processes per device; None: the machine's share (``default_num_workers``).
        with_masks: add instance masks to the targets (for Mask R-CNN).
        scale_range: training scale jitter, relative to each image's own size (the detector itself
            resizes to its min/max size).
        flip_prob: probability of a horizontal flip in training.
        group_aspect_ratio: batch wide and tall training images separately.
        quickstart: train on the built-in demo shapes (COCO layout), written on first use into ``root``
            when ``root`` is the quickstart folder ``data/quickstart/coco``; another ``root`` is read as it
            is, and must hold a dataset.
        predict_root: folder of images to predict (searched recursively); default: the val split.
        pin_memory: pin batches in page-locked memory for faster GPU copies.
    """

    collate_fn = staticmethod(collate_detection)

    def __init__(self, root: str, train_split: str = "train2017", val_split: str = "val2017",
                 test_split: str = "val2017", batch_size: int = 2, num_workers: int | None = None,
                 with_masks: bool = True,
                 scale_range: tuple[float, float] = (0.8, 1.2), flip_prob: float = 0.5,
                 group_aspect_ratio: bool = True, quickstart: bool = False, predict_root: str | None = None,
                 pin_memory: bool = True):
        super().__init__()
        check_augmentation(batch_size, num_workers, scale_range, flip_prob)
        self.root, self.batch_size, self.num_workers = Path(root).absolute(), batch_size, num_workers
        self.train_split, self.val_split, self.test_split = train_split, val_split, test_split
        self.with_masks, self.scale_range, self.flip_prob = with_masks, tuple(scale_range), flip_prob
        self.group_aspect_ratio, self.quickstart, self.pin_memory = group_aspect_ratio, quickstart, pin_memory
        self.predict_root = predict_root
        self.datasets: dict[str, Dataset] = {}
        self.skipped_train_image_ids: list[int] = []  # training images with no usable annotation (set by setup)
        self._splits: dict[str, list[CocoImage]] = {}

    def annotation_file(self, split: str) -> Path:
        return self.root / "annotations" / f"instances_{split}.json"

    @property
    def val_annotation_file(self) -> str:
        """The val split's annotation file, for a COCO evaluator."""
        return str(self.annotation_file(self.val_split))

    def _uses_quickstart_data(self) -> bool:
        annotations = self.annotation_file(self.val_split)
        return self.quickstart and is_quickstart_root(self.root, QUICKSTART_ROOT, annotations.is_file(),
                                                      f"{annotations.relative_to(self.root)} and <split>/ images")

    @cached_property
    def categories(self) -> list[dict]:
        """The val split's categories sorted by id (only its json is read: cheap, no image is touched)."""
        if self._uses_quickstart_data() and not Path(self.val_annotation_file).is_file():
            return list(DETECTION_CATEGORIES)  # prepare_data has not written them yet
        return read_categories(Path(self.val_annotation_file))

    def prepare_data(self) -> None:
        if self._uses_quickstart_data():
            use_quickstart_data(self.root, write_detection)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            images = [record.without_crowds() for record in self._split(self.train_split)]
            kept = [record for record in images if len(record.boxes)]
            self.skipped_train_image_ids = [record.image_id for record in images if not len(record.boxes)]
            if self.skipped_train_image_ids:
                log.warning("%s: %d of %d images have no usable (non-crowd) annotation and are left out of "
                            "training", self.annotation_file(self.train_split), len(self.skipped_train_image_ids),
                            len(images))
            if len(kept) < self.batch_size:
                raise DatasetError(f"{self.annotation_file(self.train_split)}: {len(kept)} training images with "
                                   f"annotations, fewer than one batch of {self.batch_size}")
            transform = train_transform(self.scale_range, self.flip_prob)
            self.datasets["train"] = CocoDataset(kept, transform, self.with_masks)
            # Used as is with num_workers=0 (workers reseed their copy): seeded by the run, no RNG drawn.
            self.datasets["train"].reseed(torch.initial_seed() % 2**32)
        if stage in ("fit", "validate"):
            self.datasets["val"] = CocoDataset(self._split(self.val_split), eval_transform(), self.with_masks)
        if stage == "test":
            self.datasets["test"] = CocoDataset(self._split(self.test_split), eval_transform(), self.with_masks)
        if stage == "predict":
            self.datasets["predict"] = self.predict_dataset()

    def _split(self, split: str) -> list[CocoImage]:
        """The split's images and validated annotations, loaded once (COCO's train json takes a while)."""
        if split not in self._splits:
            image_dir = require_dir(require_dir(self.root, "dataset root") / split, f"{split} images")
            self._splits[split] = load_split(self.annotation_file(split), image_dir, self.category_id_to_label,
                                             self.with_masks)
        return self._splits[split]
