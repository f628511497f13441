"""Semantic segmentation on any dataset in folders, and what every segmentation datamodule shares.

A dataset is images and single-channel label PNGs paired by file stem, in mmsegmentation's
``img_dir``/``ann_dir`` layout::

    <root>/<img_dir>/<split>/**/<stem><image_suffix>      e.g. images/train/street/0001.jpg
    <root>/<ann_dir>/<split>/**/<stem><label_suffix>      e.g. annotations/train/street/0001.png

or, when a split is a list file (a ``.txt`` path under ``root`` with one stem per line, as VOC's
``ImageSets/Segmentation/train.txt``), ``<root>/<img_dir>/<stem><image_suffix>`` and
``<root>/<ann_dir>/<stem><label_suffix>``. The classes (and their colours) come from a small YAML or
JSON file beside the data, ``<root>/classes.yaml``, or from the config.

Label files hold class indices (grayscale or 16-bit PNGs, or palette PNGs as VOC's, whose pixels are
the indices and whose colours are only for viewing), or RGB colours, mapped through the class colours.
Batches mark unlabelled pixels 255 (``IGNORE_INDEX``, what ``SegmentationHead`` ignores), whatever
value the files use for them.

The transforms, ``SegmentationDataset`` and ``check_augmentation`` here serve every segmentation
datamodule (Cityscapes too): a datamodule only says how it finds (image, label) pairs and how it
decodes a label file into class ids.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
import yaml
from albumentations.pytorch import ToTensorV2
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader

from datamodules.common import (
    AugmentedDataModule,
    AugmentedDataset,
    DatasetError,
    collate_padded,
    find_images,
    make_loader,
    read_rgb,
    require_dir,
)

IGNORE_INDEX = 255  # unlabelled pixels in batches (and the padding of training crops and evaluation batches)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
Colour = tuple[int, int, int]


# ---------------------------------------------------------------------- shared by every segmentation datamodule
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


def check_augmentation(batch_size: int, val_batch_size: int, num_workers: int, crop_size: Sequence[int],
                       scale_range: Sequence[float], flip_prob: float, color_jitter: float, eval_scale: float) -> None:
    """Raise ``ValueError`` naming the first loader or augmentation argument out of its range."""
    if batch_size < 1 or val_batch_size < 1 or num_workers < 0:
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


# ---------------------------------------------------------------------- classes and label files
def load_classes(path: str | os.PathLike) -> dict:
    """Read a classes file (YAML, or JSON, which is YAML): ``classes`` (names, index order), optional
    ``palette`` (an RGB triple per class) and ``ignore_colors`` (RGB triples meaning unlabelled)."""
    path = Path(path)
    try:
        content = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{path}: classes file does not exist; write one (classes: [name, ...], optionally "
                           "palette: [[r, g, b], ...]) or list the classes in the config (data.init_args.classes)"
                           ) from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise DatasetError(f"{path}: cannot be read as a YAML or JSON classes file ({err})") from err
    if not isinstance(content, dict) or "classes" not in content:
        raise DatasetError(f"{path}: expected a mapping with 'classes' (a list of names) and optionally 'palette' "
                           f"and 'ignore_colors', got {type(content).__name__}")
    unknown = set(content) - {"classes", "palette", "ignore_colors"}
    if unknown:
        raise DatasetError(f"{path}: unknown keys {sorted(unknown)}; a classes file holds classes, palette and "
                           "ignore_colors")
    return content


def _colours(values, what: str, where: str) -> tuple[Colour, ...]:
    try:
        colours = tuple(tuple(int(c) for c in colour) for colour in values)
    except (TypeError, ValueError):
        colours = ()
    if not colours or any(len(c) != 3 or min(c) < 0 or max(c) > 255 for c in colours):
        raise DatasetError(f"{where}: {what} must be a list of [r, g, b] triples of 0..255, got {values!r}")
    return colours


class LabelReader:
    """Decodes a label file as uint8 ``[H, W]`` class ids 0..num_classes-1, 255 for unlabelled pixels.

    Single-channel files (grayscale, 16-bit, or palette PNGs, read as their indices) hold class indices:
    ``ignore_index`` marks unlabelled pixels, and with ``reduce_zero_label`` value 0 does too and value k
    is class k-1 (ADE20K's convention). RGB files hold class colours (``palette``; ``ignore_colors`` are
    unlabelled). Any other value or colour raises ``DatasetError`` naming the file and the value.
    """

    def __init__(self, num_classes: int, palette: Sequence[Colour] | None = None, ignore_index: int = IGNORE_INDEX,
                 reduce_zero_label: bool = False, ignore_colors: Sequence[Colour] = ()):
        self.num_classes, self.ignore_index, self.reduce_zero_label = num_classes, ignore_index, reduce_zero_label
        self.palette = tuple(map(tuple, palette)) if palette is not None else None
        self.ignore_colors = tuple(map(tuple, ignore_colors))

    def __call__(self, path: Path) -> np.ndarray:
        try:
            with Image.open(path) as image:
                if image.mode in ("RGB", "RGBA"):
                    return self._from_colours(np.asarray(image.convert("RGB")), path)
                if image.mode not in ("L", "P", "I", "I;16"):
                    raise DatasetError(f"{path}: label image has mode {image.mode!r}; expected class indices in "
                                       "one channel (grayscale, 16-bit or palette PNG) or RGB class colours")
                values = np.asarray(image).astype(np.int64)  # palette PNGs: the indices, not their colours
        except FileNotFoundError as err:
            raise DatasetError(f"{path}: label file does not exist") from err
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise DatasetError(f"{path}: cannot be decoded as a label image ({err})") from err
        return self._from_indices(values, path)

    def _from_indices(self, values: np.ndarray, path: Path) -> np.ndarray:
        ignored = values == self.ignore_index
        classes = values
        if self.reduce_zero_label:  # 0 = unlabelled, k = class k-1
            ignored |= values == 0
            classes = values - 1
        bad = ~ignored & ((classes < 0) | (classes >= self.num_classes))
        if bad.any():
            shown = np.unique(values[bad])[:5].tolist()
            low, high = (1, self.num_classes) if self.reduce_zero_label else (0, self.num_classes - 1)
            zero = ", 0 (reduce_zero_label)" if self.reduce_zero_label else ""
            raise DatasetError(f"{path}: label values {shown} are neither classes ({low}..{high} for "
                               f"{self.num_classes} classes) nor unlabelled (ignore_index {self.ignore_index}{zero})")
        return np.where(ignored, IGNORE_INDEX, classes).astype(np.uint8)

    def _from_colours(self, rgb: np.ndarray, path: Path) -> np.ndarray:
        if self.palette is None:
            raise DatasetError(f"{path}: an RGB label image, but the classes have no colours to map it by; give "
                               "each class its colour (palette: in the classes file or the config)")
        repeated = sorted({c for c in self.palette if self.palette.count(c) > 1})
        if repeated:  # fine for drawing predictions (ADE20K's palette repeats one), ambiguous for reading labels
            raise DatasetError(f"{path}: an RGB label image, but classes share the colours {repeated[:3]}; "
                               "give each class its own colour (palette)")
        codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
        table = {(r << 16) | (g << 8) | b: k for k, (r, g, b) in enumerate(self.palette)}
        table.update({(r << 16) | (g << 8) | b: IGNORE_INDEX for r, g, b in self.ignore_colors})
        keys = np.array(sorted(table), np.int64)
        values = np.array([table[k] for k in keys], np.uint8)
        at = np.searchsorted(keys, codes).clip(max=len(keys) - 1)
        unknown = keys[at] != codes
        if unknown.any():
            shown = [((c >> 16) & 255, (c >> 8) & 255, c & 255) for c in np.unique(codes[unknown])[:3].tolist()]
            grey = all(r == g == b for r, g, b in shown)
            hint = "; if the file holds class indices, save it as a one-channel PNG" if grey else ""
            raise DatasetError(f"{path}: colours {shown} ({int(unknown.sum())} pixels) are not class colours "
                               f"(palette) nor ignore_colors{hint}")
        return values[at]


# ---------------------------------------------------------------------- finding (image, label) pairs
def _is_list(split: str) -> bool:
    return split.endswith(".txt")


def _stems_from_list(list_file: Path, img_dir: str, suffixes: Sequence[str]) -> list[str]:
    """Stems of a split list: the first word of each line, as VOC's ``ImageSets`` files; an image path
    (DeepLab's ``/JPEGImages/x.jpg /SegmentationClassAug/x.png`` lines) is reduced to its stem under img_dir."""
    try:
        lines = list_file.read_text().splitlines()
    except OSError as err:
        raise DatasetError(f"{list_file}: split list cannot be read ({err})") from err
    stems = []
    for line in lines:
        if not line.split():
            continue
        stem = line.split()[0].lstrip("/")
        stem = stem.removeprefix(img_dir.strip("/") + "/")
        stem = next((stem[:-len(s)] for s in suffixes if stem.endswith(s)), stem)
        stems.append(stem)
    if not stems:
        raise DatasetError(f"{list_file}: split list names no images")
    return stems


def find_pairs(root: Path, img_dir: str, ann_dirs: Sequence[str], split: str, image_suffix: str | None,
               label_suffix: str, with_labels: bool = True) -> list[tuple[Path, Path | None]]:
    """(image, label) pairs of one split, sorted by image (list files: in their order).

    ``split`` is a folder under ``img_dir`` and each ann_dir, or a ``.txt`` list of stems under ``root``.
    A stem's label is the first of ``<ann_dir>/<stem><label_suffix>`` that exists, over ``ann_dirs`` in
    order; an image without any raises ``DatasetError`` naming the missing file.
    """
    suffixes = (image_suffix,) if image_suffix else IMAGE_EXTENSIONS
    images_root = require_dir(root / img_dir, "images (img_dir)")
    if _is_list(split):
        sub = ""
        stems = _stems_from_list(root / split, img_dir, suffixes)
        images = []
        for stem in stems:
            candidates = [images_root / f"{stem}{s}" for s in suffixes]
            found = next((p for p in candidates if p.is_file()), None)
            if found is None:
                raise DatasetError(f"{candidates[0]}: image of {stem!r} (listed in {root / split}) does not exist")
            images.append((stem, found))
    else:
        sub = split
        folder = require_dir(images_root / split, f"{split} split images")
        images = []
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            suffix = image_suffix if image_suffix else path.suffix
            if path.name.endswith(suffix) if image_suffix else suffix.lower() in IMAGE_EXTENSIONS:
                images.append((str(path.relative_to(folder))[:-len(suffix)], path))
        if not images:
            raise DatasetError(f"{folder}: no images ({'/'.join(suffixes)}), searched recursively")
    if not with_labels:
        return [(path, None) for _, path in images]
    label_roots = [require_dir(root / ann_dir / sub, f"{split} split labels (ann_dir {ann_dir})")
                   for ann_dir in ann_dirs]
    pairs, missing = [], []
    for stem, path in images:
        candidates = [labels / f"{stem}{label_suffix}" for labels in label_roots]
        label = next((c for c in candidates if c.is_file()), None)
        if label is None:
            missing.append((path, candidates[0]))
        pairs.append((path, label))
    check_no_missing_labels(missing)
    return pairs


def check_no_missing_labels(missing: list[tuple[Path, Path]]) -> None:
    """Raise ``DatasetError`` naming the first (image, expected label file) pair of ``missing``, if any."""
    if missing:
        image, label = missing[0]
        more = f" (and {len(missing) - 1} more images without labels)" if len(missing) > 1 else ""
        raise DatasetError(f"{label}: label file of {image.name} does not exist{more}")


# ---------------------------------------------------------------------- the datamodules
class SegmentationDataModule(AugmentedDataModule):
    """What every segmentation datamodule shares: datasets of (image, label) pairs with the usual
    augmentation, loaders, and the predict configuration. A subclass sets the arguments that
    ``check_augmentation`` checks (as attributes of the same names, plus ``root``, ``predict_root``,
    ``pin_memory`` and ``datasets = {}``) and says how it finds pairs (``samples``) and decodes label
    files (``read_mask``)."""

    def samples(self, split: str, with_labels: bool = True) -> list[tuple[Path, Path | None]]:
        """(image, label file) pairs of ``split`` ("train", "val" or "test"; label None without labels)."""
        raise NotImplementedError

    def read_mask(self) -> Callable[[Path], np.ndarray]:
        """The label file decoder: uint8 ``[H, W]`` class ids, 255 unlabelled (it must pickle, for workers)."""
        raise NotImplementedError

    @property
    def predict_config(self) -> dict:
        """How ``PredictFolderDataModule`` prepares images for a model trained on this data (checkpoints keep it)."""
        return {"transform": "datamodules.segmentation_folder.eval_transform",
                "transform_kwargs": {"scale": self.eval_scale}, "collate": "datamodules.common.collate_padded",
                "preprocessing": eval_preprocessing(self.eval_scale)}

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

    def _loader(self, split: str, batch_size: int, shuffle: bool = False) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"{split} data is not set up; call setup() with the matching stage first")
        return make_loader(self.datasets[split], batch_size=batch_size, shuffle=shuffle, drop_last=shuffle,
                           num_workers=self.num_workers, pin_memory=self.pin_memory, collate_fn=collate_padded)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.val_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.val_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", self.val_batch_size)


class SegmentationFolderDataModule(SegmentationDataModule):
    """Semantic segmentation on your own folders (or ADE20K, PASCAL VOC, ...), with the usual augmentation.

    Batches are ``{"image": float32 [B, 3, H, W] in [0, 1], "mask": int64 [B, H, W] (class ids 0..K-1,
    255 = unlabelled), "path": [str], "index": int64 [B], "size": int64 [B, 2] (each image's height and width)}``;
    predict batches have no ``mask``. Training
    images are randomly scaled, padded (image black, mask 255) to the crop if smaller, cropped to
    ``crop_size``, flipped and colour-jittered. Evaluation images keep their own size (or are resized by
    ``eval_scale``): a batch pads them to its largest (image 0, mask 255) and carries each one's ``size``
    (``collate_padded``), and each is predicted at its own size, whatever ``val_batch_size``.

    Args:
        root: dataset folder.
        classes: the class names in index order, or the path (under ``root``, or absolute) of a YAML or
            JSON file with ``classes`` (names), ``palette`` (an [r, g, b] per class) and ``ignore_colors``.
            ``num_classes`` is its length: known before any image is read.
        palette: RGB colour per class: maps RGB label images to classes, colours the predicted masks;
            overrides the classes file's.
        img_dir: images folder under ``root``.
        ann_dir: label folder under ``root``, or several: a stem's label is the first found, in order
            (VOC with SBD: ``[SegmentationClass, SegmentationClassAug]``).
        train_split: the training split: a folder under ``img_dir`` and ``ann_dir`` (searched recursively),
            or a ``.txt`` file under ``root`` listing stems (one a line); a list of them is their union.
        val_split: the validation split, likewise.
        test_split: the split ``test`` evaluates (and ``predict`` reads, without labels, when there is no
            ``predict_root``); default: ``val_split``.
        image_suffix: what follows the stem in image names (``.jpg``, ``_leftImg8bit.png``); default any
            of ``.jpg``, ``.jpeg``, ``.png``.
        label_suffix: what follows the stem in label names.
        ignore_index: value of unlabelled pixels in index label files (batches always use 255).
        reduce_zero_label: the files' 0 means unlabelled and value k is class k-1 (ADE20K).
        ignore_colors: colours of unlabelled pixels in RGB label images; adds to the classes file's.
        batch_size: training crops per device and step.
        num_workers: data-loading processes per device.
        crop_size: training crop (height, width) in pixels.
        scale_range: training scale jitter (low, high), relative to the image's own size.
        flip_prob: probability of a horizontal flip in training.
        color_jitter: brightness, contrast and saturation jitter in training (a factor in
            1 +- color_jitter); 0 disables it.
        eval_scale: resize factor of validation, test and predict images (and labels, nearest).
        val_batch_size: images per device and step in validation, test and predict.
        predict_root: folder of images to predict (searched recursively, ``find_images``); default: the
            images of ``test_split``.
        pin_memory: pin batches in page-locked memory for faster GPU copies.
    """

    def __init__(self, root: str, classes: list[str] | str = "classes.yaml", palette: list[Colour] | None = None,
                 img_dir: str = "images", ann_dir: str | list[str] = "annotations",
                 train_split: str | list[str] = "train", val_split: str | list[str] = "val",
                 test_split: str | list[str] | None = None, image_suffix: str | None = None,
                 label_suffix: str = ".png", ignore_index: int = IGNORE_INDEX, reduce_zero_label: bool = False,
                 ignore_colors: list[Colour] | None = None, batch_size: int = 2, num_workers: int = 4,
                 crop_size: tuple[int, int] = (512, 512), scale_range: tuple[float, float] = (0.5, 2.0),
                 flip_prob: float = 0.5, color_jitter: float = 0.2, eval_scale: float = 1.0, val_batch_size: int = 1,
                 predict_root: str | None = None, pin_memory: bool = True):
        super().__init__()
        check_augmentation(batch_size, val_batch_size, num_workers, crop_size, scale_range, flip_prob, color_jitter,
                           eval_scale)
        if ignore_index < 0:
            raise ValueError(f"ignore_index must be >= 0 (a label file value), got {ignore_index}")
        if isinstance(classes, str) and not classes:
            raise ValueError("classes must be class names or the path of a classes file, got ''")
        self.root = Path(root).absolute()
        self.classes, self.palette_arg = classes, palette
        self.img_dir, self.ann_dirs = img_dir, [ann_dir] if isinstance(ann_dir, str) else list(ann_dir)
        self.splits = {"train": train_split, "val": val_split, "test": val_split if test_split is None else test_split}
        self.image_suffix, self.label_suffix = image_suffix, label_suffix
        self.ignore_index, self.reduce_zero_label = ignore_index, reduce_zero_label
        self.ignore_colors_arg = ignore_colors or []
        self.batch_size, self.num_workers = batch_size, num_workers
        self.crop_size, self.scale_range = tuple(crop_size), tuple(scale_range)
        self.flip_prob, self.color_jitter, self.eval_scale = flip_prob, color_jitter, eval_scale
        self.val_batch_size, self.predict_root, self.pin_memory = val_batch_size, predict_root, pin_memory
        self.datasets: dict[str, SegmentationDataset] = {}
        self._loaded: tuple[list[str], LabelReader] | None = None

    # ------------------------------------------------------------------ classes
    def _classes(self) -> tuple[list[str], LabelReader]:
        """The class names and the label decoder, read once (from the classes file, if that is what ``classes`` is)."""
        if self._loaded is None:
            where, content = "data.init_args", {"classes": self.classes}
            if isinstance(self.classes, str):
                where = Path(self.root, self.classes)
                content = load_classes(where)
            names = content["classes"]
            if not isinstance(names, list) or not names:
                raise DatasetError(f"{where}: classes must be a non-empty list of names, got {names!r}")
            names = [str(n) for n in names]
            if len(set(names)) != len(names):
                raise DatasetError(f"{where}: class names repeat: {names}")
            if len(names) > IGNORE_INDEX:
                raise DatasetError(f"{where}: {len(names)} classes; at most {IGNORE_INDEX} (batches mark unlabelled "
                                   f"pixels {IGNORE_INDEX})")
            palette, source = content.get("palette"), where
            if self.palette_arg is not None:
                palette, source = self.palette_arg, "data.init_args.palette"
            if palette is not None:
                palette = _colours(palette, "palette", source)
                if len(palette) != len(names):
                    raise DatasetError(f"{source}: palette has {len(palette)} colours for {len(names)} classes")
            ignore_colors = [*content.get("ignore_colors", []), *self.ignore_colors_arg]
            ignore_colors = _colours(ignore_colors, "ignore_colors", where) if ignore_colors else ()
            low = 1 if self.reduce_zero_label else 0
            if low <= self.ignore_index < low + len(names):
                raise DatasetError(f"{where}: ignore_index {self.ignore_index} is also the file value of class "
                                   f"{names[self.ignore_index - low]!r}")
            reader = LabelReader(len(names), palette, self.ignore_index, self.reduce_zero_label, ignore_colors)
            self._loaded = names, reader
        return self._loaded

    @property
    def num_classes(self) -> int:
        """Number of classes, from the config or the classes file; no image is read (the CLI links it to the model)."""
        return len(self._classes()[0])

    @property
    def class_names(self) -> list[str]:
        """Class names; index = class id."""
        return list(self._classes()[0])

    @property
    def palette(self) -> list[Colour] | None:
        """RGB colour of each class, for predicted masks; None when the dataset gives none."""
        palette = self._classes()[1].palette
        return list(palette) if palette is not None else None

    # ------------------------------------------------------------------ data
    def samples(self, split: str, with_labels: bool = True) -> list[tuple[Path, Path | None]]:
        """(image, label) pairs of ``split`` ("train", "val" or "test"), each image once."""
        names = self.splits[split]
        pairs = {}
        for name in [names] if isinstance(names, str) else names:
            for image, label in find_pairs(require_dir(self.root, "dataset root"), self.img_dir, self.ann_dirs, name,
                                           self.image_suffix, self.label_suffix, with_labels):
                pairs.setdefault(image, label)
        return list(pairs.items())

    def read_mask(self) -> LabelReader:
        return self._classes()[1]
