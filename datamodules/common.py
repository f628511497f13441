"""What every datamodule shares: reading images with errors that name the file, and
per-worker seeding of the albumentations random streams.

albumentations >= 2 keeps its own random generator inside each ``A.Compose`` and ignores the
global seeds, so forked DataLoader workers would all inherit the same generator state and
repeat each other's augmentations. ``seed_worker`` (the loaders' ``worker_init_fn``) reseeds
the dataset's pipeline from torch's per-worker seed, which torch derives from the run seed
(``seed_everything``) and the worker id.

Every datamodule delivers images as float32 in [0, 1] (the uint8 value / 255, ``A.ToFloat(max_value=255)``),
``[3, H, W]``, unnormalised: the model normalises with its backbone's timm ``pretrained_cfg`` mean/std.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


class DatasetError(ValueError):
    """A dataset file is missing, unreadable or inconsistent; the message names the file."""


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode any image file as an ``H x W x 3`` uint8 RGB array.

    Handles what real datasets contain: CMYK and grayscale JPEGs, palette PNGs, and PNG data in
    a file named ``.JPEG``. A truncated or unreadable file raises ``DatasetError`` naming it.
    """
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError as err:
        raise DatasetError(f"{path}: image file does not exist") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DatasetError(f"{path}: cannot be decoded as an image ({err})") from err


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """Decode a single-channel label PNG as an ``H x W`` uint8 array, keeping the raw ids."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "P", "I", "I;16"):
                raise DatasetError(f"{path}: label image has mode {image.mode!r}, expected one channel")
            return np.asarray(image).astype(np.int64)
    except FileNotFoundError as err:
        raise DatasetError(f"{path}: label file does not exist") from err
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DatasetError(f"{path}: cannot be decoded as a label image ({err})") from err


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: give this worker's augmentation pipeline its own random stream."""
    info = torch.utils.data.get_worker_info()
    reseed = getattr(info.dataset, "reseed", None)
    if reseed is not None:
        reseed(info.seed % 2**32)


def seed_pipeline(transform, seed: int) -> None:
    """Give an ``A.Compose`` one random stream shared by all its transforms.

    (``Compose.set_random_seed`` would seed every transform with the same number, so a crop and a
    flip would draw identical sequences.)
    """
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))


def pipeline_state(transform) -> dict:
    """The random state of a pipeline seeded by ``seed_pipeline`` (plain values, checkpoint-safe)."""
    return {"numpy": transform.random_generator.bit_generator.state, "python": transform.py_random.getstate()}


def load_pipeline_state(transform, state: dict) -> None:
    generator, py_random = np.random.default_rng(), random.Random()
    generator.bit_generator.state = state["numpy"]
    py_random.setstate(state["python"])
    transform.set_random_state(generator, py_random)


def write_once(root: str | os.PathLike, complete: Callable[[Path], bool], write: Callable[[Path], None],
               what: str) -> Path:
    """Write a generated dataset into ``root`` unless ``complete(root)`` says it is there; returns ``root``.

    ``write`` fills a temporary folder beside ``root`` that is then renamed, so another process never
    sees half a dataset; if another process finished first, its copy stays.
    """
    root = Path(root)
    if complete(root):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        write(tmp)
        tmp.rename(root)  # replaces a missing or empty root atomically
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not complete(root):  # not another process finishing first: root holds something else
            raise DatasetError(f"{root}: exists and is not empty, but holds no {what}; to read the dataset "
                               "there, set quickstart: false (--data.init_args.quickstart false)") from None
    return root


def require_dir(path: str | os.PathLike, what: str) -> Path:
    """Return ``path`` as a Path, or raise ``DatasetError`` saying which directory is missing."""
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"{path}: {what} directory does not exist")
    return path


class AugmentedDataModule(L.LightningDataModule):
    """A datamodule whose ``datasets["train"]`` has a seeded albumentations ``transform``.

    Checkpoints carry the main-process augmentation stream (what ``num_workers=0`` draws from), so a
    resumed run continues it; worker processes reseed from the run seed each epoch (``seed_worker``).
    """

    datasets: dict

    def state_dict(self) -> dict:
        return {"train_pipeline": pipeline_state(self.datasets["train"].transform)} if "train" in self.datasets else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if "train_pipeline" in state_dict and "train" in self.datasets:
            load_pipeline_state(self.datasets["train"].transform, state_dict["train_pipeline"])
