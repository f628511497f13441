"""Cityscapes in the official layout: semantic segmentation with the 19 training classes, or instance and panoptic
segmentation with the benchmark's 8 thing and 11 stuff classes.

Images are ``leftImg8bit/<split>/<city>/<name>_leftImg8bit.png``; their fine labels are
``gtFine/<split>/<city>/<name>_gtFine_labelIds.png`` for semantic segmentation: label ids 0..33 become train ids
0..18 through the cityscapesscripts table (``cityscapes_labels``), every other class becomes 255, the ignore index.
Instance and panoptic targets come from ``<name>_gtFine_instanceIds.png`` beside them (label id * 1000 + instance
index on objects, the bare label id elsewhere), read as cityscapesScripts' ``createPanopticImgs`` reads it
(``read_panoptic``) and turned into targets by ``datamodules.panoptic``. The ``_color`` and ``_polygons.json`` files
are not read. Images come out as float32 in [0, 1], not normalised: the model normalises with its backbone's timm
``pretrained_cfg``.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import albumentations as A
import numpy as np
import torch

from datamodules import coco
from datamodules.cityscapes_labels import (
    CLASS_NAMES,
    HAS_INSTANCES,
    LABEL_ID_TO_TRAIN_ID,
    LABELS,
    PALETTE,
    PANOPTIC_CATEGORIES,
)
from datamodules.common import (
    AugmentedDataset,
    DatasetError,
    collate_padded,
    find_images,
    is_quickstart_root,
    read_label_png,
    read_rgb,
    require_dir,
    use_quickstart_data,
)
from datamodules.dataset_info import DatasetInfo
from datamodules.panoptic import PanopticLabels, panoptic_sample
from datamodules.quickstart_segmentation import write_cityscapes

# Shared with every segmentation datamodule: Cityscapes differs only in how it finds pairs and maps label ids.
from datamodules.segmentation import (
    IGNORE_INDEX,
    SegmentationDataModule,
    SegmentationDataset,
    check_augmentation,
    check_no_missing_labels,
)

log = logging.getLogger(__name__)
QUICKSTART_ROOT = "data/quickstart/cityscapes"  # the demo data's folder, as configs/quickstart/segmentation.yaml has it
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
INSTANCE_SUFFIX = "_gtFine_instanceIds.png"
TARGETS = ("semantic", "instance", "panoptic")
# Per label id: a panoptic category (createPanopticImgs keeps the classes not ignoreInEval, i.e. with a train id).
_EVALUATED = LABEL_ID_TO_TRAIN_ID != IGNORE_INDEX
# Per label id (value // 1000, clipped): an evaluated thing class, whose objects are detection targets.
_OBJECT_CLASS = np.array([_EVALUATED[i] and i in HAS_INSTANCES for i in range(len(LABELS))] + [False])

def read_train_ids(path: str | os.PathLike) -> np.ndarray:
    """Decode a ``*_gtFine_labelIds.png`` as uint8 ``[H, W]`` train ids (0..18, 255 = ignore)."""
    ids = read_label_png(path)
    outside = (ids < 0) | (ids >= len(LABELS))
    if outside.any():
        shown = np.unique(ids[outside])[:5].tolist()
        raise DatasetError(f"{path}: label ids {shown} outside 0..{len(LABELS) - 1}; expected the official "
                           f"*{LABEL_SUFFIX} (not the trainIds, instanceIds or color images)")
    return LABEL_ID_TO_TRAIN_ID[ids]


def read_panoptic(path: str | os.PathLike) -> tuple[np.ndarray, list[dict]]:
    """The panoptic ground truth of a ``*_gtFine_instanceIds.png``, exactly as ``createPanopticImgs`` builds it.

    Returns:
        int64 [H, W] segment ids (the file's values; 0, void, where the class is not evaluated: unlabelled, the
        ignored classes, caravan and trailer) and its segments ``{"id", "category_id" (the label id), "iscrowd"}``:
        one per object, one per stuff class present, and on a thing class the pixels without instance index (a
        group of objects) one crowd segment.
    """
    ids = read_label_png(path)
    values = np.unique(ids)
    bare = values[values < 1000]
    outside = bare[(bare < 0) | (bare >= len(LABELS))]
    if outside.size:
        raise DatasetError(f"{path}: label ids {outside[:5].tolist()} outside 0..{len(LABELS) - 1}; expected the "
                           f"official *{INSTANCE_SUFFIX} (label id * 1000 + instance index on objects, the label id "
                           "elsewhere)")
    label_ids = np.where(values < 1000, values, values // 1000)
    unknown = values[label_ids >= len(LABELS)]
    if unknown.size:
        raise DatasetError(f"{path}: instance ids {unknown[:5].tolist()} have label id part "
                           f"{(unknown[:5] // 1000).tolist()} (value // 1000), not a Cityscapes label id "
                           f"0..{len(LABELS) - 1}; expected the official *{INSTANCE_SUFFIX}")
    evaluated = _EVALUATED[label_ids]
    segments = [{"id": int(value), "category_id": int(label_id),
                 "iscrowd": int(value < 1000 and label_id in HAS_INSTANCES)}
                for value, label_id in zip(values[evaluated], label_ids[evaluated])]
    segment_ids = np.where(_EVALUATED[np.where(ids < 1000, ids, ids // 1000)], ids, 0)
    return segment_ids, segments


def has_objects(path: str | os.PathLike) -> bool:
    """Whether a ``*_gtFine_instanceIds.png`` holds an object (not a crowd) of an evaluated thing class: a quick
    look (no validation; ``read_panoptic`` checks the file when it is loaded)."""
    ids = read_label_png(path)
    return bool(_OBJECT_CLASS[np.clip(ids // 1000, 0, len(LABELS))].any())


def find_samples(root: Path, split: str, with_labels: bool = True,
                 label_suffix: str = LABEL_SUFFIX) -> list[tuple[Path, Path | None]]:
    """(image, label file) pairs of a split, sorted; every label file must exist (contents are checked on load).

    ``label_suffix``: ``LABEL_SUFFIX`` (labelIds, semantic targets) or ``INSTANCE_SUFFIX`` (instanceIds).
    """
    images_dir = require_dir(require_dir(root, "dataset root") / "leftImg8bit", "leftImg8bit images")
    images_dir = require_dir(images_dir / split, f"{split} split images")
    images = sorted(images_dir.glob(f"*/*{IMAGE_SUFFIX}"))
    if not images:
        raise DatasetError(f"{images_dir}: no <city>/*{IMAGE_SUFFIX} images")
    if not with_labels:
        return [(path, None) for path in images]
    labels_dir = require_dir(require_dir(root / "gtFine", "gtFine labels") / split, f"{split} split labels")
    samples = [(path, labels_dir / path.parent.name / (path.name[:-len(IMAGE_SUFFIX)] + label_suffix))
               for path in images]
    missing = [(image, label) for image, label in samples if not label.is_file()]
    if missing and label_suffix == INSTANCE_SUFFIX:
        (image, label), more = missing[0], len(missing) - 1
        raise DatasetError(f"{label}: instance ids of {image.name} do not exist" + (f" (nor those of {more} more "
                           "images)" if more else "") + f"; targets instance and panoptic read the *{INSTANCE_SUFFIX} "
                           "files of gtFine (targets semantic reads only the labelIds)")
    check_no_missing_labels(missing)
    return samples


class CityscapesPanopticDataset(AugmentedDataset):
    """(image, instanceIds file) pairs with instance or panoptic targets (``datamodules.panoptic.panoptic_target``),
    through ``datamodules.coco``'s detection transforms; ``image_id`` is the dataset index."""

    def __init__(self, samples: list[tuple[Path, Path]], transform: A.Compose, *, crowds: bool, semantic: bool,
                 panoptic: bool):
        self.samples, self.transform = samples, transform
        self.options = {"crowds": crowds, "semantic": semantic, "panoptic": panoptic}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        image_path, ids_path = self.samples[index]
        segment_ids, segments = read_panoptic(ids_path)
        sample = panoptic_sample(read_rgb(image_path), segment_ids, segments, PANOPTIC_CATEGORIES, self.transform,
                                 image_id=index, source=f"{ids_path} (image {image_path.name})", **self.options)
        # Written results name the image as cityscapesScripts' ground truth does: <city>_<sequence>_<frame>.
        sample["target"]["results_id"] = image_path.name.removesuffix(IMAGE_SUFFIX)
        return {**sample, "path": str(image_path)}


class CityscapesDataModule(PanopticLabels, SegmentationDataModule):
    """Cityscapes fine annotations in the official layout: semantic (19 classes, with the usual segmentation
    augmentation), instance or panoptic segmentation targets (8 thing and 11 stuff classes, for detectors).

    With ``targets="semantic"``, batches are ``{"image": float32 [B, 3, H, W] in [0, 1], "mask": int64 [B, H, W]
    (train ids 0..18, 255 = ignore), "path": [str], "index": int64 [B] (dataset indices, so that under DDP
    evaluation counts each image once), "size": int64 [B, 2] (each image's height and width)}``; predict
    batches have no ``mask``. Training images are randomly scaled, padded (image 0, i.e. black; mask 255) to
    the crop if smaller, cropped to ``crop_size``, flipped and colour-jittered. Evaluation images keep their
    full size (or are resized by ``eval_scale``), uncropped (all Cityscapes images are 1024x2048; a batch of
    images of other sizes is padded to its largest, ``collate_padded``).

    With ``targets="instance"`` or ``"panoptic"``, batches are COCO's (``datamodules.coco.collate_detection``):
    ``{"image": [float32 [3, H, W] in [0, 1]], "target": [dict], "path": [str]}``, a target as
    ``datamodules.panoptic.panoptic_target`` makes it: ``boxes``, ``labels`` (1..8, the thing ``categories`` in
    order: person, rider, car, truck, bus, train, motorcycle, bicycle), ``masks``, ``iscrowd``, ``area`` and
    ``image_id`` (the dataset index); for "panoptic" also ``semantic`` (0 things, 1..11 the stuff categories road
    .. sky, 255 void) and, in evaluation, the ground truth ``panoptic`` and ``segments`` as cityscapesScripts'
    ``createPanopticImgs`` builds it (category ids = Cityscapes label ids). Training images are flipped and
    scaled by ``scale_range`` (COCO's ``train_transform``; the detector resizes them itself), their targets hold
    no crowd (a group of objects), and for "instance" images without any object are left out
    (``skipped_train_images``). Evaluation images are as they are, crowds included with ``iscrowd`` 1.
    ``crop_size``, ``color_jitter`` and ``eval_scale`` apply to "semantic" only.

    Args:
        root: dataset folder holding ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` and
            ``gtFine/<split>/<city>/*_gtFine_labelIds.png`` (``*_gtFine_instanceIds.png`` for instance and
            panoptic targets).
        batch_size: training crops (images, for instance and panoptic targets) per device and step.
        num_workers: data-loading processes per device; None: the machine's share (``default_num_workers``).
        crop_size: training crop (height, width) in pixels.
        scale_range: training scale jitter (low, high), relative to the image's own size.
        flip_prob: probability of a horizontal flip in training.
        color_jitter: brightness, contrast and saturation jitter in training (a factor in
            1 +- color_jitter); 0 disables it.
        eval_scale: resize factor of validation, test and predict images (and labels, nearest);
            1.0 keeps the full 1024x2048 resolution.
        val_batch_size: images per device and step in validation, test and predict.
        test_split: split evaluated by ``test``; the official test labels are withheld (its
            label files are placeholders), hence ``val`` by default.
        quickstart: train on the built-in demo street scenes (official layout), written on first use
            into ``root`` when ``root`` is the quickstart folder ``data/quickstart/cityscapes``; another
            ``root`` is read as it is, and must hold a dataset.
        predict_root: folder of images to predict (searched recursively, ``find_images``); default:
            the images of the ``test`` split.
        pin_memory: pin batches in page-locked memory for faster GPU copies.
        targets: "semantic" (train ids per pixel, for segmentation), "instance" (objects, for Mask R-CNN) or
            "panoptic" (objects and the semantic map, for Panoptic FPN).
    """

    def __init__(self, root: str, batch_size: int = 2, num_workers: int | None = None,
                 crop_size: tuple[int, int] = (512, 1024), scale_range: tuple[float, float] = (0.5, 2.0),
                 flip_prob: float = 0.5, color_jitter: float = 0.2, eval_scale: float = 1.0, val_batch_size: int = 1,
                 test_split: str = "val", quickstart: bool = False, predict_root: str | None = None,
                 pin_memory: bool = True, targets: Literal["semantic", "instance", "panoptic"] = "semantic"):
        super().__init__()
        check_augmentation(batch_size, val_batch_size, num_workers, crop_size, scale_range, flip_prob, color_jitter,
                           eval_scale)
        if targets not in TARGETS:
            raise ValueError(f"targets must be one of {', '.join(TARGETS)}, got {targets!r}")
        if targets != "semantic" and eval_scale != 1:
            raise ValueError(f"eval_scale {eval_scale} applies to targets semantic only: with targets {targets}, "
                             "evaluation images go in as they are (the detector resizes them itself)")
        self.root, self.batch_size, self.num_workers = Path(root).absolute(), batch_size, num_workers
        self.crop_size, self.scale_range = tuple(crop_size), tuple(scale_range)
        self.flip_prob, self.color_jitter, self.eval_scale = flip_prob, color_jitter, eval_scale
        self.val_batch_size, self.test_split, self.quickstart = val_batch_size, test_split, quickstart
        self.predict_root, self.pin_memory, self.targets = predict_root, pin_memory, targets
        self.datasets: dict[str, SegmentationDataset | CityscapesPanopticDataset] = {}
        self.skipped_train_images: list[Path] = []  # targets instance: training images without objects (setup)

    @property
    def num_classes(self) -> int:
        """19 train ids, or 8 thing classes for instance and panoptic targets; known before any file is read (the
        CLI links it to the model)."""
        return len(self.class_names)

    @property
    def class_names(self) -> list[str]:
        """Class names; index = train id, or label - 1 for instance and panoptic targets (the thing classes)."""
        if self.targets == "semantic":
            return list(CLASS_NAMES)
        return [c["name"] for c in self.categories if c["isthing"]]

    @property
    def categories(self) -> list[dict]:
        """The panoptic benchmark's 19 categories ``{"id" (label id), "name", "isthing", "color"}`` by id: 11 stuff
        classes, road .. sky, and 8 thing classes, person .. bicycle (``datamodules.panoptic`` labels them)."""
        return [{**c, "color": list(c["color"])} for c in PANOPTIC_CATEGORIES]

    @property
    def palette(self) -> list[tuple[int, int, int]]:
        """RGB colour of each train id (the official colour coding), for predicted masks."""
        return list(PALETTE)

    @property
    def collate_fn(self):
        """Semantic batches are stacked (evaluation images padded); detection batches are lists."""
        return collate_padded if self.targets == "semantic" else coco.collate_detection

    @property
    def dataset_info(self) -> DatasetInfo:
        if self.targets == "semantic":
            return super().dataset_info
        return DatasetInfo(class_names=self.class_names, label_to_category_id=self.label_to_category_id,
                           ignore_index=IGNORE_INDEX if self.targets == "panoptic" else None,
                           categories=self.categories, benchmark="cityscapes",
                           predict={"transform": "datamodules.coco.eval_transform", "batch_size": self.val_batch_size,
                                    "collate": "datamodules.coco.collate_detection"})

    def prepare_data(self) -> None:
        if self.quickstart and is_quickstart_root(self.root, QUICKSTART_ROOT, (self.root / "leftImg8bit").is_dir(),
                                                  f"leftImg8bit/ and gtFine/ with <split>/<city>/*{IMAGE_SUFFIX}"):
            use_quickstart_data(self.root, write_cityscapes)

    def samples(self, split: str, with_labels: bool = True) -> list[tuple[Path, Path | None]]:
        # test evaluates test_split (the official test labels are withheld); predict reads the test images
        return find_samples(self.root, self.test_split if split == "test" and with_labels else split, with_labels,
                            LABEL_SUFFIX if self.targets == "semantic" else INSTANCE_SUFFIX)

    def read_mask(self):
        return read_train_ids

    def setup(self, stage: str) -> None:
        if self.targets == "semantic":
            return super().setup(stage)
        panoptic = self.targets == "panoptic"
        if stage == "fit":
            samples = self.samples("train")
            if not panoptic:  # stuff alone still trains the semantic branch; Mask R-CNN learns nothing from it
                samples = self._with_objects(samples)
            if len(samples) < self.batch_size:
                raise DatasetError(f"{self.root}: {len(samples)} training images" + ("" if panoptic else
                                   " with objects") + f", fewer than one batch of {self.batch_size}")
            transform = coco.train_transform(self.scale_range, self.flip_prob)
            self.datasets["train"] = CityscapesPanopticDataset(samples, transform, crowds=False, semantic=panoptic,
                                                               panoptic=False)
            # Used as is with num_workers=0 (workers reseed their copy): seeded by the run, no RNG drawn.
            self.datasets["train"].reseed(torch.initial_seed() % 2**32)
        for split in {"fit": ["val"], "validate": ["val"], "test": ["test"]}.get(stage, []):
            self.datasets[split] = CityscapesPanopticDataset(self.samples(split), coco.eval_transform(), crowds=True,
                                                             semantic=panoptic, panoptic=panoptic)
        if stage == "predict":
            paths = find_images(self.predict_root) if self.predict_root else [
                path for path, _ in self.samples("test", with_labels=False)]
            self.datasets["predict"] = coco.PredictDataset([(path, None) for path in paths], coco.eval_transform())

    def _with_objects(self, samples: list[tuple[Path, Path]]) -> list[tuple[Path, Path]]:
        """The training samples whose instanceIds hold an object; the others are counted and left out."""
        with ThreadPoolExecutor(max(1, self.workers)) as pool:  # decoding 2975 PNGs takes a while
            keep = list(pool.map(has_objects, [ids_path for _, ids_path in samples]))
        self.skipped_train_images = [image for (image, _), kept in zip(samples, keep) if not kept]
        if self.skipped_train_images:
            log.warning("%s: %d of %d training images hold no object of the 8 thing classes and are left out of "
                        "training (targets instance)", self.root, len(self.skipped_train_images), len(samples))
        return [sample for sample, kept in zip(samples, keep) if kept]
