"""Checkpoint files, read in one place: the keys fishnet-pl adds to a Lightning checkpoint, and every reader.

Each reader loads with ``torch.load(weights_only=True)`` (no code in the file runs) through ``load_file``, so a
missing, truncated or foreign file fails the same way everywhere, naming the file. What a file holds decides the
reader: our Lightning ``.ckpt`` (``read_checkpoint``, ``check_checkpoint``, ``recorded_dataset_info``), a bare
state dict such as the authors' released FishNet files (``read_state_dict``), or any weights file to start a
backbone from (``read_weights``). Only torch is needed: ``fishnet_pl.models`` and ``fishnet_pl.inference`` use
this without Lightning.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from datamodules.dataset_info import DatasetInfo

#: Key under which our Lightning checkpoints record where the backbone sits in the task network.
CKPT_BACKBONE_KEY = "fishnet_pl_backbone"
#: Key under which they store what the datamodule declared (``datamodules.dataset_info.DatasetInfo``, as a dict).
CKPT_DATASET_KEY = "fishnet_pl_dataset"
#: The keys of checkpoints saved before ``DatasetInfo``: class names, and the predict datamodule's arguments with
#: ``palette``, ``label_to_category_id`` and ``preprocessing``. Still read.
LEGACY_CLASS_NAMES_KEY, LEGACY_PREDICT_DATA_KEY = "fishnet_pl_class_names", "fishnet_pl_predict_data"


def load_file(path: str | os.PathLike, what: str = "checkpoint", map_location: Any = "cpu", mmap: bool = False) -> Any:
    """The object a PyTorch file holds (``torch.load`` with ``weights_only=True``: no code runs).

    ``what`` names the file in the error when it is missing (``backbone weights``); ``mmap`` maps the tensors
    instead of reading them (a quick look at a large file). A missing, truncated or foreign file raises an error
    naming it.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: {what} file does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # zip, pickle and weights_only errors differ: all mean "not a checkpoint we can read"
        raise ValueError(f"{path}: not a readable PyTorch checkpoint; the file is truncated (a copy or a save that "
                         f"did not finish) or not a checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from err


def read_checkpoint(ckpt_path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Our Lightning checkpoint as a dict (``load_file``); a file without ``state_dict`` and ``hyper_parameters``
    raises an error naming it."""
    ckpt = load_file(ckpt_path, "checkpoint", map_location, mmap)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ValueError(f"{ckpt_path}: not a fishnet-pl Lightning checkpoint (no state_dict / hyper_parameters)")
    return ckpt


def check_checkpoint(ckpt_path: str | os.PathLike | None, resume: bool) -> None:
    """Raise an error naming ``ckpt_path`` unless it is a readable fishnet-pl checkpoint, with the training state
    when ``resume`` (``fit``). Lightning's special values (``last``, ``best``, ``hpc``, ...) pass."""
    if ckpt_path is None or str(ckpt_path) in ("last", "best", "hpc") or "://" in str(ckpt_path) \
            or str(ckpt_path).startswith("registry"):
        return
    ckpt = read_checkpoint(ckpt_path, mmap=True)  # names the file if it is missing, truncated or not a checkpoint
    if CKPT_BACKBONE_KEY not in ckpt:
        raise ValueError(f"{ckpt_path}: a Lightning checkpoint, but not one of fishnet-pl's (no "
                         f"{CKPT_BACKBONE_KEY!r}); to start from other weights use --model.backbone_weights")
    missing = [key for key in ("optimizer_states", "loops") if key not in ckpt]
    if resume and missing:
        raise ValueError(f"{ckpt_path}: holds the weights only (no {' or '.join(missing)}), not the training state "
                         "that fit --ckpt_path resumes; to start a new run from it use --model.backbone_weights")


def recorded_dataset_info(ckpt: Mapping[str, Any]) -> DatasetInfo:
    """What a loaded checkpoint recorded of its training data (empty when nothing)."""
    from datamodules.dataset_info import DatasetInfo  # here: `import fishnet_pl.models` (weights) stays data-free

    if CKPT_DATASET_KEY in ckpt:
        return DatasetInfo.from_dict(ckpt[CKPT_DATASET_KEY])
    legacy = dict(ckpt.get(LEGACY_PREDICT_DATA_KEY) or {})
    own = {name: legacy.pop(name, None) for name in ("palette", "label_to_category_id", "preprocessing")}
    return DatasetInfo.from_dict({**own, "class_names": ckpt.get(LEGACY_CLASS_NAMES_KEY), "predict": legacy})


def recorded_predict_data(ckpt_path: str | os.PathLike) -> dict[str, Any]:
    """What a checkpoint recorded of its training data, as ``PredictFolderDataModule``'s arguments: how to prepare
    images (``DatasetInfo.predict``), ``class_names``, ``palette``, ``label_to_category_id``, ``categories`` and
    ``num_classes`` (None where it has none). A multi-task checkpoint (``num_classes`` per task) gives ``tasks``:
    those arguments of each task, as ``MultiTaskPredictFolderDataModule`` takes them."""
    ckpt = read_checkpoint(ckpt_path, mmap=True)  # a few small entries: the tensors stay on disk
    info, num_classes = recorded_dataset_info(ckpt), ckpt["hyper_parameters"].get("num_classes")
    if isinstance(num_classes, Mapping):
        return {"tasks": {name: predict_arguments(task_info(info, name), classes)
                          for name, classes in num_classes.items()}}
    return predict_arguments(info, num_classes)


def task_info(info: DatasetInfo, name: str) -> DatasetInfo:
    """What a multi-task checkpoint recorded of the task ``name``'s training data (empty when nothing)."""
    from datamodules.dataset_info import DatasetInfo

    return (info.tasks or {}).get(name) or DatasetInfo()


def predict_arguments(info: DatasetInfo, num_classes: int | None) -> dict[str, Any]:
    """``PredictFolderDataModule``'s arguments from what a (task's) datamodule declared."""
    return {**info.predict, "class_names": info.class_names, "palette": info.palette,
            "label_to_category_id": info.label_to_category_id, "categories": info.categories,
            "num_classes": num_classes}


def read_state_dict(path_or_state_dict: str | os.PathLike | Mapping) -> dict[str, torch.Tensor]:
    """A state dict from a path or mapping: ``{'state_dict': ...}`` unwrapped, ``module.`` stripped."""
    source = path_or_state_dict
    if isinstance(source, (str, os.PathLike)):
        source = load_file(source)
    if isinstance(source, Mapping) and isinstance(source.get("state_dict"), Mapping):
        source = source["state_dict"]
    if not isinstance(source, Mapping) or not all(isinstance(v, torch.Tensor) for v in source.values()):
        raise ValueError(f"{path_or_state_dict!s:.200}: not a state dict or a checkpoint holding one")
    return {k.removeprefix("module."): v for k, v in source.items()}


def read_weights(path: str | os.PathLike, backbone: str) -> dict[str, torch.Tensor]:
    """The tensors of a weights file to start the timm model ``backbone`` from, in the file's own key layout.

    One of our Lightning checkpoints (any task) gives its backbone's tensors, without the task's prefix, and must
    be of ``backbone``; another file is a timm, torchvision or other trainer's checkpoint (its ``state_dict``,
    ``model`` or ``state_dict_ema``) or a bare state dict (``read_state_dict``).
    """
    ckpt = load_file(path, "backbone weights")
    if isinstance(ckpt, Mapping) and CKPT_BACKBONE_KEY in ckpt:  # one of ours, any task
        info = ckpt[CKPT_BACKBONE_KEY]
        if info["name"] != backbone:
            raise ValueError(f"{path}: its backbone is {info['name']!r}, not {backbone!r}; use --model.backbone "
                             f"{info['name']} or another weights file")
        prefix = info["prefix"]
        return {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    for wrapper in ("state_dict", "model", "state_dict_ema"):  # torchvision / timm / other trainers
        if isinstance(ckpt, Mapping) and isinstance(ckpt.get(wrapper), Mapping):
            ckpt = ckpt[wrapper]
            break
    try:
        return read_state_dict(ckpt)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
