"""Quickstart segmentation data: a tiny street-scene dataset in the real Cityscapes layout.

Sky, buildings, trees, sidewalk, road, cars and people drawn as polygons at 120x240 pixels (not a
multiple of 32, as 1024x2048 is not a multiple of FishNet's padded sizes either), with every file a
Cityscapes split holds: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` and, under ``gtFine``, the
``labelIds``, ``color`` and ``instanceIds`` PNGs and the ``polygons.json``. Each class has its own
colour family with noise, so a small model learns it in minutes; a strip at the bottom is left
unlabeled (label id 0, ignored in training), as the ego vehicle is in the real data. Deterministic:
the same files on every machine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from datamodules.cityscapes_labels import LABELS
from datamodules.common import write_once

_SPLITS = {"train": (("aachen", 16), ("bochum", 16)), "val": (("frankfurt", 8),), "test": (("berlin", 4),)}
HEIGHT, WIDTH = 120, 240
_LABEL_ID = {name: label_id for name, label_id, _, _ in LABELS}
_LABEL_COLOUR = np.array([colour for _, _, _, colour in LABELS], dtype=np.uint8)  # the official color.png coding
_THINGS = ("car", "person")  # classes with instance ids (label id * 1000 + index) in instanceIds.png
# Photo colour of each class (jittered per object, noisy per pixel); the unlabeled strip is near black.
_COLOURS = {"unlabeled": (25, 25, 25), "sky": (120, 175, 225), "building": (150, 105, 75),
            "vegetation": (60, 135, 45), "sidewalk": (185, 180, 165), "road": (85, 85, 95), "car": (35, 55, 165),
            "person": (215, 45, 150)}


def write_cityscapes(root: str | os.PathLike) -> Path:
    """Write the quickstart dataset under ``root`` in the Cityscapes layout; returns ``root``.

    Does nothing if ``root`` already holds it. Written to a temporary folder beside ``root`` and
    renamed, so another process never sees half a dataset.
    """
    return write_once(root, _complete, _write, "quickstart Cityscapes data")


def _write(tmp: Path) -> None:
    rng = np.random.default_rng(0)
    for split, cities in _SPLITS.items():
        for city, count in cities:
            for i in range(count):
                _write_frame(tmp, split, city, f"{city}_{i:06d}_000019", rng)


def _complete(root: Path) -> bool:
    return all((root / kind / split).is_dir() for kind in ("leftImg8bit", "gtFine") for split in _SPLITS)


def _write_frame(root: Path, split: str, city: str, name: str, rng: np.random.Generator) -> None:
    """Draw one scene's polygons into the photo, the label ids and the instance ids; save the five files."""
    photo = Image.new("RGB", (WIDTH, HEIGHT), _COLOURS["unlabeled"])
    label_ids = Image.new("L", (WIDTH, HEIGHT), _LABEL_ID["unlabeled"])
    instance_ids = Image.new("I", (WIDTH, HEIGHT), _LABEL_ID["unlabeled"])
    instances = dict.fromkeys(_THINGS, 0)
    objects = []
    for label, polygon in _scene(rng):
        label_id = _LABEL_ID[label]
        instance_id = label_id
        if label in _THINGS:
            instance_id = label_id * 1000 + instances[label]
            instances[label] += 1
        colour = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in _COLOURS[label])
        for image, fill in ((photo, colour), (label_ids, label_id), (instance_ids, instance_id)):
            ImageDraw.Draw(image).polygon(polygon, fill=fill)
        objects.append({"label": label, "polygon": [list(point) for point in polygon]})
    pixels = np.asarray(photo, dtype=np.float32) + rng.normal(0, 10, (HEIGHT, WIDTH, 3))
    images_dir, labels_dir = root / "leftImg8bit" / split / city, root / "gtFine" / split / city
    images_dir.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)
    # Level 1: the noise does not compress anyway, and writing stays fast.
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(images_dir / f"{name}_leftImg8bit.png",
                                                                   compress_level=1)
    label_ids.save(labels_dir / f"{name}_gtFine_labelIds.png")
    Image.fromarray(np.asarray(instance_ids).astype(np.uint16)).save(  # 16-bit, as the official files
        labels_dir / f"{name}_gtFine_instanceIds.png")
    Image.fromarray(_LABEL_COLOUR[np.asarray(label_ids)]).save(labels_dir / f"{name}_gtFine_color.png")
    polygons = {"imgHeight": HEIGHT, "imgWidth": WIDTH, "objects": objects}
    (labels_dir / f"{name}_gtFine_polygons.json").write_text(json.dumps(polygons))


def _scene(rng: np.random.Generator) -> list[tuple[str, list[tuple[int, int]]]]:
    """(label, polygon) in drawing order, back to front: sky, buildings, trees, sidewalk, road, cars, people."""
    horizon = int(rng.integers(45, 60))
    kerb = horizon + int(rng.integers(8, 14))  # sidewalk from the horizon to the kerb, then road
    road_end = HEIGHT - int(rng.integers(4, 12))  # below: unlabeled, like the ego vehicle's bonnet
    scene = [("sky", _box(0, 0, WIDTH, horizon))]
    for _ in range(int(rng.integers(2, 5))):
        x, top = int(rng.integers(-10, WIDTH - 30)), int(rng.integers(5, horizon - 12))
        scene.append(("building", _box(x, top, x + int(rng.integers(30, 80)), horizon)))
    for _ in range(int(rng.integers(0, 3))):
        scene.append(("vegetation", _ellipse(int(rng.integers(10, WIDTH - 10)), horizon - 10,
                                             int(rng.integers(12, 22)), int(rng.integers(9, 15)))))
    scene += [("sidewalk", _box(0, horizon, WIDTH, kerb)), ("road", _box(0, kerb, WIDTH, road_end))]
    for _ in range(int(rng.integers(1, 4))):
        width, height = int(rng.integers(36, 64)), int(rng.integers(16, 26))
        x, bottom = int(rng.integers(-10, WIDTH - width + 10)), int(rng.integers(kerb + height, road_end + 1))
        roof = bottom - height
        cabin = bottom - height // 2  # a body and a narrower cabin, one outline
        scene.append(("car", [(x, bottom), (x + width, bottom), (x + width, cabin), (x + 3 * width // 4, cabin),
                              (x + 2 * width // 3, roof), (x + width // 3, roof), (x + width // 4, cabin), (x, cabin)]))
    for _ in range(int(rng.integers(0, 3))):
        height = int(rng.integers(12, 18))
        scene.append(("person", _ellipse(int(rng.integers(8, WIDTH - 8)), kerb - height + 2, int(rng.integers(4, 7)),
                                         height)))
    return scene


def _box(x0: int, y0: int, x1: int, y1: int) -> list[tuple[int, int]]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _ellipse(cx: int, cy: int, rx: int, ry: int, points: int = 16) -> list[tuple[int, int]]:
    angles = np.linspace(0, 2 * np.pi, points, endpoint=False)
    return [(int(round(cx + rx * np.cos(a))), int(round(cy + ry * np.sin(a)))) for a in angles]
