"""What every datamodule shares: reading images with errors that name the file, per-worker seeding
of the albumentations random streams, and loading workers that outlive a scheduler's SIGTERM.

albumentations >= 2 keeps its own random generator inside each ``A.Compose`` and ignores the
global seeds, so forked DataLoader workers would all inherit the same generator state and
repeat each other's augmentations. ``init_worker`` (the loaders' ``worker_init_fn``) reseeds
the dataset's pipeline from torch's per-worker seed, which torch derives from the run seed
(``seed_everything``) and the worker id.

Every loader is torchdata's ``StatefulDataLoader`` (``make_loader``): Lightning saves its ``state_dict``
in each checkpoint (the position in the epoch, the shuffling seed, the workers' seed and each worker's
augmentation stream, from ``AugmentedDataset.state_dict``), so a run resumed mid-epoch sees the same
batches, augmented the same way, as the run that was interrupted.

Every datamodule delivers images as float32 in [0, 1] (the uint8 value / 255, ``A.ToFloat(max_value=255)``),
``[3, H, W]``, unnormalised: the model normalises with its backbone's timm ``pretrained_cfg`` mean/std.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, default_collate
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import RandomSampler as StatefulRandomSampler

# torchdata 0.11 calls torch.set_vital in every StatefulDataLoader (Lightning re-creates them under DDP): a
# deprecation warning of torch 2.14 that says nothing to a user.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)


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


#: What ``find_images`` collects (a folder to predict): the formats Pillow decodes that cameras and datasets use.
PREDICT_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def find_images(folder: str | Path) -> list[Path]:
    """Every image file under ``folder`` (recursively, by extension, any case), sorted."""
    folder = require_dir(folder, "predict_root")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in PREDICT_EXTENSIONS and p.is_file())
    if not paths:
        raise DatasetError(f"{folder}: no image files ({' '.join(PREDICT_EXTENSIONS)}) in it or its subfolders")
    return paths


def init_worker(worker_id: int) -> None:
    """``worker_init_fn`` of every loader: the worker outlives a SIGTERM not sent by its main process, and its
    augmentation pipeline gets its own random stream."""
    _exit_only_on_parents_sigterm()
    info = torch.utils.data.get_worker_info()
    reseed = getattr(info.dataset, "reseed", None)
    if reseed is not None:
        reseed(info.seed % 2**32)


def _exit_only_on_parents_sigterm() -> None:
    """In a loader worker: exit quietly on its main process's SIGTERM, ignore anyone else's.

    A scheduler's SIGTERM reaches every process of the job (SLURM's cgroup, ``timeout``, ``docker stop``,
    Kubernetes), data-loading workers included. The main process then finishes its batch and saves ``last.ckpt``
    (``fishnet_pl.callbacks.LastCheckpoint``), which needs its workers; a worker dying of the signal stops it with
    "DataLoader worker is killed by signal: Terminated". Its main process's SIGTERM (``Process.terminate`` when
    loaders or the interpreter shut down) must still end it: torch's own worker handler tells the two apart by
    the sender, and so does this thread (the signal is blocked in every other thread, so it alone receives it).
    """
    if not hasattr(signal, "sigwaitinfo"):  # macOS and Windows: workers keep the default (die with the job)
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from here on inherit the mask

    def wait() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(0)  # as torch's handler does: the main process is stopping its workers

    threading.Thread(target=wait, name="sigterm", daemon=True).start()


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


class AugmentedDataset(Dataset):
    """A map-style dataset whose albumentations ``transform`` draws from its own random stream.

    ``reseed`` starts the stream (``init_worker`` calls it in each loader worker); ``state_dict`` /
    ``load_state_dict`` make the dataset ``Stateful`` for torchdata's ``StatefulDataLoader``, which
    snapshots it in every worker with each batch and restores it in the new workers of a resumed run.
    """

    transform: Any

    def reseed(self, seed: int) -> None:
        seed_pipeline(self.transform, seed)

    def state_dict(self) -> dict:
        return pipeline_state(self.transform)

    def load_state_dict(self, state_dict: dict) -> None:
        load_pipeline_state(self.transform, state_dict)


class ResumableRandomSampler(StatefulRandomSampler, torch.utils.data.RandomSampler):
    """Shuffles like torch's ``RandomSampler``, and resumes mid-epoch like torchdata's.

    Each epoch's order comes from a seed drawn from torch's global random state when the epoch starts,
    as torch's sampler does, so the run seed fixes it and ``RNGStateCheckpoint`` continues it across
    an epoch boundary (torchdata's own sampler seeds its generator once, when the loader is built, so a
    run resumed at epoch 3 would shuffle like epoch 1). torchdata's iterator saves the position inside
    the epoch; ``state_dict`` saves the epoch's seed. Also a torch ``RandomSampler``, which is how
    Lightning knows to shuffle in the ``DistributedSampler`` it puts in its place under DDP.
    """

    def __init__(self, data_source):
        super().__init__(data_source, generator=torch.Generator())
        self._epoch_state: torch.Tensor | None = None
        self._resume_state: torch.Tensor | None = None

    def __iter__(self):
        if self._resume_state is not None:
            self.generator.set_state(self._resume_state)
            self._resume_state = None
        else:
            self.generator.manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
        self._epoch_state = self.generator.get_state()
        return super().__iter__()

    def state_dict(self) -> dict:
        return {"epoch_generator": self._epoch_state}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume_state = state_dict["epoch_generator"]


def default_num_workers(processes: int = 1) -> int:
    """Data-loading workers per training process for a datamodule whose ``num_workers`` is None: the cores this
    process may run on (``os.sched_getaffinity``: a cluster job's share, not the whole machine) divided among the
    node's ``processes``, one core left to each process's own steps; at least 1. ``python -m bench.fit --workers``
    measures the share of each step spent waiting for data."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, processes) - 1)


def loader_workers(num_workers: int | None, trainer: Any = None) -> int:
    """``num_workers`` as given, or for None ``default_num_workers`` among the trainer's processes on this node."""
    if num_workers is not None:
        return num_workers
    return default_num_workers(getattr(trainer, "num_devices", 1) if trainer is not None else 1)


def make_loader(dataset: Dataset, *, batch_size: int = 1, shuffle: bool = False, drop_last: bool = False,
                num_workers: int = 0, pin_memory: bool = False, collate_fn: Callable | None = None,
                batch_sampler: Any = None) -> StatefulDataLoader:
    """The data loader of every datamodule: torchdata's ``StatefulDataLoader``, resumable mid-epoch.

    Lightning saves the training loader's ``state_dict`` in each checkpoint and restores it on
    ``--ckpt_path``: the position in the epoch, the epoch's shuffling seed (``ResumableRandomSampler``;
    a ``batch_sampler`` should be ``Stateful`` too), the workers' base seed and each worker's
    augmentation stream (an ``AugmentedDataset``'s ``state_dict``, snapshot with every batch).
    ``init_worker`` seeds each worker's stream from the run seed; workers are not persistent, so each
    epoch's workers draw fresh seeds from the (checkpointed) global random state. ``pin_memory`` only
    applies on a GPU machine.
    """
    if batch_sampler is not None:
        batching = {"batch_sampler": batch_sampler}
    else:
        sampler = ResumableRandomSampler(dataset) if shuffle else None
        batching = {"batch_size": batch_size, "sampler": sampler, "drop_last": drop_last}
    return StatefulDataLoader(dataset, num_workers=num_workers, collate_fn=collate_fn,
                              pin_memory=pin_memory and torch.cuda.is_available(), worker_init_fn=init_worker,
                              persistent_workers=False, **batching)


def collate_same_size(items: list[dict], option: str = "val_batch_size") -> dict:
    """``default_collate``, with an error naming two files when images differ in size (evaluation and
    prediction keep each image's size); ``option`` is the datamodule argument that sets the batch size."""
    sizes = {tuple(item["image"].shape[1:]): item["path"] for item in items}
    if len(sizes) > 1:
        (size_a, path_a), (size_b, path_b) = list(sizes.items())[:2]
        raise DatasetError(f"{path_a} ({size_a[0]}x{size_a[1]}) and {path_b} ({size_b[0]}x{size_b[1]}): each image "
                           f"keeps its size, so images of different sizes cannot share a batch of {len(items)}; "
                           f"set {option} 1 (--data.init_args.{option} 1)")
    return default_collate(items)


def collate_padded(items: list[dict], mask_fill: int = 255) -> dict:
    """``default_collate`` for images that keep their own size (segmentation's evaluation and prediction).

    Images of different sizes are padded at the bottom and right to the batch's largest (image 0, ``mask``
    ``mask_fill``: the ignore index, which loss and metrics skip), and ``size`` int64 [B, 2] holds each image's
    own (height, width), so a prediction is cropped back to it.
    """
    height = max(item["image"].shape[-2] for item in items)
    width = max(item["image"].shape[-1] for item in items)
    padded = []
    for item in items:
        h, w = item["image"].shape[-2:]
        item = {**item, "size": torch.tensor([h, w])}
        if (h, w) != (height, width):
            item["image"] = torch.nn.functional.pad(item["image"], (0, width - w, 0, height - h))
            if "mask" in item:
                item["mask"] = torch.nn.functional.pad(item["mask"], (0, width - w, 0, height - h), value=mask_fill)
        padded.append(item)
    return default_collate(padded)


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


def is_quickstart_root(root: str | os.PathLike, quickstart_root: str, holds_dataset: bool, expected: str) -> bool:
    """Whether a datamodule with ``quickstart: true`` uses the built-in demo data in ``root``.

    Demo data is written only into the datamodule's own quickstart folder ``quickstart_root`` (relative to
    the working directory, as the configs/quickstart recipes name it), never into a folder the user named:
    a ``root`` of the user's that ``holds_dataset`` is read as it is (returns False); one that holds none (a
    typo, data not copied yet) raises ``DatasetError`` saying so, with ``expected`` (what a dataset there holds).
    """
    if Path(root).resolve() == Path(quickstart_root).resolve():
        return True
    if holds_dataset:
        return False
    raise DatasetError(f"{Path(root).absolute()}: holds no dataset (expected {expected}); quickstart: true writes "
                       f"its demo data only into its own folder {quickstart_root}. To read your own data from this "
                       "folder, set quickstart: false (--data.init_args.quickstart false); for the demo, leave root "
                       f"at {quickstart_root}")


def use_quickstart_data(root: Path, write: Callable[[Path], Path]) -> None:
    """Write the demo data into the quickstart folder ``root`` unless it is there (``write``), and say so in one
    line (on rank 0, through Lightning's logger, which the CLI shows at INFO)."""
    write(root)
    rank_zero_info(f"quickstart: using the built-in demo data in {Path(root).absolute()} (for your own data: "
                   "--data.init_args.root YOUR_DATA --data.init_args.quickstart false)")


def require_dir(path: str | os.PathLike, what: str) -> Path:
    """Return ``path`` as a Path, or raise ``DatasetError`` saying which directory is missing."""
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"{path}: {what} directory does not exist")
    return path


class SplitLoaders:
    """The four dataloader hooks of a datamodule, written once (a mixin before ``L.LightningDataModule``).

    Each stage's loader serves the dataset that ``setup`` put in ``datasets`` under ``stage_splits[stage]``, built
    by ``loader(dataset, train)``: ``make_loader`` with ``batch_size`` (``eval_batch_size`` outside training),
    ``collate_fn``, ``workers`` and ``pin_memory``; training shuffles and drops the last partial batch. A
    datamodule states only what differs: another ``stage_splits`` (ImageNet tests on its val split), a
    ``collate_fn``, an ``eval_batch_size``, or its own ``loader`` (COCO's aspect-ratio batches, LitData's loader).
    """

    #: The ``datasets`` key each stage's loader reads.
    stage_splits = {"train": "train", "val": "val", "test": "test", "predict": "predict"}
    #: How items become a batch (None: torch's ``default_collate``); a function, as a ``staticmethod``.
    collate_fn = None
    datasets: dict
    batch_size: int
    num_workers: int | None
    pin_memory: bool

    @property
    def eval_batch_size(self) -> int:
        """Items per step in validation, test and predict."""
        return self.batch_size

    @property
    def workers(self) -> int:
        """Data-loading processes per device: ``num_workers``, or the machine's share when None (``loader_workers``)."""
        return loader_workers(self.num_workers, getattr(self, "trainer", None))

    def loader(self, dataset: Dataset, train: bool):
        """The loader of ``dataset``: for training (``train``) or evaluation and prediction."""
        return make_loader(dataset, batch_size=self.batch_size if train else self.eval_batch_size, shuffle=train,
                           drop_last=train, num_workers=self.workers, pin_memory=self.pin_memory,
                           collate_fn=self.collate_fn)

    def _stage_loader(self, stage: str):
        split = self.stage_splits[stage]
        if split not in self.datasets:
            raise RuntimeError(f"{split} data is not set up; call setup() with the matching stage first")
        return self.loader(self.datasets[split], train=stage == "train")

    def train_dataloader(self):
        return self._stage_loader("train")

    def val_dataloader(self):
        return self._stage_loader("val")

    def test_dataloader(self):
        return self._stage_loader("test")

    def predict_dataloader(self):
        return self._stage_loader("predict")


class AugmentedDataModule(SplitLoaders, L.LightningDataModule):
    """A datamodule whose ``datasets["train"]`` has a seeded albumentations ``transform``, with ``SplitLoaders``.

    Checkpoints carry the main-process augmentation stream (what ``num_workers=0`` draws from), so a
    run resumed at an epoch boundary continues it; worker processes reseed from the run seed each epoch
    (``init_worker``). Inside an epoch, the train loader's own state (``make_loader``) takes over.
    """

    datasets: dict

    def state_dict(self) -> dict:
        return {"train_pipeline": pipeline_state(self.datasets["train"].transform)} if "train" in self.datasets else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if "train_pipeline" in state_dict and "train" in self.datasets:
            load_pipeline_state(self.datasets["train"].transform, state_dict["train_pipeline"])
