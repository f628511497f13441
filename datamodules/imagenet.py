"""ImageNet classification data, in torchvision's folder layout or with the official flat validation set.

Images come out as float32 ``[3, H, W]`` in [0, 1], not normalised: the model normalises with its
backbone's timm ``pretrained_cfg`` mean/std. Labels are the class folders (wnids) in sorted order; their
human names ("tench") come from ImageNet's ``LOC_synset_mapping.txt`` when it is beside the data.
"""

from __future__ import annotations

import logging
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

from datamodules.common import (
    AugmentedDataModule,
    AugmentedDataset,
    DatasetError,
    find_images,
    is_quickstart_root,
    read_rgb,
    require_dir,
    use_quickstart_data,
)
from datamodules.dataset_info import DatasetInfo
from datamodules.imagenet_labels import SYNSET_MAPPING, synset_names
from datamodules.quickstart import CLASSIFICATION_CLASSES, CLASSIFICATION_NAMES, write_classification

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
QUICKSTART_ROOT = "data/quickstart/imagenet"  # the demo data's folder, as configs/quickstart/classification.yaml has it
# AlexNet-style PCA lighting noise on [0, 1] RGB, the authors' augmentation (eigen-decomposition of ImageNet).
PCA_EIGVAL = np.array([0.2175, 0.0188, 0.0045])
PCA_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])


class Lighting(A.ImageOnlyTransform):
    """Adds ``eigvec @ (alpha * eigval)`` with ``alpha ~ N(0, alphastd)`` to every pixel (AlexNet's PCA noise).

    Works on the uint8 image (the shift is scaled by 255 and the result clipped to 0..255), so it
    comes before ``ToFloat`` in the pipeline.
    """

    def __init__(self, alphastd: float = 0.1, p: float = 1.0):
        super().__init__(p=p)
        self.alphastd = alphastd

    def get_params(self):
        return {"alpha": self.random_generator.normal(0, self.alphastd, 3)}

    def apply(self, img, alpha=None, **params):
        shift = PCA_EIGVEC @ (alpha * PCA_EIGVAL) * 255.0
        return np.clip(img.astype(np.float32) + shift, 0, 255).astype(np.uint8)


def train_transform(image_size: int) -> A.Compose:
    return A.Compose([
        A.RandomResizedCrop((image_size, image_size), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)),
        A.HorizontalFlip(),
        Lighting(0.1),  # on uint8, before ToFloat
        A.ToFloat(max_value=255),  # float32 in [0, 1]; the model normalises
        ToTensorV2(),
    ])


def eval_transform(image_size: int, resize: int) -> A.Compose:
    return A.Compose([A.SmallestMaxSize(resize), A.CenterCrop(image_size, image_size),
                      A.ToFloat(max_value=255), ToTensorV2()])


def eval_preprocessing(image_size: int, resize: int) -> dict:
    """``eval_transform`` in plain values, for programs without albumentations (``load_network(...).preprocessing``,
    exports): the shorter side to ``resize`` (OpenCV's bilinear), then the centre ``input_size`` crop."""
    return {"input_size": [image_size, image_size], "resize": resize, "crop_pct": image_size / resize,
            "interpolation": "bilinear"}


def classification_info(class_names: list[str], image_size: int, resize: int, batch_size: int) -> DatasetInfo:
    """What an ImageNet-style datamodule declares: its class names and ``eval_transform``."""
    return DatasetInfo(class_names=class_names, preprocessing=eval_preprocessing(image_size, resize),
                       predict={"transform": "datamodules.imagenet.eval_transform", "batch_size": batch_size,
                                "transform_kwargs": {"image_size": image_size, "resize": resize}})


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


class ImageDataset(AugmentedDataset):
    """(path, label) pairs through an albumentations pipeline; ``label`` is -1 where unknown (predict).

    With ``skip_unreadable``, an unreadable image is replaced by the next readable one and counted
    in ``skipped`` (per process) with a warning naming it; otherwise the error names the file.
    """

    def __init__(self, samples: list[tuple[Path, int]], transform: A.Compose, skip_unreadable: bool = False):
        self.samples, self.transform, self.skip_unreadable = samples, transform, skip_unreadable
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        for offset in range(len(self.samples)):
            sample = (index + offset) % len(self.samples)
            path, label = self.samples[sample]
            try:
                image = read_rgb(path)
            except DatasetError as err:
                if not self.skip_unreadable:
                    raise
                self.skipped.append(str(path))
                log.warning("skipping unreadable image (%d so far in this process): %s", len(self.skipped), err)
                continue
            # index: which image this is (the substitute's own, after a skip), so evaluation counts it once.
            return {"image": self.transform(image=image)["image"], "label": label, "path": str(path), "index": sample}
        raise DatasetError(f"no readable image among the {len(self.samples)} of this dataset")


class ImageNetDataModule(AugmentedDataModule):
    """ImageNet-style classification data with the FishNet authors' augmentation.

    Batches are ``{"image": float32 [B, 3, H, W] in [0, 1] (not normalised; the model normalises with
    its backbone's pretrained_cfg), "label": int64 [B] (-1 where unknown), "path": [str], "index": int64 [B]
    (dataset indices: under DDP, evaluation counts the images Lightning's sampler repeats once)}``.

    Args:
        root: dataset folder holding ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG`` (torchvision's
            layout), or ``val/*.JPEG`` flat with ``val_ground_truth``.
        batch_size: images per device and step.
        num_workers: data-loading processes per device; None: the machine's share (``default_num_workers``).
        image_size: training crop and evaluation center crop, in pixels; None: the backbone's
            ``pretrained_cfg`` input size (``fishnet-pl`` fills it in from ``--model.backbone``), else 224.
        val_resize: shorter side before the evaluation center crop; None: ``image_size`` divided by the
            backbone's ``crop_pct`` (filled in likewise), else ``image_size / 0.875``.
        val_ground_truth: for the official flat validation folder: a text file with one
            ``<file name> <wnid>`` pair per line, or Kaggle's ``LOC_val_solution.csv``.
        quickstart: train on the built-in demo data (4 shape classes), written on first use into ``root``
            when ``root`` is the quickstart folder ``data/quickstart/imagenet``; another ``root`` is read as
            it is, and must hold a dataset.
        skip_unreadable: skip (and count) unreadable images instead of stopping with an error.
        pin_memory: pin batches in page-locked memory for faster GPU copies.
        predict_root: folder of images to predict (any layout, searched recursively); default: the val split.
    """

    stage_splits = {**AugmentedDataModule.stage_splits, "test": "val"}  # no test labels: test evaluates val

    def __init__(self, root: str, batch_size: int = 32, num_workers: int | None = None, image_size: int | None = None,
                 val_resize: int | None = None, val_ground_truth: str | None = None, quickstart: bool = False,
                 skip_unreadable: bool = False, pin_memory: bool = True, predict_root: str | None = None):
        super().__init__()
        image_size = image_size or 224  # timm's default input size, for use without the CLI
        val_resize = val_resize or round(image_size / 0.875)
        self.root, self.batch_size, self.num_workers = Path(root).absolute(), batch_size, num_workers
        self.image_size, self.val_resize, self.val_ground_truth = image_size, val_resize, val_ground_truth
        self.quickstart, self.skip_unreadable, self.pin_memory = quickstart, skip_unreadable, pin_memory
        self.predict_root = predict_root
        self.datasets: dict[str, ImageDataset] = {}

    def _uses_quickstart_data(self) -> bool:
        return self.quickstart and is_quickstart_root(self.root, QUICKSTART_ROOT, (self.root / "train").is_dir(),
                                                      "train/<class>/ and val/<class>/ folders of images")

    def _quickstart_not_written(self) -> bool:
        """The demo data is used but not written yet (prepare_data writes it): its classes are known anyway."""
        return self._uses_quickstart_data() and not (self.root / "train").is_dir()

    @property
    def classes(self) -> list[str]:
        """Sorted class folder names (wnids) of the training split; index = label."""
        if self._quickstart_not_written():
            return list(CLASSIFICATION_CLASSES)
        train = require_dir(require_dir(self.root, "dataset root") / "train", "training split")
        classes = sorted(p.name for p in train.iterdir() if p.is_dir())
        if not classes:
            raise DatasetError(f"{train}: no class folders")
        return classes

    @property
    def class_names(self) -> list[str]:
        """Human names of ``classes`` ("tench"), from ``LOC_synset_mapping.txt`` in ``root`` or the folders
        above it (up to Kaggle's three); the wnids where there is none. Index = label."""
        if self._quickstart_not_written():
            return list(CLASSIFICATION_NAMES)
        classes = self.classes
        mapping = next((folder / SYNSET_MAPPING for folder in (self.root, *self.root.parents[:3])
                        if (folder / SYNSET_MAPPING).is_file()), None)
        return synset_names(mapping, classes) if mapping else classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def dataset_info(self) -> DatasetInfo:
        """Class names and the evaluation transform (``DatasetInfo``; checkpoints keep it)."""
        return classification_info(self.class_names, self.image_size, self.val_resize, self.batch_size)

    def prepare_data(self) -> None:
        if self._uses_quickstart_data():
            use_quickstart_data(self.root, write_classification)

    def setup(self, stage: str) -> None:
        classes = self.classes
        evaluate = eval_transform(self.image_size, self.val_resize)
        if stage == "fit":
            self.datasets["train"] = ImageDataset(self._folder_samples("train", classes),
                                                  train_transform(self.image_size), self.skip_unreadable)
            # Used as is with num_workers=0 (workers reseed their copy): seeded by the run, no RNG drawn.
            self.datasets["train"].reseed(torch.initial_seed() % 2**32)
        if stage in ("fit", "validate", "test"):
            self.datasets["val"] = ImageDataset(self._val_samples(classes), evaluate, self.skip_unreadable)
        if stage == "predict":
            if self.predict_root:
                samples = [(p, -1) for p in find_images(self.predict_root)]
            else:
                samples = self._val_samples(classes)
            self.datasets["predict"] = ImageDataset(samples, evaluate, self.skip_unreadable)

    def _folder_samples(self, split: str, classes: list[str]) -> list[tuple[Path, int]]:
        folder = require_dir(self.root / split, f"{split} split")
        samples = []
        for label, wnid in enumerate(classes):
            class_dir = require_dir(folder / wnid, f"class folder of {wnid!r} in the {split} split")
            images = list_images(class_dir)
            if not images:
                raise DatasetError(f"{class_dir}: empty class folder (no {'/'.join(IMAGE_EXTENSIONS)} files)")
            samples += [(p, label) for p in images]
        return samples

    def _val_samples(self, classes: list[str]) -> list[tuple[Path, int]]:
        if not self.val_ground_truth:
            return self._folder_samples("val", classes)
        folder = require_dir(self.root / "val", "val split")
        truth = read_ground_truth(Path(self.val_ground_truth))
        index = {wnid: i for i, wnid in enumerate(classes)}
        samples = []
        for path in list_images(folder):
            wnid = truth.get(path.stem)
            if wnid is None:
                raise DatasetError(f"{self.val_ground_truth}: no ground truth for {path.name}")
            if wnid not in index:
                raise DatasetError(f"{self.val_ground_truth}: class {wnid!r} of {path.name} is not a training class")
            samples.append((path, index[wnid]))
        if not samples:
            raise DatasetError(f"{folder}: no images")
        return samples


def read_ground_truth(path: Path) -> dict[str, str]:
    """Validation file stem -> wnid, from ``<name> <wnid>`` lines or Kaggle's ``LOC_val_solution.csv``."""
    if not path.is_file():
        raise DatasetError(f"{path}: validation ground-truth file does not exist")
    truth = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("ImageId,"):
            continue
        parts = line.replace(",", " ").split()
        if len(parts) < 2 or not parts[1].startswith("n"):
            raise DatasetError(f"{path}:{number}: expected '<file name> <wnid>', got {line!r}")
        truth[Path(parts[0]).stem] = parts[1]
    return truth

