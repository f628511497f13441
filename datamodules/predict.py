"""Predict every image under a folder, prepared as the model's training data prepared its evaluation images.

``fishnet-pl predict --ckpt_path CKPT --data.predict_root DIR --predict_dir OUT`` needs no config and
no dataset: the CLI picks ``PredictFolderDataModule`` and fills it from the checkpoint, where the module
stored the training datamodule's ``dataset_info`` (its evaluation transform, batch layout, class
names, palette, COCO category ids). Any image file under ``DIR`` counts (nested folders, JPEG, PNG,
grayscale, CMYK, palette, any size); one that cannot be decoded is logged by name and skipped, the
others are still predicted, and the prediction writers list the skipped files in ``unreadable.txt``.
The writers mirror ``DIR``'s layout under ``OUT`` (``DIR/a/img.jpg`` -> ``OUT/a/img.jpg.png``, ...), from the
``predict_root`` attribute here (``fishnet_pl.writers.prediction_path``).
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import albumentations as A
import lightning as L
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import DataLoader, Dataset

from datamodules.common import DatasetError, collate_same_size, find_images, loader_workers, read_rgb
from datamodules.dataset_info import DatasetInfo
from datamodules.multitask import MultiTaskDataModule

log = logging.getLogger(__name__)


def to_float() -> A.Compose:
    """The images as they are, float32 in [0, 1]: for models that resize themselves (detection)."""
    return A.Compose([A.ToFloat(max_value=255), ToTensorV2()])


class ImageFolderDataset(Dataset):
    """Images through an evaluation pipeline; an unreadable file gives an item marked ``unreadable``."""

    def __init__(self, paths: list[Path], transform: A.Compose):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        try:
            image = read_rgb(path)
        except DatasetError as err:
            log.warning("skipping unreadable image: %s", err)
            return {"path": str(path), "index": index, "unreadable": str(err)}
        return {"image": self.transform(image=image)["image"], "path": str(path), "index": index}


class SkipUnreadable:
    """``collate_fn``: the readable items through ``collate``, and ``batch["unreadable"]`` = the others' paths.

    A batch of unreadable files only is ``{"unreadable": [...]}``: the module predicts nothing for it.
    """

    def __init__(self, collate: Callable[[list[dict]], dict] | None = None):
        self.collate = collate or functools.partial(collate_same_size, option="batch_size")

    def __call__(self, items: list[dict]) -> dict:
        readable = [item for item in items if "unreadable" not in item]
        batch = self.collate(readable) if readable else {}
        batch["unreadable"] = [item["path"] for item in items if "unreadable" in item]
        return batch


def import_object(path: str) -> Any:
    """``module.name`` (as in a config's class_path) -> the object."""
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"{path!r} cannot be imported ({err})") from err


class PredictFolderDataModule(L.LightningDataModule):
    """Every image under ``predict_root``, for ``predict`` only.

    The other arguments are what a training datamodule declared (its ``dataset_info``: the CLI copies them from
    the checkpoint; set any of them to override):

    Args:
        predict_root: folder of images, searched recursively.
        transform: import path of a function returning the albumentations evaluation pipeline; default
            ``to_float`` (the image as it is).
        transform_kwargs: its arguments (e.g. the crop and resize of classification).
        collate: import path of the batch ``collate_fn`` (detection's lists); default: stacked tensors.
        num_classes: the model's classes (the CLI links it to the model).
        class_names: names of the classes, for the prediction files.
        palette: RGB colour per class, for segmentation masks.
        label_to_category_id: detection label -> the training set's COCO category id.
        categories: the panoptic categories (things and stuff) of a panoptic model.
        batch_size: images per step (default 1); above 1 only where every image comes out in one size
            (classification's crop), the collate pads them (segmentation) or the model takes lists (detection).
        num_workers: data-loading processes; None: the machine's share (``default_num_workers``).
    """

    def __init__(self, predict_root: str, transform: str | None = None,
                 transform_kwargs: dict[str, Any] | None = None, collate: str | None = None,
                 num_classes: int | None = None, class_names: list[str] | None = None,
                 palette: list[tuple[int, int, int]] | None = None,
                 label_to_category_id: dict[int, int] | None = None, categories: list[dict] | None = None,
                 batch_size: int | None = None, num_workers: int | None = None):
        super().__init__()
        batch_size = batch_size or 1
        if batch_size < 1 or (num_workers is not None and num_workers < 0):
            raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
        self.predict_root, self.batch_size, self.num_workers = predict_root, batch_size, num_workers
        self.transform = import_object(transform or "datamodules.predict.to_float")(**(transform_kwargs or {}))
        self.collate = SkipUnreadable(import_object(collate) if collate else None)
        self._num_classes, self.class_names, self.palette = num_classes, class_names, palette
        self.label_to_category_id, self.categories = label_to_category_id, categories
        self.dataset: ImageFolderDataset | None = None

    @property
    def num_classes(self) -> int:
        if self._num_classes is None:
            raise ValueError("PredictFolderDataModule needs num_classes: give --ckpt_path a fishnet-pl checkpoint "
                             "(which records it) or set --data.init_args.num_classes")
        return self._num_classes

    @property
    def dataset_info(self) -> DatasetInfo:
        """What the checkpoint recorded (or the arguments override): names, palette, category ids."""
        return DatasetInfo(class_names=self.class_names, palette=self.palette,
                           label_to_category_id=self.label_to_category_id, categories=self.categories)

    def setup(self, stage: str) -> None:
        if stage != "predict":
            raise ValueError(f"PredictFolderDataModule only predicts (it has no labels), not {stage!r}")
        self.dataset = ImageFolderDataset(find_images(self.predict_root), self.transform)

    def predict_dataloader(self) -> DataLoader:
        if self.dataset is None:
            raise RuntimeError("predict data is not set up; call setup('predict') first")
        return DataLoader(self.dataset, batch_size=self.batch_size,
                          num_workers=loader_workers(self.num_workers, self.trainer), collate_fn=self.collate,
                          pin_memory=torch.cuda.is_available())


class MultiTaskPredictFolderDataModule(MultiTaskDataModule):
    """Every image under ``predict_root``, for each task of a multi-task model: one ``PredictFolderDataModule``
    per task, each preparing the images as that task's training data prepared its evaluation images, their
    loaders run one after the other (``task_names``). The CLI picks it for ``predict --ckpt_path`` of a multi-task
    checkpoint and fills ``tasks`` from it.

    Args:
        predict_root: folder of images, searched recursively.
        tasks: each task's ``PredictFolderDataModule`` arguments besides ``predict_root`` (what the checkpoint
            recorded of the task's data: transform, collate, batch size, class names, ...).
        batch_size: images per step for every task; None: each task's recorded size.
        num_workers: data-loading processes; None: the machine's share (``default_num_workers``).
    """

    def __init__(self, predict_root: str, tasks: dict[str, dict[str, Any]] | None = None,
                 batch_size: int | None = None, num_workers: int | None = None):
        if not tasks:
            raise ValueError("MultiTaskPredictFolderDataModule needs each task's data: give --ckpt_path a multi-task "
                             "fishnet-pl checkpoint (which records it) or set --data.init_args.tasks")
        super().__init__({name: PredictFolderDataModule(predict_root, **{
            **arguments, "batch_size": batch_size or arguments.get("batch_size"), "num_workers": num_workers})
            for name, arguments in tasks.items()})
        self.predict_root = predict_root  # the prediction writers mirror its layout
