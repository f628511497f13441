"""Quickstart detection data: a tiny dataset in the real COCO 2017 layout.

Big, high-contrast circles, squares and triangles (1-3 per image) on grey noise, with polygon
masks, written as ``train2017/*.jpg``, ``val2017/*.jpg`` and ``annotations/instances_*.json``, so the
quickstart runs the same loader as COCO itself. It also holds what real COCO holds and a loader
must handle: non-contiguous category ids, crowd regions stored as RLE, a training image without
annotations, wide and tall images. Deterministic: the same files on every machine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image, ImageDraw

from datamodules.common import write_once

# Non-contiguous on purpose, as in COCO (ids 1..90 for 80 classes).
DETECTION_CATEGORIES = (
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 3, "name": "square", "supercategory": "shape"},
    {"id": 7, "name": "triangle", "supercategory": "shape"},
)
_COLOURS = {1: (230, 40, 40), 3: (40, 200, 40), 7: (40, 60, 230)}
_SPLITS = {"train2017": (40, 1000), "val2017": (10, 2000)}  # split: (images, first image id)
_SIZES = ((160, 128), (128, 160), (144, 144), (176, 112), (112, 176))  # (width, height): wide, tall, square
_EMPTY_IMAGE, _CROWD_IMAGE = 0, 1  # indices (per split) of the image without objects and the one with a crowd


def write_detection(root: str | os.PathLike) -> Path:
    """Write the quickstart dataset under ``root`` in the COCO 2017 layout; returns ``root``.

    Does nothing if ``root`` already holds it. Written to a temporary folder beside ``root`` and
    renamed, so another process never sees half a dataset.
    """
    return write_once(root, _complete, _write, "quickstart detection data")


def _write(tmp: Path) -> None:
    rng = np.random.default_rng(0)
    (tmp / "annotations").mkdir()
    annotation_id = 1
    for split, (count, first_id) in _SPLITS.items():
        (tmp / split).mkdir()
        images, annotations = [], []
        for i in range(count):
            image_id, (width, height) = first_id + i, _SIZES[i % len(_SIZES)]
            n_objects = 0 if split == "train2017" and i == _EMPTY_IMAGE else int(rng.integers(1, 4))
            image, objects = _draw(rng, width, height, n_objects, crowd=i == _CROWD_IMAGE)
            file_name = f"{image_id:012d}.jpg"
            image.save(tmp / split / file_name, quality=95)
            images.append({"id": image_id, "file_name": file_name, "width": width, "height": height,
                           "license": 1, "date_captured": "2024-01-01 00:00:00"})
            for obj in objects:
                annotations.append({"id": annotation_id, "image_id": image_id, **obj})
                annotation_id += 1
        dataset = {
            "info": {"description": "fishnet-pl quickstart detection", "version": "1.0", "year": 2024,
                     "contributor": "fishnet-pl", "url": "", "date_created": "2024-01-01"},
            "licenses": [{"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
            "images": images, "annotations": annotations, "categories": list(DETECTION_CATEGORIES),
        }
        (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(dataset))


def _complete(root: Path) -> bool:
    return all((root / "annotations" / f"instances_{split}.json").is_file() for split in _SPLITS)


def _draw(rng: np.random.Generator, width: int, height: int, n_objects: int, crowd: bool):
    """A noisy grey image with ``n_objects`` non-overlapping shapes (plus a crowd of dots); their annotations."""
    pixels = rng.integers(60, 190) + rng.normal(0, 20, (height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    taken: list[tuple[float, float, float, float]] = []
    objects = []
    if crowd:  # a cluster of small dots, annotated as one crowd region (uncompressed RLE, as COCO stores crowds)
        x0, y0 = int(rng.integers(4, width - 44)), int(rng.integers(4, height - 34))
        taken.append((x0, y0, x0 + 40, y0 + 30))
        region = Image.new("L", (width, height))
        for _ in range(8):
            cx, cy, r = x0 + rng.integers(4, 36), y0 + rng.integers(4, 26), int(rng.integers(2, 4))
            for target, fill in ((draw, _colour(rng, 1)), (ImageDraw.Draw(region), 1)):
                target.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        mask = np.asarray(region, dtype=np.uint8)
        ys, xs = np.nonzero(mask)
        bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
        objects.append({"category_id": 1, "iscrowd": 1, "segmentation": _uncompressed_rle(mask),
                        "area": float(mask.sum()), "bbox": bbox})
    for _ in range(n_objects):
        category = DETECTION_CATEGORIES[int(rng.integers(len(DETECTION_CATEGORIES)))]["id"]
        for _attempt in range(100):
            r = float(rng.integers(18, 32))
            cx, cy = float(rng.uniform(r + 2, width - r - 2)), float(rng.uniform(r + 2, height - r - 2))
            box = (cx - r, cy - r, cx + r, cy + r)
            if not any(box[0] < t[2] + 4 and t[0] < box[2] + 4 and box[1] < t[3] + 4 and t[1] < box[3] + 4
                       for t in taken):
                break
        else:
            continue  # no room left in this image
        taken.append(box)
        polygon = _polygon(category, cx, cy, r)
        draw.polygon(polygon, fill=_colour(rng, category))
        flat = [round(v, 2) for point in polygon for v in point]
        xs, ys = flat[0::2], flat[1::2]
        rle = mask_utils.merge(mask_utils.frPyObjects([flat], height, width))
        objects.append({"category_id": category, "iscrowd": 0, "segmentation": [flat],
                        "area": float(mask_utils.area(rle)),
                        "bbox": [min(xs), min(ys), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)]})
    return image, objects


def _polygon(category: int, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if category == 1:  # circle as a 32-gon
        angles = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles]
    if category == 3:
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]


def _colour(rng: np.random.Generator, category: int) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-30, 30), 0, 255)) for c in _COLOURS[category])


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with a run of zeros."""
    flat = mask.flatten(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    return {"counts": [0, *counts] if flat[0] else counts, "size": list(mask.shape)}
