"""Cityscapes semantic segmentation in the official layout, with the 19 training classes.

Images are ``leftImg8bit/<split>/<city>/<name>_leftImg8bit.png``; their fine labels are
``gtFine/<split>/<city>/<name>_gtFine_labelIds.png`` (the ``_color``, ``_instanceIds`` and
``_polygons.json`` files beside them are not read). Label ids 0..33 become train ids 0..18 through
the cityscapesscripts table (``cityscapes_labels``), every other class becomes 255, the ignore index. Images come out
as float32 in [0, 1], not normalised: the model normalises with its backbone's timm ``pretrained_cfg``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from datamodules.cityscapes_labels import CLASS_NAMES, LABEL_ID_TO_TRAIN_ID, LABELS, PALETTE
from datamodules.common import DatasetError, is_quickstart_root, read_label_png, require_dir, use_quickstart_data
from datamodules.quickstart_segmentation import write_cityscapes

# Shared with every segmentation datamodule: Cityscapes differs only in how it finds pairs and maps label ids.
from datamodules.segmentation import (
    SegmentationDataModule,
    SegmentationDataset,
    check_augmentation,
    check_no_missing_labels,
)

QUICKSTART_ROOT = "data/quickstart/cityscapes"  # the demo data's folder, as configs/quickstart/segmentation.yaml has it
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"

def read_train_ids(path: str | os.PathLike) -> np.ndarray:
    """Decode a ``*_gtFine_labelIds.png`` as uint8 ``[H, W]`` train ids (0..18, 255 = ignore)."""
    ids = read_label_png(path)
    outside = (ids < 0) | (ids >= len(LABELS))
    if outside.any():
        shown = np.unique(ids[outside])[:5].tolist()
        raise DatasetError(f"{path}: label ids {shown} outside 0..{len(LABELS) - 1}; expected the official "
                           f"*{LABEL_SUFFIX} (not the trainIds, instanceIds or color images)")
    return LABEL_ID_TO_TRAIN_ID[ids]


def find_samples(root: Path, split: str, with_labels: bool = True) -> list[tuple[Path, Path | None]]:
    """(image, labelIds file) pairs of a split, sorted; every label file must exist (contents are checked on load)."""
    images_dir = require_dir(require_dir(root, "dataset root") / "leftImg8bit", "leftImg8bit images")
    images_dir = require_dir(images_dir / split, f"{split} split images")
    images = sorted(images_dir.glob(f"*/*{IMAGE_SUFFIX}"))
    if not images:
        raise DatasetError(f"{images_dir}: no <city>/*{IMAGE_SUFFIX} images")
    if not with_labels:
        return [(path, None) for path in images]
    labels_dir = require_dir(require_dir(root / "gtFine", "gtFine labels") / split, f"{split} split labels")
    samples = [(path, labels_dir / path.parent.name / (path.name[:-len(IMAGE_SUFFIX)] + LABEL_SUFFIX))
               for path in images]
    check_no_missing_labels([(image, label) for image, label in samples if not label.is_file()])
    return samples


class CityscapesDataModule(SegmentationDataModule):
    """Cityscapes fine annotations in the official layout, 19 classes, with the usual segmentation augmentation.

    Batches are ``{"image": float32 [B, 3, H, W] in [0, 1], "mask": int64 [B, H, W]
    (train ids 0..18, 255 = ignore), "path": [str], "index": int64 [B] (dataset indices, so that under DDP
    evaluation counts each image once), "size": int64 [B, 2] (each image's height and width)}``; predict
    batches have no ``mask``. Training images are randomly scaled, padded (image 0, i.e. black; mask 255) to
    the crop if smaller, cropped to ``crop_size``, flipped and colour-jittered. Evaluation images keep their
    full size (or are resized by ``eval_scale``), uncropped (all Cityscapes images are 1024x2048; a batch of
    images of other sizes is padded to its largest, ``collate_padded``).

    Args:
        root: dataset folder holding ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` and
            ``gtFine/<split>/<city>/*_gtFine_labelIds.png``.
        batch_size: training crops per device and step.
        num_workers: data-loading processes per device.
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
    """

    def __init__(self, root: str, batch_size: int = 2, num_workers: int = 4,
                 crop_size: tuple[int, int] = (512, 1024), scale_range: tuple[float, float] = (0.5, 2.0),
                 flip_prob: float = 0.5, color_jitter: float = 0.2, eval_scale: float = 1.0, val_batch_size: int = 1,
                 test_split: str = "val", quickstart: bool = False, predict_root: str | None = None,
                 pin_memory: bool = True):
        super().__init__()
        check_augmentation(batch_size, val_batch_size, num_workers, crop_size, scale_range, flip_prob, color_jitter,
                           eval_scale)
        self.root, self.batch_size, self.num_workers = Path(root).absolute(), batch_size, num_workers
        self.crop_size, self.scale_range = tuple(crop_size), tuple(scale_range)
        self.flip_prob, self.color_jitter, self.eval_scale = flip_prob, color_jitter, eval_scale
        self.val_batch_size, self.test_split, self.quickstart = val_batch_size, test_split, quickstart
        self.predict_root, self.pin_memory = predict_root, pin_memory
        self.datasets: dict[str, SegmentationDataset] = {}

    @property
    def num_classes(self) -> int:
        """19 train ids; known before any file is read (the CLI links it to the model)."""
        return len(CLASS_NAMES)

    @property
    def class_names(self) -> list[str]:
        """Class names; index = train id."""
        return list(CLASS_NAMES)

    @property
    def palette(self) -> list[tuple[int, int, int]]:
        """RGB colour of each train id (the official colour coding), for predicted masks."""
        return list(PALETTE)

    def prepare_data(self) -> None:
        if self.quickstart and is_quickstart_root(self.root, QUICKSTART_ROOT, (self.root / "leftImg8bit").is_dir(),
                                                  f"leftImg8bit/ and gtFine/ with <split>/<city>/*{IMAGE_SUFFIX}"):
            use_quickstart_data(self.root, write_cityscapes)

    def samples(self, split: str, with_labels: bool = True) -> list[tuple[Path, Path | None]]:
        # test evaluates test_split (the official test labels are withheld); predict reads the test images
        return find_samples(self.root, self.test_split if split == "test" and with_labels else split, with_labels)

    def read_mask(self):
        return read_train_ids
