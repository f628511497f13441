"""ImageNet as LitData shards: convert the folders once, then stream them from a local path or object storage.

Thousands of processes opening 1.3M small files over a network file system is what fails first on a
cluster; a few hundred 64 MB shards read in sequence (and cached per node when they come from
``s3://``) do not. ``litdata.optimize`` writes the shards, ``litdata.StreamingDataset`` reads them.

    python -m datamodules.streaming convert --data imagenet --root /data/imagenet --output /data/imagenet-shards
    fishnet-pl fit --config configs/imagenet/fishnet150.yaml --config configs/data/imagenet_streaming.yaml \\
        --data.init_args.shards s3://bucket/imagenet-shards

``<output>/train`` and ``<output>/val`` hold the shards of each split: per image its encoded file bytes
(JPEG, as on disk: no decoded arrays), label, index in the folder datamodule's dataset and relative
path. ``<output>/classes.json`` holds the class names, so ``num_classes`` is known before any shard is read.

Batches are the folder datamodule's (``datamodules.imagenet``: same decoding, the same transforms from the
same functions, same keys), except that ``path`` is relative to the converted root.

Exact resume: LitData's ``StreamingDataLoader`` has ``state_dict``/``load_state_dict``, which Lightning's fit
loop saves in every checkpoint and restores before iterating (``FitLoop.on_save_checkpoint``,
``_load_combined_loader_states``). The loader's state holds the epoch, the samples yielded and the dataset's
seed; each training image's augmentation is seeded by ``(seed, epoch, index)``, so a resumed run draws the
same crops whatever the workers, batch size or number of processes.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import albumentations as A
import lightning as L
import numpy as np
import torch

try:
    from litdata import StreamingDataLoader, StreamingDataset, optimize
    from litdata.streaming.sampler import ChunkedIndex
except ImportError as err:  # an optional extra: say which
    raise ImportError(f"datamodules.streaming needs LitData: pip install 'fishnet-pl[streaming]' ({err})") from err

from datamodules.common import DatasetError, read_rgb, seed_pipeline
from datamodules.imagenet import ImageNetDataModule, eval_transform, train_transform

log = logging.getLogger(__name__)
CLASSES_FILE = "classes.json"
SPLITS = ("train", "val")


def _is_url(path: str) -> bool:
    return "://" in path


def _encoded_sample(item: tuple[str, int, int, str, bool]) -> dict | None:
    """``optimize``'s per-sample function: the file's bytes (checked to decode), label, index and relative path."""
    path, label, index, relative, skip_unreadable = item
    try:
        data = Path(path).read_bytes()
        read_rgb(io.BytesIO(data))  # fail at conversion, naming the file, rather than in a training worker
    except (OSError, DatasetError) as err:
        reason = err.__cause__ or err  # read_rgb's own message names the in-memory file
        if not skip_unreadable:
            raise DatasetError(f"{path}: cannot be read or decoded as an image ({reason})") from err
        log.warning("skipping unreadable image %s: %s", path, reason)
        return None
    return {"image": data, "label": label, "index": index, "path": relative}


def convert_imagenet(root: str, output: str, num_workers: int | None = None, chunk_bytes: str = "64MB",
                     val_ground_truth: str | None = None, skip_unreadable: bool = False, seed: int = 0) -> dict:
    """Write ImageNet folders (``train/<wnid>/*``, ``val/<wnid>/*`` or a flat ``val`` with ``val_ground_truth``)
    as shards under ``output`` (a folder or an ``s3://`` URL); returns the ``classes.json`` record.

    The training images are written in a random order (``seed``): LitData shuffles shards and the images
    within each shard, so shards of one class each would make one-class batches.
    """
    # LitData's overwrite mode empties the split folders: only those of shards (no sub-folders, unlike the images').
    foreign = [p.name for p in sorted(Path(output).glob("*")) if p.name != CLASSES_FILE
               and not (p.name in SPLITS and p.is_dir() and not any(c.is_dir() for c in p.iterdir()))]
    if not _is_url(output) and foreign:
        raise DatasetError(f"{output}: holds {', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}, "
                           f"not only converted shards ({'/, '.join(SPLITS)}/, {CLASSES_FILE}); "
                           "choose a new or empty --output folder")
    folder = ImageNetDataModule(root, val_ground_truth=val_ground_truth)
    folder.setup("fit")  # the folder datamodule's own sample lists: the stored index is its dataset index
    counts = {}
    for split in SPLITS:
        samples = folder.datasets[split].samples
        order = np.random.default_rng(seed).permutation(len(samples)) if split == "train" else range(len(samples))
        inputs = [(str(samples[i][0]), samples[i][1], int(i), samples[i][0].relative_to(folder.root).as_posix(),
                   skip_unreadable) for i in order]
        target = f"{output.rstrip('/')}/{split}"
        print(f"{split}: {len(inputs)} images -> {target}", file=sys.stderr, flush=True)
        # reorder_files=False: keep the shuffled order (LitData would sort the inputs by file size). Forked
        # workers start at once; spawned ones (LitData's default) re-import torch and albumentations, seconds each.
        optimize(fn=_encoded_sample, inputs=inputs, output_dir=target, chunk_bytes=chunk_bytes,
                 num_workers=num_workers or os.cpu_count(), reorder_files=False, mode="overwrite", verbose=False,
                 start_method="fork" if sys.platform == "linux" else None)
        counts[split] = len(StreamingDataset(target))
    record = {"dataset": "imagenet", "classes": folder.classes, "num_classes": folder.num_classes,
              "images": counts, "source": str(folder.root)}
    _write_json(record, f"{output.rstrip('/')}/{CLASSES_FILE}")
    return record


def _write_json(record: dict, target: str) -> None:
    if not _is_url(target):
        Path(target).write_text(json.dumps(record, indent=1))
        return
    from litdata.streaming.fs_provider import _get_fs_provider

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / CLASSES_FILE
        local.write_text(json.dumps(record, indent=1))
        _get_fs_provider(target).upload_file(str(local), target)


def _read_json(source: str) -> dict:
    try:
        if not _is_url(source):
            return json.loads(Path(source).read_text())
        from litdata.streaming.fs_provider import _get_fs_provider

        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / CLASSES_FILE
            _get_fs_provider(source).download_file(source, str(local))
            return json.loads(local.read_text())
    except (OSError, ValueError) as err:  # missing, unreachable, or not JSON
        raise DatasetError(f"{source}: cannot read the shards' class list ({err}); convert the dataset first: "
                           "python -m datamodules.streaming convert --data imagenet --root ... --output ...") from err


class StreamingImageDataset(StreamingDataset):
    """The shards of one split through an albumentations pipeline: the folder ``ImageDataset``'s samples.

    With ``augment``, each image's pipeline is seeded from ``(seed, epoch, index)``: the same sample in
    the same epoch gets the same augmentation in any worker, process or resumed run.
    """

    def __init__(self, input_dir: str, transform: A.Compose, augment: bool, seed: int = 0,
                 cache_dir: str | None = None, max_cache_size: int | str | None = None, shuffle: bool = False):
        super().__init__(input_dir, cache_dir=cache_dir, max_cache_size=max_cache_size, shuffle=shuffle, seed=seed)
        self.image_transform, self.augment = transform, augment

    def load_state_dict(self, state_dict: dict) -> None:
        # The checkpointed run's seed: its shuffling and augmentation continue where they stopped.
        if state_dict:
            self.seed = state_dict["seed"]
        super().load_state_dict(state_dict)

    def __getitem__(self, index):
        item = super().__getitem__(index)
        if not isinstance(item, dict):  # slices: raw records
            return item
        try:
            image = read_rgb(io.BytesIO(item["image"]))
        except DatasetError as err:
            raise DatasetError(f"{self._shard_name(index)}: sample {item['index']} ({item['path']}) cannot be "
                               f"decoded as an image ({err.__cause__ or err})") from err
        if self.augment:
            seed = np.random.SeedSequence([self.seed, self.current_epoch, item["index"]]).generate_state(1)[0]
            seed_pipeline(self.image_transform, int(seed))
        return {"image": self.image_transform(image=image)["image"], "label": item["label"], "path": item["path"],
                "index": item["index"]}

    def _shard_name(self, index) -> str:
        name = f"{self.input_dir.url or self.input_dir.path}"
        if isinstance(index, ChunkedIndex):
            try:
                name += "/" + self.cache._reader.config._chunks[index.chunk_index]["filename"]
            except (AttributeError, IndexError, KeyError, TypeError):
                name += f" chunk {index.chunk_index}"
        return name


class ResumableStreamingDataLoader(StreamingDataLoader):
    """LitData's loader, whose resumed epoch is followed by a fresh one under Lightning too.

    After ``load_state_dict`` LitData replays the checkpoint's position until an iteration runs to its
    end; Lightning stops after ``len(loader)`` batches without exhausting the iterator, so LitData would
    replay the same position again in the next epoch (fewer batches, repeated images). An iteration
    that starts after the resumed one has started begins the next epoch instead.
    """

    _replaying = False

    def __iter__(self):
        if self.restore and self._replaying:
            self.restore = False  # the resumed epoch was served: StreamingDataLoader starts the next one
        self._replaying = self.restore
        yield from super().__iter__()


class StreamingImageNetDataModule(L.LightningDataModule):
    """ImageNet from LitData shards written by ``python -m datamodules.streaming convert``, with the folder
    datamodule's augmentation and batches (``datamodules.imagenet.ImageNetDataModule``; ``path`` is relative).

    Args:
        shards: the converted dataset: a folder, or an object-storage URL (``s3://bucket/imagenet-shards``;
            credentials as for boto3), holding ``train/``, ``val/`` and ``classes.json``.
        batch_size: images per device and step.
        num_workers: data-loading processes per device.
        image_size: training crop and evaluation center crop, in pixels; None: the backbone's
            ``pretrained_cfg`` input size (``fishnet-pl`` fills it in from ``--model.backbone``), else 224.
        val_resize: shorter side before the evaluation center crop; None: ``image_size`` divided by the
            backbone's ``crop_pct`` (filled in likewise), else ``image_size / 0.875``.
        cache_dir: where shards read from a URL are cached (node-local disk); default: LitData's.
        max_cache_size: cache budget, e.g. ``"200GB"``; default: LitData's (75% of the free space).
        pin_memory: pin batches in page-locked memory for faster GPU copies.
    """

    def __init__(self, shards: str, batch_size: int = 32, num_workers: int = 4, image_size: int | None = None,
                 val_resize: int | None = None, cache_dir: str | None = None, max_cache_size: str | None = None,
                 pin_memory: bool = True):
        super().__init__()
        image_size = image_size or 224
        if image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32 for FishNet, got {image_size}")
        self.shards = shards if _is_url(shards) else str(Path(shards).absolute())
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.image_size, self.val_resize = image_size, val_resize or round(image_size / 0.875)
        self.cache_dir, self.max_cache_size = cache_dir, max_cache_size
        self.datasets: dict[str, StreamingImageDataset] = {}
        self._record: dict | None = None

    @property
    def classes(self) -> list[str]:
        """The training split's class names (wnids), from ``classes.json``; index = label."""
        if self._record is None:
            self._record = _read_json(f"{self.shards.rstrip('/')}/{CLASSES_FILE}")
        return list(self._record["classes"])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def predict_config(self) -> dict:
        """How ``PredictFolderDataModule`` prepares images for a model trained on this data (checkpoints keep it)."""
        return {"transform": "datamodules.imagenet.eval_transform", "batch_size": self.batch_size,
                "transform_kwargs": {"image_size": self.image_size, "resize": self.val_resize}}

    def setup(self, stage: str) -> None:
        self.classes  # noqa: B018 -- a missing or unconverted dataset fails here, naming the path
        if stage == "fit":
            # The run's seed (seed_everything) for shuffling and augmentation; a checkpoint's loader state
            # brings back its own (StreamingImageDataset.load_state_dict).
            self.datasets["train"] = self._split("train", train_transform(self.image_size), augment=True,
                                                 seed=torch.initial_seed() % 2**32)
        self.datasets["val"] = self._split("val", eval_transform(self.image_size, self.val_resize), augment=False)

    def _split(self, split: str, transform: A.Compose, augment: bool, seed: int = 0) -> StreamingImageDataset:
        source = f"{self.shards.rstrip('/')}/{split}"
        if not _is_url(source) and not (Path(source) / "index.json").is_file():
            raise DatasetError(f"{source}: no LitData shards (index.json) of the {split} split")
        return StreamingImageDataset(source, transform, augment=augment, seed=seed, shuffle=augment,
                                     cache_dir=self.cache_dir, max_cache_size=self.max_cache_size)

    def _loader(self, split: str, train: bool) -> ResumableStreamingDataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"{split} data is not set up; call setup() with the matching stage first")
        # drop_last=False for evaluation: every image once (the metrics count each index once under DDP).
        return ResumableStreamingDataLoader(self.datasets[split], batch_size=self.batch_size,
                                            num_workers=self.num_workers, drop_last=train,
                                            pin_memory=self.pin_memory and torch.cuda.is_available())

    def train_dataloader(self) -> ResumableStreamingDataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> ResumableStreamingDataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> ResumableStreamingDataLoader:
        return self._loader("val", train=False)

    def predict_dataloader(self) -> ResumableStreamingDataLoader:
        return self._loader("val", train=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m datamodules.streaming", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="write a dataset's folders as LitData shards, once")
    convert.add_argument("--data", choices=["imagenet"], required=True, help="the dataset layout to read")
    convert.add_argument("--root", required=True, help="dataset folder (train/<wnid>/*.JPEG, val/...)")
    convert.add_argument("--output", required=True, help="folder or s3:// URL for the shards and classes.json")
    convert.add_argument("--val-ground-truth", help="for a flat val/ folder: '<file> <wnid>' lines or "
                                                    "Kaggle's LOC_val_solution.csv")
    convert.add_argument("--num-workers", type=int, default=None, help="processes (default: one per core)")
    convert.add_argument("--chunk-bytes", default="64MB", help="shard size (default: 64MB)")
    convert.add_argument("--skip-unreadable", action="store_true",
                         help="leave out images that cannot be decoded (logged) instead of stopping")
    args = parser.parse_args(argv)
    record = convert_imagenet(args.root, args.output, num_workers=args.num_workers, chunk_bytes=args.chunk_bytes,
                              val_ground_truth=args.val_ground_truth, skip_unreadable=args.skip_unreadable)
    print(f"wrote {record['images']} images of {record['num_classes']} classes to {args.output}")


if __name__ == "__main__":
    main()
