"""COCO panoptic segmentation in the official 2017 layout (or an own set in the COCO panoptic format), for Panoptic FPN.

A split is ``<root>/<split>/*.jpg``, ``<root>/annotations/panoptic_<split>.json`` (``images``, ``annotations``
with each image's PNG ``file_name`` and ``segments_info``, ``categories``) and the PNGs, whose pixel values are
segment ids ``R + 256 G + 256² B`` (panopticapi's ``rgb2id``; 0 is void). Targets come from ``datamodules.panoptic``,
batches are those of ``CityscapesDataModule(targets="panoptic")``; instance masks come from the PNGs, no
instances json is read.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.coco import (
    AspectRatioBatches,
    _check_files_exist,
    check_augmentation,
    collate_detection,
    eval_transform,
    read_categories,
    train_transform,
)
from datamodules.common import (
    AugmentedDataModule,
    AugmentedDataset,
    DatasetError,
    read_rgb,
    require_dir,
)
from datamodules.dataset_info import DatasetInfo
from datamodules.panoptic import PanopticLabels, panoptic_sample
from datamodules.segmentation import IGNORE_INDEX

log = logging.getLogger(__name__)


@dataclass
class PanopticImage:
    """One image of a split: its files, size (from the json) and segments ``{"id", "category_id", "iscrowd"}``."""

    image_id: int
    path: Path
    png: Path | None  # None: the json has no annotation for the image, which is all void
    width: int
    height: int
    segments: list[dict]


def default_colour(category_id: int) -> list[int]:
    """The PASCAL VOC colour map's colour of an id (bits of the id spread over R, G, B): a fixed palette for
    categories without a ``color``."""
    r = g = b = 0
    for bit in range(8):
        r |= ((category_id >> (3 * bit)) & 1) << (7 - bit)
        g |= ((category_id >> (3 * bit + 1)) & 1) << (7 - bit)
        b |= ((category_id >> (3 * bit + 2)) & 1) << (7 - bit)
    return [r, g, b]


def read_panoptic_categories(annotation_file: Path) -> list[dict]:
    """The ``categories`` of a COCO panoptic json sorted by id, as ``{"id", "name", "isthing", "color"}`` (a
    ``default_colour`` where the json has none)."""
    categories = read_categories(annotation_file)
    for c in categories:
        if c.get("isthing") not in (0, 1, True, False):
            raise DatasetError(f"{annotation_file}: category {c['id']} has isthing {c.get('isthing')!r}, expected 0 "
                               "or 1; a COCO panoptic json is expected (annotations/panoptic_<split>.json)")
        colour = c.get("color")
        if colour is not None and not (isinstance(colour, list) and len(colour) == 3
                                       and all(isinstance(v, int) and 0 <= v <= 255 for v in colour)):
            raise DatasetError(f"{annotation_file}: category {c['id']} has color {colour!r}, expected [R, G, B] "
                               "in 0..255")
    return [{"id": c["id"], "name": c["name"], "isthing": int(c["isthing"]),
             "color": list(c["color"]) if c.get("color") is not None else default_colour(c["id"])}
            for c in categories]


def read_segment_ids(path: str | os.PathLike) -> np.ndarray:
    """A COCO panoptic PNG as int64 [H, W] segment ids (``R + 256 G + 256² B``, panopticapi's ``rgb2id``)."""
    rgb = read_rgb(path).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]


def load_panoptic_split(annotation_file: Path, image_dir: Path, png_dir: Path,
                        category_ids: list[int]) -> tuple[list[PanopticImage], int]:
    """Every image of ``annotation_file`` with its segments validated, and how many segments were left out for
    having no pixels (``area`` 0). Fails naming the file, the image and the value when the json is inconsistent."""
    if not annotation_file.is_file():
        raise DatasetError(f"{annotation_file}: annotation file does not exist")
    try:
        data = json.loads(annotation_file.read_text())
        images, annotations = data["images"], data["annotations"]
        ids = sorted(c["id"] for c in data["categories"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DatasetError(f"{annotation_file}: not a COCO panoptic json with images, annotations and categories "
                           f"({err!r})") from err
    if ids != sorted(category_ids):
        raise DatasetError(f"{annotation_file}: category ids {ids} differ from the val split's {sorted(category_ids)}, "
                           "which define the labels")
    by_id = {}
    for info in images:
        if not all(key in info for key in ("id", "file_name", "width", "height")):
            raise DatasetError(f"{annotation_file}: image {info.get('id')} lacks id, file_name, width or height")
        by_id[info["id"]] = info
    _check_files_exist(image_dir, [info["file_name"] for info in by_id.values()], annotation_file)

    known, pngs, segments_of, empty = set(category_ids), {}, {}, 0
    for ann in annotations:
        image_id = ann.get("image_id")
        if image_id not in by_id:
            raise DatasetError(f"{annotation_file}: the annotation of {ann.get('file_name')} refers to image "
                               f"{image_id}, which is not in 'images'")
        where = f"{annotation_file}: image {image_id} ({by_id[image_id]['file_name']})"
        if image_id in pngs:
            raise DatasetError(f"{where} has more than one annotation")
        if "file_name" not in ann or not isinstance(ann.get("segments_info"), list):
            raise DatasetError(f"{where}: its annotation lacks file_name (the PNG) or segments_info")
        segments = []
        for s in ann["segments_info"]:
            if not isinstance(s, dict) or not isinstance(s.get("id"), int):
                raise DatasetError(f"{where}: segments_info holds {str(s)[:80]}, expected {{'id': int, "
                                   "'category_id': int, 'iscrowd': 0 or 1, ...}")
            if s.get("category_id") not in known:
                raise DatasetError(f"{where}: segment {s.get('id')} has category_id {s.get('category_id')}, not "
                                   f"one of {sorted(known)}")
            if s.get("area") == 0:  # listed without pixels (the PNG is the truth either way: see __getitem__)
                empty += 1
                continue
            segments.append({"id": s["id"], "category_id": s["category_id"],
                             "iscrowd": int(bool(s.get("iscrowd", 0)))})
        pngs[image_id], segments_of[image_id] = png_dir / ann["file_name"], segments

    present = {p.name for p in png_dir.iterdir()}
    missing = [(png, by_id[i]["file_name"]) for i, png in pngs.items()
               if png.name not in present and not png.is_file()]
    if missing:
        (png, image), more = missing[0], len(missing) - 1
        raise DatasetError(f"{png}: the panoptic PNG of image {image} (listed in {annotation_file}) does not exist"
                           + (f", nor those of {more} more images" if more else ""))
    records = [PanopticImage(image_id, image_dir / info["file_name"], pngs.get(image_id), info["width"],
                             info["height"], segments_of.get(image_id, [])) for image_id, info in by_id.items()]
    return records, empty


class COCOPanopticDataset(AugmentedDataset):
    """COCO panoptic images with ``datamodules.panoptic.panoptic_target`` targets (``image_id`` and ``results_id``:
    the COCO image id)."""

    def __init__(self, images: list[PanopticImage], categories: list[dict], transform: A.Compose, *, crowds: bool,
                 semantic: bool, panoptic: bool):
        self.images, self.categories, self.transform = images, categories, transform
        self.options = {"crowds": crowds, "semantic": semantic, "panoptic": panoptic}

    def __len__(self) -> int:
        return len(self.images)

    @property
    def group_ids(self) -> list[int]:
        """0 for wide (or square) images, 1 for tall ones, from the json's sizes (``GroupedBatchSampler``)."""
        return [int(record.width < record.height) for record in self.images]

    def __getitem__(self, index: int) -> dict:
        record = self.images[index]
        image = read_rgb(record.path)
        segment_ids = read_segment_ids(record.png) if record.png else np.zeros(image.shape[:2], np.int64)
        # A listed segment without pixels is nothing to learn or to match: left out, whatever its json area says.
        present = set(np.unique(segment_ids).tolist())
        segments = [s for s in record.segments if s["id"] in present]
        sample = panoptic_sample(image, segment_ids, segments, self.categories, self.transform,
                                 image_id=record.image_id, source=f"{record.png} (image {record.path})",
                                 **self.options)
        sample["target"]["results_id"] = record.image_id  # written results name images by their COCO id
        return {**sample, "path": str(record.path)}


class COCOPanopticDataModule(PanopticLabels, AspectRatioBatches, AugmentedDataModule):
    """COCO 2017 panoptic segmentation in the official layout (80 thing and 53 stuff categories), for Panoptic FPN.

    Batches are ``CityscapesDataModule(targets="panoptic")``'s (``datamodules.coco.collate_detection``):
    ``{"image": [float32 [3, H, W] in [0, 1]], "target": [dict], "path": [str]}``, a target as
    ``datamodules.panoptic.panoptic_target`` makes it: ``boxes`` (from the masks), ``labels`` (1..T: thing label k
    is the k-th thing category by id), ``masks``, ``iscrowd``, ``area``, ``semantic`` (0 things, 1..S the stuff
    categories by id, 255 void), ``image_id`` and ``results_id`` (both the COCO image id); evaluation targets add
    the ground truth ``panoptic`` (segment ids) and ``segments``. Training images are flipped and scaled by
    ``scale_range`` (the detector resizes them itself), their targets hold no crowd, and images without any
    segment are left out (``skipped_train_image_ids``); evaluation images are as they are, crowds included with
    ``iscrowd`` 1, images without segments all void. Segments the json lists without pixels (``area`` 0, counted
    in ``empty_segments``; or absent from the PNG) are left out. Predict batches hold ``image``, ``path`` and, for
    the val split, ``image_id``.

    The categories are the val json's, sorted by id (an own set in the COCO panoptic format brings its own; the
    train json must have the same ids); their ``color`` is kept, a fixed palette fills it in where missing.

    Args:
        root: dataset folder holding ``<split>/*.jpg``, ``annotations/panoptic_<split>.json`` and the PNG folder
            ``annotations/panoptic_<split>/`` (as the official zip unpacks) or, if that does not exist,
            ``panoptic_<split>/``.
        train_split: training split name (images folder and annotation file suffix).
        val_split: validation split; its json defines the categories.
        test_split: split evaluated by ``test``.
        batch_size: images per device and step.
        num_workers: data-loading processes per device; None: the machine's share (``default_num_workers``).
        scale_range: training scale jitter, relative to each image's own size.
        flip_prob: probability of a horizontal flip in training.
        group_aspect_ratio: batch wide and tall training images separately.
        predict_root: folder of images to predict (searched recursively); default: the val split.
        pin_memory: pin batches in page-locked memory for faster GPU copies.
    """

    collate_fn = staticmethod(collate_detection)

    def __init__(self, root: str, train_split: str = "train2017", val_split: str = "val2017",
                 test_split: str = "val2017", batch_size: int = 2, num_workers: int | None = None,
                 scale_range: tuple[float, float] = (0.8, 1.2), flip_prob: float = 0.5,
                 group_aspect_ratio: bool = True, predict_root: str | None = None, pin_memory: bool = True):
        super().__init__()
        check_augmentation(batch_size, num_workers, scale_range, flip_prob)
        self.root, self.batch_size, self.num_workers = Path(root).absolute(), batch_size, num_workers
        self.train_split, self.val_split, self.test_split = train_split, val_split, test_split
        self.scale_range, self.flip_prob, self.group_aspect_ratio = tuple(scale_range), flip_prob, group_aspect_ratio
        self.predict_root, self.pin_memory = predict_root, pin_memory
        self.datasets: dict[str, Dataset] = {}
        self.skipped_train_image_ids: list[int] = []  # training images without segments (set by setup)
        self.empty_segments: dict[str, int] = {}  # per split: segments listed with area 0, left out (setup)
        self._splits: dict[str, list[PanopticImage]] = {}

    def annotation_file(self, split: str) -> Path:
        return self.root / "annotations" / f"panoptic_{split}.json"

    def png_dir(self, split: str) -> Path:
        """``annotations/panoptic_<split>/`` (the official zip, unpacked where it lies), else ``panoptic_<split>/``."""
        official, flat = self.root / "annotations" / f"panoptic_{split}", self.root / f"panoptic_{split}"
        for folder in (official, flat):
            if folder.is_dir():
                return folder
        raise DatasetError(f"{official}: the {split} panoptic PNG folder does not exist (nor {flat}); unzip "
                           f"annotations/panoptic_{split}.zip of the official download there")

    @cached_property
    def categories(self) -> list[dict]:
        """The val json's categories ``{"id", "name", "isthing", "color"}`` sorted by id (only the json's
        categories are read: cheap, no image is touched)."""
        return read_panoptic_categories(self.annotation_file(self.val_split))

    @property
    def num_classes(self) -> int:
        """T thing categories, background excluded (80 for COCO); the CLI links it to the model."""
        return len(self.class_names)

    @property
    def class_names(self) -> list[str]:
        """Thing category names; index = label - 1."""
        return [c["name"] for c in self.categories if c["isthing"]]

    @property
    def dataset_info(self) -> DatasetInfo:
        """Thing names and ids, all categories, the semantic map's ignore index; images go in as they are."""
        return DatasetInfo(class_names=self.class_names, label_to_category_id=self.label_to_category_id,
                           ignore_index=IGNORE_INDEX, categories=self.categories,
                           predict={"transform": "datamodules.coco.eval_transform", "batch_size": self.batch_size,
                                    "collate": "datamodules.coco.collate_detection"})

    def setup(self, stage: str) -> None:
        if stage == "fit":
            images = self._split(self.train_split)
            kept = [record for record in images if record.segments]
            self.skipped_train_image_ids = [record.image_id for record in images if not record.segments]
            if self.skipped_train_image_ids:  # all void: nothing to learn
                log.warning("%s: %d of %d images have no segment and are left out of training",
                            self.annotation_file(self.train_split), len(self.skipped_train_image_ids), len(images))
            if len(kept) < self.batch_size:
                raise DatasetError(f"{self.annotation_file(self.train_split)}: {len(kept)} training images with "
                                   f"segments, fewer than one batch of {self.batch_size}")
            self.datasets["train"] = COCOPanopticDataset(
                kept, self.categories, train_transform(self.scale_range, self.flip_prob), crowds=False, semantic=True,
                panoptic=False)
            # Used as is with num_workers=0 (workers reseed their copy): seeded by the run, no RNG drawn.
            self.datasets["train"].reseed(torch.initial_seed() % 2**32)
        for split, name in {"fit": [("val", self.val_split)], "validate": [("val", self.val_split)],
                            "test": [("test", self.test_split)]}.get(stage, []):
            self.datasets[split] = COCOPanopticDataset(self._split(name), self.categories, eval_transform(),
                                                       crowds=True, semantic=True, panoptic=True)
        if stage == "predict":
            self.datasets["predict"] = self.predict_dataset()

    def _split(self, split: str) -> list[PanopticImage]:
        """The split's images and validated segments, loaded once."""
        if split not in self._splits:
            image_dir = require_dir(require_dir(self.root, "dataset root") / split, f"{split} images")
            records, empty = load_panoptic_split(self.annotation_file(split), image_dir, self.png_dir(split),
                                                 [c["id"] for c in self.categories])
            self.empty_segments[split] = empty
            if empty:
                log.warning("%s: %d segments are listed with area 0 (no pixels) and are left out",
                            self.annotation_file(split), empty)
            self._splits[split] = records
        return self._splits[split]
