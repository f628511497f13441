"""What a datamodule declares to the model: one small record, kept in every checkpoint.

The module reads a datamodule's ``dataset_info`` at set-up, hands it to the task head (per-class metric names,
the palette of written masks, COCO category ids of written results, the ignore index it must agree with) and
saves it in each checkpoint, so that ``fishnet-pl predict``, ``export`` and ``fishnet_pl.load_network`` need
neither the config nor the dataset. Plain values only: a checkpoint loads with ``weights_only=True``.

A datamodule of one's own needs none of it: without ``dataset_info``, its ``class_names`` (or ``classes``)
attribute is read, and the rest stays unknown.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class DatasetInfo:
    """What the data says about itself.

    Attributes:
        class_names: name per label (index = label; for detection label - 1, 0 being the background).
        palette: RGB colour per class, for segmentation masks.
        ignore_index: label value of unlabelled pixels in the batches (segmentation).
        label_to_category_id: detection label -> the dataset's COCO category id, for written results.
        preprocessing: the evaluation transform in plain values (``input_size`` [H, W], ``resize``, ``crop_pct``,
            ``interpolation`` for classification; ``scale`` for segmentation; empty when images go in as they
            are): what ``load_network(...).preprocessing`` and ``export`` report.
        predict: ``datamodules.predict.PredictFolderDataModule``'s arguments that prepare images as the evaluation
            transform does (``transform`` and ``transform_kwargs``, ``collate``, ``batch_size``).
        categories: COCO-panoptic-style categories ``{"id", "name", "isthing", "color"}``, things and stuff in
            order (``datamodules.panoptic``: thing label k is the k-th thing, semantic class s the s-th stuff).
        benchmark: the official evaluation whose results format the heads also write: "cityscapes"
            (cityscapesScripts' instance results, ``fishnet_pl.metrics.write_cityscapes_instances``).
        tasks: a multi-task datamodule's, each task's own (``fishnet_pl.tasks.MultiTaskHead``).
    """

    class_names: list[str] | None = None
    palette: list[list[int]] | None = None
    ignore_index: int | None = None
    label_to_category_id: dict[int, int] | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)
    predict: dict[str, Any] = field(default_factory=dict)
    categories: list[dict] | None = None
    benchmark: str | None = None
    tasks: dict[str, DatasetInfo] | None = None

    def __post_init__(self) -> None:
        # Plain lists and ints, whatever the datamodule computed them as (tuples, numpy ints, names as labels).
        plain = {
            "class_names": None if self.class_names is None else [str(n) for n in self.class_names],
            "palette": None if self.palette is None else [[int(c) for c in colour] for colour in self.palette],
            "ignore_index": None if self.ignore_index is None else int(self.ignore_index),
            "label_to_category_id": None if self.label_to_category_id is None else
            {int(k): int(v) for k, v in self.label_to_category_id.items()},
            "preprocessing": dict(self.preprocessing), "predict": dict(self.predict),
            "categories": None if self.categories is None else [
                {"id": int(c["id"]), "name": str(c["name"]), "isthing": int(c["isthing"]),
                 "color": [int(v) for v in c["color"]]} for c in self.categories],
            "benchmark": None if self.benchmark is None else str(self.benchmark),
            "tasks": None if self.tasks is None else {
                str(name): info if isinstance(info, DatasetInfo) else DatasetInfo.from_dict(info)
                for name, info in self.tasks.items()}}
        for name, value in plain.items():
            object.__setattr__(self, name, value)

    def as_dict(self) -> dict[str, Any]:
        """Plain values, as checkpoints store them."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DatasetInfo:
        return cls(**{name: values[name] for name in cls.__dataclass_fields__ if values.get(name) is not None})


def dataset_info(datamodule: Any) -> DatasetInfo:
    """The datamodule's ``dataset_info``; for one without (a user's own), its ``class_names`` or ``classes``."""
    info = getattr(datamodule, "dataset_info", None)
    if info is not None:
        return info
    names = getattr(datamodule, "class_names", None)
    if names is None:
        names = getattr(datamodule, "classes", None)
    return DatasetInfo(class_names=names)
