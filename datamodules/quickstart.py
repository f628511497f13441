"""Quickstart classification data: a tiny dataset in the real ImageNet folder layout.

Four classes of coloured shapes on noisy backgrounds, written as real JPEG files with ImageNet's
``LOC_synset_mapping.txt`` naming them, so the quickstart runs the same loader, and gets its class names
the same way, as ImageNet itself. Deterministic: the same files on every machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from datamodules.common import write_once
from datamodules.imagenet_labels import SYNSET_MAPPING

# Fake WordNet ids (the class folders), one per shape; sorted order = label order.
CLASSIFICATION_CLASSES = ("n00000001", "n00000002", "n00000003", "n00000004")
CLASSIFICATION_NAMES = ("circle", "square", "triangle", "stripes")  # the class names, as LOC_synset_mapping.txt says
_IMAGES_PER_CLASS = {"train": 48, "val": 12}
_SIZE = 72


def write_classification(root: str | os.PathLike) -> Path:
    """Write the quickstart dataset under ``root`` (``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``,
    ``LOC_synset_mapping.txt``); returns ``root``.

    Does nothing if ``root`` already holds it. Written to a temporary folder beside ``root`` and
    renamed, so another process never sees half a dataset.
    """
    root = write_once(root, _complete, _write, "quickstart classification data")
    if not (root / SYNSET_MAPPING).is_file():  # a quickstart folder written before the names were
        _write_mapping(root)
    return root


def _write_mapping(root: Path) -> None:
    tmp = root / f".{SYNSET_MAPPING}.{os.getpid()}"
    tmp.write_text("".join(f"{wnid} {name}\n" for wnid, name in zip(CLASSIFICATION_CLASSES, CLASSIFICATION_NAMES)))
    tmp.replace(root / SYNSET_MAPPING)  # atomic: a reader sees the whole file or none


def _write(tmp: Path) -> None:
    _write_mapping(tmp)
    rng = np.random.default_rng(0)
    for split, count in _IMAGES_PER_CLASS.items():
        for wnid, shape in zip(CLASSIFICATION_CLASSES, CLASSIFICATION_NAMES):
            folder = tmp / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                _draw(shape, rng).save(folder / f"{wnid}_{i:04d}.JPEG", quality=90)


def _complete(root: Path) -> bool:
    return all((root / split).is_dir() for split in _IMAGES_PER_CLASS)


# Each class has its shape and its colour family, so even a small random crop carries the class.
_COLOURS = {"circle": (230, 40, 40), "square": (40, 200, 40), "triangle": (40, 60, 230), "stripes": (230, 210, 30)}


def _draw(shape: str, rng: np.random.Generator) -> Image.Image:
    """One large shape of the class's colour (jittered) at a random size and position on grey noise."""
    pixels = np.clip(rng.integers(60, 190) + rng.normal(0, 25, (_SIZE, _SIZE, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    colour = tuple(int(np.clip(c + rng.integers(-30, 30), 0, 255)) for c in _COLOURS[shape])
    r = int(rng.integers(20, 30))
    cx, cy = (int(c) for c in rng.integers(r + 2, _SIZE - r - 2, 2))
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:
        for x in range(cx - r, cx + r, 8):
            draw.rectangle([x, cy - r, x + 3, cy + r], fill=colour)
    return image
