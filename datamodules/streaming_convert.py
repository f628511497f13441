"""Convert ImageNet or COCO folders once into LitData shards, which ``datamodules.streaming`` streams.

Thousands of processes opening 1.3M small files over a network file system is what fails first on a
cluster; a few hundred 64 MB shards read in sequence (and cached per node when they come from
``s3://``) do not. ``litdata.optimize`` writes the shards here; the streaming datamodules read them.

    python -m datamodules.streaming convert --data imagenet --root /data/imagenet --output /data/imagenet-shards

``<output>/train`` and ``<output>/val`` hold the shards of each split: per image its encoded file bytes
(JPEG, as on disk: no decoded arrays), label, index in the folder datamodule's dataset and relative
path. ``<output>/classes.json`` holds the class names, so ``num_classes`` is known before any shard is read.

COCO (``convert --data coco``) stores per image its encoded bytes and the annotation record the folder datamodule
validated (``datamodules.coco.load_split``: boxes, labels, iscrowd, areas, segmentations, as JSON:
``coco_record_json``, read back by ``coco_image_from_json``), and copies the val (and test) annotation files to
``<output>/annotations``. The training shards hold what ``COCODataModule`` trains on: no crowd regions, no image
without another annotation (their ids are in ``classes.json``).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

try:
    from litdata import StreamingDataset, optimize
except ImportError as err:  # an optional extra: say which
    raise ImportError(f"datamodules.streaming_convert needs LitData: pip install 'fishnet-pl[streaming]' ({err})"
                      ) from err

from datamodules import coco
from datamodules.common import DatasetError, read_rgb
from datamodules.imagenet import ImageNetDataModule

log = logging.getLogger(__name__)
CLASSES_FILE = "classes.json"
ANNOTATIONS = "annotations"  # COCO: the evaluated splits' annotation files, copied beside the shards
SPLITS = ("train", "val", "test")


def is_url(path: str) -> bool:
    return "://" in path


def _encoded_sample(item: tuple[str, dict, bool]) -> dict | None:
    """``optimize``'s per-sample function: the file's bytes (checked to decode) and the sample's ``fields``."""
    path, fields, skip_unreadable = item
    try:
        data = Path(path).read_bytes()
        read_rgb(io.BytesIO(data))  # fail at conversion, naming the file, rather than in a training worker
    except (OSError, DatasetError) as err:
        reason = err.__cause__ or err  # read_rgb's own message names the in-memory file
        if not skip_unreadable:
            raise DatasetError(f"{path}: cannot be read or decoded as an image ({reason})") from err
        log.warning("skipping unreadable image %s: %s", path, reason)
        return None
    return {"image": data, **fields}


def convert_imagenet(root: str, output: str, num_workers: int | None = None, chunk_bytes: str = "64MB",
                     val_ground_truth: str | None = None, skip_unreadable: bool = False, seed: int = 0) -> dict:
    """Write ImageNet folders (``train/<wnid>/*``, ``val/<wnid>/*`` or a flat ``val`` with ``val_ground_truth``)
    as shards under ``output`` (a folder or an ``s3://`` URL); returns the ``classes.json`` record.

    The training images are written in a random order (``seed``): LitData shuffles shards and the images
    within each shard, so shards of one class each would make one-class batches.
    """
    _check_output(output)
    folder = ImageNetDataModule(root, val_ground_truth=val_ground_truth)
    folder.setup("fit")  # the folder datamodule's own sample lists: the stored index is its dataset index
    counts = {}
    for split in ("train", "val"):
        samples = folder.datasets[split].samples
        order = np.random.default_rng(seed).permutation(len(samples)) if split == "train" else range(len(samples))
        inputs = [(str(samples[i][0]), {"label": samples[i][1], "index": int(i),
                                        "path": samples[i][0].relative_to(folder.root).as_posix()}, skip_unreadable)
                  for i in order]
        counts[split] = _write_shards(inputs, f"{output.rstrip('/')}/{split}", num_workers, chunk_bytes)
    record = {"dataset": "imagenet", "classes": folder.classes, "class_names": folder.class_names,
              "num_classes": folder.num_classes,
              "images": counts, "source": str(folder.root)}
    _write_json(record, f"{output.rstrip('/')}/{CLASSES_FILE}")
    return record


def convert_coco(root: str, output: str, num_workers: int | None = None, chunk_bytes: str = "64MB",
                 train_split: str = "train2017", val_split: str = "val2017", test_split: str | None = None,
                 with_masks: bool = True, skip_unreadable: bool = False, seed: int = 0) -> dict:
    """Write COCO in its official layout (``datamodules.coco.COCODataModule``'s ``root``) as shards under
    ``output`` (a folder or an ``s3://`` URL); returns the ``classes.json`` record.

    Per image: the file's bytes and the annotation record ``COCODataModule`` validated (``with_masks=False``
    keeps annotations without a usable mask, as the folder datamodule does then). The training shards hold
    its training images (crowds removed, images without another annotation left out), in a random order
    (``seed``); ``test_split`` (one with annotations) is written only when it is not the val split.
    """
    _check_output(output)
    test_split = test_split if test_split not in (None, val_split) else None
    folder = coco.COCODataModule(root, train_split=train_split, val_split=val_split,
                                 test_split=test_split or val_split, batch_size=1, with_masks=with_masks)
    folder.setup("fit")  # load_split's records, as the folder datamodule trains and evaluates on them
    if test_split:
        folder.setup("test")
    counts, annotation_files = {}, {}
    for split in ("train", "val", "test") if test_split else ("train", "val"):
        images = folder.datasets[split].images
        order = np.random.default_rng(seed).permutation(len(images)) if split == "train" else range(len(images))
        inputs = [(str(images[i].path), {"annotations": coco_record_json(images[i]), "index": int(i),
                                         "path": images[i].path.relative_to(folder.root).as_posix()},
                   skip_unreadable) for i in order]
        counts[split] = _write_shards(inputs, f"{output.rstrip('/')}/{split}", num_workers, chunk_bytes)
        if split != "train":  # for a COCO evaluator, beside the shards
            source = folder.annotation_file(getattr(folder, f"{split}_split"))
            annotation_files[split] = f"{ANNOTATIONS}/{source.name}"
            _upload(source, f"{output.rstrip('/')}/{annotation_files[split]}")
    record = {"dataset": "coco", "categories": folder.categories, "num_classes": folder.num_classes,
              "splits": {"train": train_split, "val": val_split, "test": test_split or val_split},
              "annotation_files": annotation_files, "with_masks": with_masks,
              "skipped_train_image_ids": folder.skipped_train_image_ids, "images": counts, "source": str(folder.root)}
    _write_json(record, f"{output.rstrip('/')}/{CLASSES_FILE}")
    return record


def _check_output(output: str) -> None:
    """LitData's overwrite mode empties the split folders: only those of shards (no sub-folders, unlike the images')."""
    if is_url(output):
        return
    foreign = [p.name for p in sorted(Path(output).glob("*")) if p.name not in (CLASSES_FILE, ANNOTATIONS)
               and not (p.name in SPLITS and p.is_dir() and not any(c.is_dir() for c in p.iterdir()))]
    if foreign:
        raise DatasetError(f"{output}: holds {', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}, "
                           f"not only converted shards ({'/, '.join(SPLITS)}/, {CLASSES_FILE}, {ANNOTATIONS}/); "
                           "choose a new or empty --output folder")


def _write_shards(inputs: list[tuple[str, dict, bool]], target: str, num_workers: int | None,
                  chunk_bytes: str) -> int:
    """One split's shards at ``target``, in the order of ``inputs``; returns the number of images written."""
    print(f"{target.rsplit('/', 1)[-1]}: {len(inputs)} images -> {target}", file=sys.stderr, flush=True)
    # reorder_files=False: keep the shuffled order (LitData would sort the inputs by file size). Forked
    # workers start at once; spawned ones (LitData's default) re-import torch and albumentations, seconds each.
    optimize(fn=_encoded_sample, inputs=inputs, output_dir=target, chunk_bytes=chunk_bytes,
             num_workers=num_workers or os.cpu_count(), reorder_files=False, mode="overwrite", verbose=False,
             start_method="fork" if sys.platform == "linux" else None)
    return len(StreamingDataset(target))


def coco_record_json(record: coco.CocoImage) -> str:
    """A validated annotation record as JSON (float32 values round-trip exactly through JSON's doubles)."""
    return json.dumps({"image_id": record.image_id, "width": record.width, "height": record.height,
                       "boxes": record.boxes.tolist(), "labels": record.labels.tolist(),
                       "iscrowd": record.iscrowd.tolist(), "areas": record.areas.tolist(),
                       "segmentations": record.segmentations})


def coco_image_from_json(annotations: str, path: str) -> coco.CocoImage:
    fields = json.loads(annotations)
    return coco.CocoImage(
        image_id=fields["image_id"], path=Path(path), width=fields["width"], height=fields["height"],
        boxes=np.array(fields["boxes"], np.float32).reshape(-1, 4), labels=np.array(fields["labels"], np.int64),
        iscrowd=np.array(fields["iscrowd"], np.int64), areas=np.array(fields["areas"], np.float32),
        segmentations=fields["segmentations"])


def _write_json(record: dict, target: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / CLASSES_FILE
        local.write_text(json.dumps(record, indent=1))
        _upload(local, target)


def _upload(local: Path, target: str) -> None:
    """Copy a local file to ``target``, a path or an object-storage URL."""
    if not is_url(target):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, target)
        return
    from litdata.streaming.fs_provider import _get_fs_provider

    _get_fs_provider(target).upload_file(str(local), target)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m datamodules.streaming", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="write a dataset's folders as LitData shards, once")
    convert.add_argument("--data", choices=["imagenet", "coco"], required=True, help="the dataset layout to read")
    convert.add_argument("--root", required=True, help="dataset folder (ImageNet: train/<wnid>/*.JPEG, val/...; "
                                                       "COCO: <split>/*.jpg, annotations/instances_<split>.json)")
    convert.add_argument("--output", required=True, help="folder or s3:// URL for the shards and classes.json")
    convert.add_argument("--val-ground-truth", help="ImageNet, for a flat val/ folder: '<file> <wnid>' lines or "
                                                    "Kaggle's LOC_val_solution.csv")
    convert.add_argument("--train-split", default="train2017", help="COCO training split (default: train2017)")
    convert.add_argument("--val-split", default="val2017", help="COCO val split, which defines the categories "
                                                                "(default: val2017)")
    convert.add_argument("--test-split", help="COCO split with annotations for `test`, if not the val split")
    convert.add_argument("--no-masks", action="store_true",
                         help="COCO for box-only detectors: keep annotations without a usable mask")
    convert.add_argument("--num-workers", type=int, default=None, help="processes (default: one per core)")
    convert.add_argument("--chunk-bytes", default="64MB", help="shard size (default: 64MB)")
    convert.add_argument("--skip-unreadable", action="store_true",
                         help="leave out images that cannot be decoded (logged) instead of stopping")
    args = parser.parse_args(argv)
    common = {"num_workers": args.num_workers, "chunk_bytes": args.chunk_bytes, "skip_unreadable": args.skip_unreadable}
    if args.data == "coco":
        record = convert_coco(args.root, args.output, train_split=args.train_split, val_split=args.val_split,
                              test_split=args.test_split, with_masks=not args.no_masks, **common)
    else:
        record = convert_imagenet(args.root, args.output, val_ground_truth=args.val_ground_truth, **common)
    print(f"wrote {record['images']} images of {record['num_classes']} classes to {args.output}")
