"""ImageNet and COCO as LitData shards: convert the folders once, then stream them from a local path or object storage.

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

COCO (``convert --data coco``; ``StreamingCOCODataModule``) stores per image its encoded bytes and the
annotation record the folder datamodule validated (``datamodules.coco.load_split``: boxes, labels, iscrowd,
areas, segmentations, as JSON), and copies the val (and test) annotation files to ``<output>/annotations``.
The training shards hold what ``COCODataModule`` trains on: no crowd regions, no image without another
annotation (their ids are in ``classes.json``). Batches are ``collate_detection``'s, ``paths`` relative.
Aspect-ratio grouping needs every image's size before the epoch starts, which a stream does not have:
batches mix wide and tall images (the detector pads each batch to its largest image).

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
import shutil
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

from datamodules import coco
from datamodules.common import DatasetError, init_worker, read_rgb, seed_pipeline
from datamodules.imagenet import ImageNetDataModule, eval_preprocessing, eval_transform, train_transform

log = logging.getLogger(__name__)
CLASSES_FILE = "classes.json"
ANNOTATIONS = "annotations"  # COCO: the evaluated splits' annotation files, copied beside the shards
SPLITS = ("train", "val", "test")


def _is_url(path: str) -> bool:
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
        inputs = [(str(images[i].path), {"annotations": _record_json(images[i]), "index": int(i),
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
    if _is_url(output):
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


def _record_json(record: coco.CocoImage) -> str:
    """A validated annotation record as JSON (float32 values round-trip exactly through JSON's doubles)."""
    return json.dumps({"image_id": record.image_id, "width": record.width, "height": record.height,
                       "boxes": record.boxes.tolist(), "labels": record.labels.tolist(),
                       "iscrowd": record.iscrowd.tolist(), "areas": record.areas.tolist(),
                       "segmentations": record.segmentations})


def _coco_image(annotations: str, path: str) -> coco.CocoImage:
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
    if not _is_url(target):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, target)
        return
    from litdata.streaming.fs_provider import _get_fs_provider

    _get_fs_provider(target).upload_file(str(local), target)


def _download(source: str, local: Path) -> Path:
    """``source`` itself when it is a path, else its object-storage file copied to ``local``."""
    if not _is_url(source):
        return Path(source)
    from litdata.streaming.fs_provider import _get_fs_provider

    local.parent.mkdir(parents=True, exist_ok=True)
    _get_fs_provider(source).download_file(source, str(local))
    return local


def _read_json(source: str, dataset: str = "imagenet") -> dict:
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return json.loads(_download(source, Path(tmp) / CLASSES_FILE).read_text())
    except (OSError, ValueError) as err:  # missing, unreachable, or not JSON
        raise DatasetError(f"{source}: cannot read the shards' class list ({err}); convert the dataset first: "
                           f"python -m datamodules.streaming convert --data {dataset} --root ... --output ...") from err


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
        return self.sample(item, image, index)

    def sample(self, item: dict, image: np.ndarray, index) -> dict:
        """The folder dataset's sample of a stored ``item`` and its decoded image (ImageNet's; see subclasses)."""
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


class StreamingCocoDataset(StreamingImageDataset):
    """COCO shards: ``CocoDataset``'s samples (``{"image", "target", "path"}``, ``datamodules.coco.detection_sample``),
    or with ``targets=False`` the predict samples (``{"image", "path", "image_id"}``)."""

    def __init__(self, input_dir: str, transform: A.Compose, augment: bool, with_masks: bool, targets: bool = True,
                 **kwargs):
        super().__init__(input_dir, transform, augment, **kwargs)
        self.with_masks, self.targets = with_masks, targets

    def sample(self, item: dict, image: np.ndarray, index) -> dict:
        record = _coco_image(item["annotations"], item["path"])
        if not self.targets:
            return {"image": self.image_transform(image=image)["image"], "path": item["path"],
                    "image_id": record.image_id}
        try:
            sample = coco.detection_sample(record, image, self.image_transform, self.with_masks)
        except DatasetError as err:  # its image and its record disagree: name the shard
            raise DatasetError(f"{self._shard_name(index)}: sample {item['index']}: {err}") from err
        return {**sample, "path": item["path"]}


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


class StreamingDataModule(L.LightningDataModule):
    """What the streaming datamodules share: the shards' place and cache, their ``classes.json`` record, the
    splits as ``StreamingImageDataset`` and LitData's resumable loaders (``collate_fn``: how items batch)."""

    dataset = ""  # the "dataset" of the classes.json this datamodule reads ("imagenet", "coco")
    collate_fn = None  # LitData's default collate

    def __init__(self, shards: str, batch_size: int, num_workers: int, cache_dir: str | None,
                 max_cache_size: str | None, pin_memory: bool):
        super().__init__()
        self.shards = shards if _is_url(shards) else str(Path(shards).absolute())
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.cache_dir, self.max_cache_size = cache_dir, max_cache_size
        self.datasets: dict[str, StreamingImageDataset] = {}
        self._record: dict | None = None

    @property
    def record(self) -> dict:
        """``classes.json``, written by the conversion (read once; a missing or foreign one fails naming it)."""
        if self._record is None:
            source = f"{self.shards.rstrip('/')}/{CLASSES_FILE}"
            record = _read_json(source, self.dataset)
            if record.get("dataset", "imagenet") != self.dataset:
                raise DatasetError(f"{source}: shards of {record.get('dataset')}, not {self.dataset}; convert with "
                                   f"python -m datamodules.streaming convert --data {self.dataset}")
            self._record = record
        return self._record

    def _split(self, split: str, transform: A.Compose, augment: bool, seed: int = 0,
               dataset_class: type[StreamingImageDataset] = StreamingImageDataset, **kwargs) -> StreamingImageDataset:
        source = f"{self.shards.rstrip('/')}/{split}"
        if not _is_url(source) and not (Path(source) / "index.json").is_file():
            raise DatasetError(f"{source}: no LitData shards (index.json) of the {split} split")
        return dataset_class(source, transform, augment=augment, seed=seed, shuffle=augment,
                             cache_dir=self.cache_dir, max_cache_size=self.max_cache_size, **kwargs)

    def _loader(self, split: str, train: bool) -> ResumableStreamingDataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"{split} data is not set up; call setup() with the matching stage first")
        # drop_last=False for evaluation: every image once (the metrics count each index once under DDP).
        return ResumableStreamingDataLoader(self.datasets[split], batch_size=self.batch_size,
                                            num_workers=self.num_workers, drop_last=train,
                                            pin_memory=self.pin_memory and torch.cuda.is_available(),
                                            collate_fn=self.collate_fn, worker_init_fn=init_worker)

    def train_dataloader(self) -> ResumableStreamingDataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> ResumableStreamingDataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> ResumableStreamingDataLoader:
        return self._loader("val", train=False)

    def predict_dataloader(self) -> ResumableStreamingDataLoader:
        return self._loader("val", train=False)


class StreamingImageNetDataModule(StreamingDataModule):
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

    dataset = "imagenet"

    def __init__(self, shards: str, batch_size: int = 32, num_workers: int = 4, image_size: int | None = None,
                 val_resize: int | None = None, cache_dir: str | None = None, max_cache_size: str | None = None,
                 pin_memory: bool = True):
        super().__init__(shards, batch_size, num_workers, cache_dir, max_cache_size, pin_memory)
        image_size = image_size or 224
        if image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32 for FishNet, got {image_size}")
        self.image_size, self.val_resize = image_size, val_resize or round(image_size / 0.875)

    @property
    def classes(self) -> list[str]:
        """The training split's class folders (wnids), from ``classes.json``; index = label."""
        return list(self.record["classes"])

    @property
    def class_names(self) -> list[str]:
        """Human names of ``classes`` as the folder datamodule read them (``LOC_synset_mapping.txt``) at
        conversion; the wnids for shards converted without them."""
        return list(self.record.get("class_names") or self.record["classes"])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def predict_config(self) -> dict:
        """How ``PredictFolderDataModule`` prepares images for a model trained on this data (checkpoints keep it)."""
        return {"transform": "datamodules.imagenet.eval_transform", "batch_size": self.batch_size,
                "transform_kwargs": {"image_size": self.image_size, "resize": self.val_resize},
                "preprocessing": eval_preprocessing(self.image_size, self.val_resize)}

    def setup(self, stage: str) -> None:
        self.classes  # noqa: B018 -- a missing or unconverted dataset fails here, naming the path
        if stage == "fit":
            # The run's seed (seed_everything) for shuffling and augmentation; a checkpoint's loader state
            # brings back its own (StreamingImageDataset.load_state_dict).
            self.datasets["train"] = self._split("train", train_transform(self.image_size), augment=True,
                                                 seed=torch.initial_seed() % 2**32)
        self.datasets["val"] = self._split("val", eval_transform(self.image_size, self.val_resize), augment=False)


class StreamingCOCODataModule(coco.CategoryLabels, StreamingDataModule):
    """COCO from LitData shards written by ``python -m datamodules.streaming convert --data coco``, with the
    folder datamodule's augmentation, targets and batches (``datamodules.coco.COCODataModule``; ``paths`` are
    relative to the converted root). Its evaluation attributes (``categories``, ``label_to_category_id``,
    ``val_annotation_file``, ...) come from the files the conversion wrote beside the shards.

    Unlike the folder datamodule, training batches mix wide and tall images (no aspect-ratio grouping: a
    stream does not know the sizes of the images to come); the detector pads each batch to its largest image.

    Args:
        shards: the converted dataset: a folder, or an object-storage URL (``s3://bucket/coco-shards``;
            credentials as for boto3), holding ``train/``, ``val/``, ``classes.json`` and ``annotations/``.
        batch_size: images per device and step.
        num_workers: data-loading processes per device.
        with_masks: add instance masks to the targets (for Mask R-CNN); the shards must have been
            converted with masks (the default).
        scale_range: training scale jitter, relative to each image's own size.
        flip_prob: probability of a horizontal flip in training.
        cache_dir: where shards (and annotation files) read from a URL are cached (node-local disk);
            default: LitData's cache, and a temporary folder for the annotation files.
        max_cache_size: cache budget, e.g. ``"200GB"``; default: LitData's (75% of the free space).
        pin_memory: pin batches in page-locked memory for faster GPU copies.
    """

    dataset = "coco"
    collate_fn = staticmethod(coco.collate_detection)

    def __init__(self, shards: str, batch_size: int = 2, num_workers: int = 4, with_masks: bool = True,
                 scale_range: tuple[float, float] = (0.8, 1.2), flip_prob: float = 0.5, cache_dir: str | None = None,
                 max_cache_size: str | None = None, pin_memory: bool = True):
        super().__init__(shards, batch_size, num_workers, cache_dir, max_cache_size, pin_memory)
        coco.check_augmentation(batch_size, num_workers, scale_range, flip_prob)
        self.with_masks, self.scale_range, self.flip_prob = with_masks, tuple(scale_range), flip_prob
        self._annotation_files: dict[str, str] = {}

    @property
    def categories(self) -> list[dict]:
        """The val split's categories sorted by id, as the folder datamodule read them."""
        return list(self.record["categories"])

    @property
    def skipped_train_image_ids(self) -> list[int]:
        """Training images with no usable (non-crowd) annotation, left out of the training shards."""
        return list(self.record["skipped_train_image_ids"])

    @property
    def val_annotation_file(self) -> str:
        """The val split's annotation file (a local copy when the shards are in object storage)."""
        return self.annotation_file("val")

    def annotation_file(self, split: str) -> str:
        """The converted ``val`` (or ``test``) split's annotation file, as a local path."""
        if split not in self._annotation_files:
            name = self.record["annotation_files"].get(split) or self.record["annotation_files"]["val"]
            source = f"{self.shards.rstrip('/')}/{name}"
            if _is_url(source):
                cache = Path(self.cache_dir or tempfile.mkdtemp(prefix="fishnet-coco-")) / ANNOTATIONS
                source = str(_download(source, cache / Path(name).name))
            self._annotation_files[split] = source
        return self._annotation_files[split]

    @property
    def predict_config(self) -> dict:
        """How ``PredictFolderDataModule`` prepares images for a model trained on this data (checkpoints keep it)."""
        return {"transform": "datamodules.coco.eval_transform", "collate": "datamodules.coco.collate_detection",
                "batch_size": self.batch_size, "preprocessing": {}}  # the image as it is: the detector resizes

    def setup(self, stage: str) -> None:
        if self.with_masks and not self.record["with_masks"]:
            raise DatasetError(f"{self.shards}: converted without masks (--no-masks); set with_masks: false "
                               "or convert again with masks")
        if stage == "fit":
            # Seeded as StreamingImageNetDataModule's; crowds and images without annotations were left out
            # of the training shards by the conversion, as COCODataModule's setup leaves them out.
            self.datasets["train"] = self._split("train", coco.train_transform(self.scale_range, self.flip_prob),
                                                 augment=True, seed=torch.initial_seed() % 2**32,
                                                 dataset_class=StreamingCocoDataset, with_masks=self.with_masks)
        if stage in ("fit", "validate"):
            self.datasets["val"] = self._eval_split("val")
        if stage == "test":  # without a converted test split, the val split (COCODataModule's default)
            self.datasets["test"] = self._eval_split("test" if "test" in self.record["annotation_files"] else "val")
        if stage == "predict":
            self.datasets["predict"] = self._eval_split("val", targets=False)

    def _eval_split(self, split: str, targets: bool = True) -> StreamingCocoDataset:
        return self._split(split, coco.eval_transform(), augment=False, dataset_class=StreamingCocoDataset,
                           with_masks=self.with_masks, targets=targets)

    def test_dataloader(self) -> ResumableStreamingDataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> ResumableStreamingDataLoader:
        return self._loader("predict", train=False)


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


if __name__ == "__main__":
    main()
