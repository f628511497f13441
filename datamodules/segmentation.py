"""What every segmentation datamodule shares: the augmentation, the dataset of (image, label file) pairs, the
argument checks and the datamodule base. A datamodule (``cityscapes``, ``segmentation_folder``) only says how it finds
(image, label) pairs and how it decodes a label file into class ids.

Batches mark unlabelled pixels 255 (``IGNORE_INDEX``, what ``SegmentationHead`` ignores), whatever value the files
use for them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

from datamodules.common import (
    AugmentedDataModule,
    AugmentedDataset,
    DatasetError,
    collate_padded,
    find_images,
    read_rgb,
)
from datamodules.dataset_info import DatasetInfo

IGNORE_INDEX = 255  # unlabelled pixels in batches (and the padding of training crops and evaluation batches)


def train_transform(crop_size: tuple[int, int], scale_range: tuple[float, float], flip_prob: float,
                    color_jitter: float) -> A.Compose:
    """Scale, pad, crop and flip image and mask together (mask: nearest, padded with 255); jitter the image.

    Padding and colour jitter work on the uint8 image (padding is black, 0); ``ToFloat`` then gives
    float32 in [0, 1].
    """
    height, width = crop_size
    low, high = scale_range
    photometric = [A.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter, hue=0,
                                 p=1.0)] if color_jitter else []
    return A.Compose([
        A.RandomScale(scale_limit=(low - 1, high - 1), p=1.0),
        A.PadIfNeeded(height, width, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=IGNORE_INDEX),
        A.RandomCrop(height, width),
        A.HorizontalFlip(p=flip_prob),
        *photometric,
        A.ToFloat(max_value=255),  # float32 in [0, 1]; the model normalises
        ToTensorV2(),
    ])


def eval_transform(scale: float) -> A.Compose:
    """Optional resize by ``scale`` (mask: nearest), float32 in [0, 1]; no crop or padding (the head pads itself)."""
    # RandomScale with a one-point range is a deterministic resize by a factor (A.Resize wants a size).
    resize = [A.RandomScale(scale_limit=(scale - 1, scale - 1), p=1.0)] if scale != 1 else []
    return A.Compose([*resize, A.ToFloat(max_value=255), ToTensorV2()])


def eval_preprocessing(scale: float) -> dict:
    """``eval_transform`` in plain values: both sides times ``scale``, truncated (OpenCV's bilinear)."""
    return {"scale": scale, "interpolation": "bilinear"}


def check_augmentation(batch_size: int, val_batch_size: int, num_workers: int | None, crop_size: Sequence[int],
                       scale_range: Sequence[float], flip_prob: float, color_jitter: float, eval_scale: float) -> None:
    """Raise ``ValueError`` naming the first loader or augmentation argument out of its range."""
    if batch_size < 1 or val_batch_size < 1 or (num_workers is not None and num_workers < 0):
        raise ValueError(f"batch_size and val_batch_size must be >= 1 and num_workers >= 0, got {batch_size}, "
                         f"{val_batch_size} and {num_workers}")
    if len(crop_size) != 2 or min(crop_size) < 1:
        raise ValueError(f"crop_size must be (height, width) in pixels, got {crop_size}")
    if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
        raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}")
    if not 0 <= flip_prob <= 1:
        raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
    if not 0 <= color_jitter <= 1:
        raise ValueError(f"color_jitter must be in [0, 1], got {color_jitter}")
    if eval_scale <= 0:
        raise ValueError(f"eval_scale must be > 0, got {eval_scale}")


class SegmentationDataset(AugmentedDataset):
    """(image, label file) pairs through an albumentations pipeline.

    ``read_mask(label_path)`` decodes a label file as uint8 ``[H, W]`` class ids (255 = ignore); it must
    pickle (a module-level function or a ``LabelReader``), as DataLoader workers receive it. A sample
    without a label file (predict) gives no ``mask``.
    """

    def __init__(self, samples: list[tuple[Path, Path | None]], read_mask: Callable[[Path], np.ndarray],
                 transform: A.Compose):
        self.samples, self.read_mask, self.transform = samples, read_mask, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        image_path, label_path = self.samples[index]
        image = read_rgb(image_path)
        if label_path is None:
            return {"image": self.transform(image=image)["image"], "path": str(image_path), "index": index}
        mask = self.read_mask(label_path)
        if mask.shape != image.shape[:2]:
            raise DatasetError(f"{label_path}: label is {mask.shape[0]}x{mask.shape[1]} (height x width), its "
                               f"image {image_path.name} is {image.shape[0]}x{image.shape[1]}")
        out = self.transform(image=image, mask=mask)
        return {"image": out["image"], "mask": out["mask"].long(), "path": str(image_path), "index": index}


def check_no_missing_labels(missing: list[tuple[Path, Path]]) -> None:
    """Raise ``DatasetError`` naming the first (image, expected label file) pair of ``missing``, if any."""
    if missing:
        image, label = missing[0]
        more = f" (and {len(missing) - 1} more images without labels)" if len(missing) > 1 else ""
        raise DatasetError(f"{label}: label file of {image.name} does not exist{more}")


class SegmentationDataModule(AugmentedDataModule):
    """What every segmentation datamodule shares: datasets of (image, label) pairs with the usual
    augmentation, loaders, and the predict configuration. A subclass sets the arguments that
    ``check_augmentation`` checks (as attributes of the same names, plus ``root``, ``predict_root``,
    ``pin_memory`` and ``datasets = {}``) and says how it finds pairs (``samples``) and decodes label
    files (``read_mask``)."""

    collate_fn = staticmethod(collate_padded)  # evaluation images keep their own sizes

    @property
    def eval_batch_size(self) -> int:
        return self.val_batch_size

    def samples(self, split: str, with_labels: bool = True) -> list[tuple[Path, Path | None]]:
        """(image, label file) pairs of ``split`` ("train", "val" or "test"; label None without labels)."""
        raise NotImplementedError

    def read_mask(self) -> Callable[[Path], np.ndarray]:
        """The label file decoder: uint8 ``[H, W]`` class ids, 255 unlabelled (it must pickle, for workers)."""
        raise NotImplementedError

    @property
    def palette(self) -> list[tuple[int, int, int]] | None:
        """RGB colour of each class, for predicted masks; None: the segmentation head's default colours."""
        return None

    @property
    def dataset_info(self) -> DatasetInfo:
        """Class names, palette, ignore index and the evaluation transform (``DatasetInfo``; checkpoints keep it)."""
        return DatasetInfo(class_names=self.class_names, palette=self.palette, ignore_index=IGNORE_INDEX,
                           preprocessing=eval_preprocessing(self.eval_scale),
                           predict={"transform": "datamodules.segmentation.eval_transform",
                                    "transform_kwargs": {"scale": self.eval_scale},
                                    "collate": "datamodules.common.collate_padded"})

    def setup(self, stage: str) -> None:
        evaluate, read_mask = eval_transform(self.eval_scale), self.read_mask()
        if stage == "fit":
            samples = self.samples("train")
            if len(samples) < self.batch_size:
                raise DatasetError(f"{self.root}: {len(samples)} training images, fewer than one batch of "
                                   f"{self.batch_size}")
            transform = train_transform(self.crop_size, self.scale_range, self.flip_prob, self.color_jitter)
            self.datasets["train"] = SegmentationDataset(samples, read_mask, transform)
            # Used as is with num_workers=0 (workers reseed their copy): seeded by the run, no RNG drawn.
            self.datasets["train"].reseed(torch.initial_seed() % 2**32)
        if stage in ("fit", "validate"):
            self.datasets["val"] = SegmentationDataset(self.samples("val"), read_mask, evaluate)
        if stage == "test":
            self.datasets["test"] = SegmentationDataset(self.samples("test"), read_mask, evaluate)
        if stage == "predict":
            if self.predict_root:
                samples = [(p, None) for p in find_images(self.predict_root)]
            else:
                samples = self.samples("test", with_labels=False)
            self.datasets["predict"] = SegmentationDataset(samples, read_mask, evaluate)
