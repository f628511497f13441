"""ImageNet and COCO streamed from LitData shards, in a local folder or object storage.

The shards are written once by ``python -m datamodules.streaming convert`` (``datamodules.streaming_convert``, which
describes what they hold); ``litdata.StreamingDataset`` reads them:

    python -m datamodules.streaming convert --data imagenet --root /data/imagenet --output /data/imagenet-shards
    fishnet-pl fit --config configs/imagenet/fishnet150.yaml --config configs/data/imagenet_streaming.yaml \\
        --data.init_args.shards s3://bucket/imagenet-shards

Batches are the folder datamodule's (``datamodules.imagenet``: same decoding, the same transforms from the
same functions, same keys), except that ``path`` is relative to the converted root. COCO's
(``StreamingCOCODataModule``) are ``collate_detection``'s, ``path`` relative. Aspect-ratio grouping needs every
image's size before the epoch starts, which a stream does not have: batches mix wide and tall images (the detector
pads each batch to its largest image).

Exact resume: LitData's ``StreamingDataLoader`` has ``state_dict``/``load_state_dict``, which Lightning's fit
loop saves in every checkpoint and restores before iterating. The loader's state holds the epoch, the samples
yielded and the dataset's seed; each training image's augmentation is seeded by ``(seed, epoch, index)``, so a
resumed run draws the same crops whatever the workers, batch size or number of processes.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from pathlib import Path

import albumentations as A
import lightning as L
import numpy as np
import torch

try:
    from litdata import StreamingDataLoader, StreamingDataset
    from litdata.streaming.sampler import ChunkedIndex
except ImportError as err:  # an optional extra: say which
    raise ImportError(f"datamodules.streaming needs LitData: pip install 'fishnet-pl[streaming]' ({err})") from err

from datamodules import coco
from datamodules.common import DatasetError, SplitLoaders, init_worker, read_rgb, seed_pipeline
from datamodules.dataset_info import DatasetInfo
from datamodules.imagenet import classification_info, eval_transform, train_transform
from datamodules.streaming_convert import ANNOTATIONS, CLASSES_FILE, coco_image_from_json, is_url, main

log = logging.getLogger(__name__)


def _download(source: str, local: Path) -> Path:
    """``source`` itself when it is a path, else its object-storage file copied to ``local``."""
    if not is_url(source):
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
        record = coco_image_from_json(item["annotations"], item["path"])
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


class StreamingDataModule(SplitLoaders, L.LightningDataModule):
    """What the streaming datamodules share: the shards' place and cache, their ``classes.json`` record, the
    splits as ``StreamingImageDataset`` and LitData's resumable loaders (``collate_fn``: how items batch)."""

    dataset = ""  # the "dataset" of the classes.json this datamodule reads ("imagenet", "coco")
    collate_fn = None  # LitData's default collate
    stage_splits = {"train": "train", "val": "val", "test": "val", "predict": "val"}  # converted: train and val

    def __init__(self, shards: str, batch_size: int, num_workers: int | None, cache_dir: str | None,
                 max_cache_size: str | None, pin_memory: bool):
        super().__init__()
        self.shards = shards if is_url(shards) else str(Path(shards).absolute())
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
        if not is_url(source) and not (Path(source) / "index.json").is_file():
            raise DatasetError(f"{source}: no LitData shards (index.json) of the {split} split")
        return dataset_class(source, transform, augment=augment, seed=seed, shuffle=augment,
                             cache_dir=self.cache_dir, max_cache_size=self.max_cache_size, **kwargs)

    def loader(self, dataset: StreamingImageDataset, train: bool) -> ResumableStreamingDataLoader:
        # LitData's loader; the dataset shuffles. drop_last=False for evaluation: every image once (the metrics
        # count each index once under DDP).
        return ResumableStreamingDataLoader(dataset, batch_size=self.batch_size, num_workers=self.workers,
                                            drop_last=train, pin_memory=self.pin_memory and torch.cuda.is_available(),
                                            collate_fn=self.collate_fn, worker_init_fn=init_worker)


class StreamingImageNetDataModule(StreamingDataModule):
    """ImageNet from LitData shards written by ``python -m datamodules.streaming convert``, with the folder
    datamodule's augmentation and batches (``datamodules.imagenet.ImageNetDataModule``; ``path`` is relative).

    Args:
        shards: the converted dataset: a folder, or an object-storage URL (``s3://bucket/imagenet-shards``;
            credentials as for boto3), holding ``train/``, ``val/`` and ``classes.json``.
        batch_size: images per device and step.
        num_workers: data-loading processes per device; None: the machine's share (``default_num_workers``).
        image_size: training crop and evaluation center crop, in pixels; None: the backbone's
            ``pretrained_cfg`` input size (``fishnet-pl`` fills it in from ``--model.backbone``), else 224.
        val_resize: shorter side before the evaluation center crop; None: ``image_size`` divided by the
            backbone's ``crop_pct`` (filled in likewise), else ``image_size / 0.875``.
        cache_dir: where shards read from a URL are cached (node-local disk); default: LitData's.
        max_cache_size: cache budget, e.g. ``"200GB"``; default: LitData's (75% of the free space).
        pin_memory: pin batches in page-locked memory for faster GPU copies.
    """

    dataset = "imagenet"

    def __init__(self, shards: str, batch_size: int = 32, num_workers: int | None = None, image_size: int | None = None,
                 val_resize: int | None = None, cache_dir: str | None = None, max_cache_size: str | None = None,
                 pin_memory: bool = True):
        super().__init__(shards, batch_size, num_workers, cache_dir, max_cache_size, pin_memory)
        image_size = image_size or 224
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
    def dataset_info(self) -> DatasetInfo:
        """Class names and the evaluation transform (``DatasetInfo``; checkpoints keep it)."""
        return classification_info(self.class_names, self.image_size, self.val_resize, self.batch_size)

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
        num_workers: data-loading processes per device; None: the machine's share (``default_num_workers``).
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
    stage_splits = SplitLoaders.stage_splits  # setup picks each stage's split (test: a converted test split or val)

    def __init__(self, shards: str, batch_size: int = 2, num_workers: int | None = None, with_masks: bool = True,
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
            if is_url(source):
                cache = Path(self.cache_dir or tempfile.mkdtemp(prefix="fishnet-coco-")) / ANNOTATIONS
                source = str(_download(source, cache / Path(name).name))
            self._annotation_files[split] = source
        return self._annotation_files[split]

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


if __name__ == "__main__":  # python -m datamodules.streaming convert ...: the converter's command, kept here
    main()
