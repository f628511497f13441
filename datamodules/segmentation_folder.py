"""Semantic segmentation on any dataset in folders.

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
value the files use for them. The augmentation, dataset and loaders are every segmentation datamodule's
(``datamodules.segmentation``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, UnidentifiedImageError

from datamodules.common import DatasetError, require_dir
from datamodules.segmentation import (
    IGNORE_INDEX,
    SegmentationDataModule,
    SegmentationDataset,
    check_augmentation,
    check_no_missing_labels,
)
from datamodules.segmentation import eval_transform as eval_transform  # checkpoints saved before the split name it here

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
Colour = tuple[int, int, int]


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


# ---------------------------------------------------------------------- the datamodule
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
        num_workers: data-loading processes per device; None: the machine's share (``default_num_workers``).
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
                 ignore_colors: list[Colour] | None = None, batch_size: int = 2, num_workers: int | None = None,
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
