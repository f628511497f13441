"""The data contract: what each datamodule declares (``DatasetInfo``) reaches the head and every checkpoint in
plain values, checkpoints saved before it still read, and a head refuses data that does not fit it."""

from __future__ import annotations

import io

import pytest
import torch

from datamodules.cityscapes import CityscapesDataModule
from datamodules.cityscapes_labels import CLASS_NAMES as CITYSCAPES_NAMES
from datamodules.coco import COCODataModule
from datamodules.dataset_info import DatasetInfo, dataset_info
from datamodules.imagenet import ImageNetDataModule
from datamodules.quickstart import write_classification
from datamodules.quickstart_detection import write_detection
from datamodules.segmentation_folder import SegmentationFolderDataModule
from fishnet_pl.checkpoint import LEGACY_CLASS_NAMES_KEY, LEGACY_PREDICT_DATA_KEY, recorded_dataset_info
from fishnet_pl.tasks import SegmentationHead


def through_a_checkpoint(info: DatasetInfo) -> DatasetInfo:
    buffer = io.BytesIO()
    torch.save({"data": info.as_dict()}, buffer)
    buffer.seek(0)
    return DatasetInfo.from_dict(torch.load(buffer, weights_only=True)["data"])  # plain values only


def test_each_datamodule_declares_its_names_palette_categories_and_evaluation_transform(tmp_path):
    imagenet = ImageNetDataModule(str(write_classification(tmp_path / "imagenet")), image_size=64, val_resize=72)
    coco = COCODataModule(str(write_detection(tmp_path / "coco")))
    cityscapes = CityscapesDataModule(str(tmp_path / "cityscapes"), eval_scale=0.5)
    own = SegmentationFolderDataModule(str(tmp_path / "own"), classes=["sky", "sea"], palette=[(0, 0, 255), (0, 9, 99)])
    infos = {name: dataset_info(dm) for name, dm in
             (("imagenet", imagenet), ("coco", coco), ("cityscapes", cityscapes), ("own", own))}
    for name, info in infos.items():
        assert through_a_checkpoint(info) == info, name

    assert infos["imagenet"].class_names == ["circle", "square", "triangle", "stripes"]
    assert infos["imagenet"].preprocessing == {"input_size": [64, 64], "resize": 72, "crop_pct": 64 / 72,
                                               "interpolation": "bilinear"}
    assert infos["coco"].class_names == [c["name"] for c in coco.categories] and infos["coco"].preprocessing == {}
    assert infos["coco"].label_to_category_id == {k: c["id"] for k, c in enumerate(coco.categories, 1)}
    cityscapes = infos["cityscapes"]
    assert cityscapes.class_names == list(CITYSCAPES_NAMES) and cityscapes.palette[0] == [128, 64, 128]  # road
    assert cityscapes.ignore_index == 255 and cityscapes.preprocessing["scale"] == 0.5
    assert (infos["own"].class_names, infos["own"].palette) == (["sky", "sea"], [[0, 0, 255], [0, 9, 99]])


def test_a_datamodule_of_ones_own_declares_nothing_but_its_class_names():
    class Mine:
        classes = ("cat", "dog")

    assert dataset_info(Mine()) == DatasetInfo(class_names=["cat", "dog"])
    assert dataset_info(None) == DatasetInfo()


def test_checkpoints_saved_before_the_contract_still_read():
    legacy = {LEGACY_CLASS_NAMES_KEY: ["road", "car"],
              LEGACY_PREDICT_DATA_KEY: {"transform": "datamodules.segmentation.eval_transform",
                                        "transform_kwargs": {"scale": 0.5}, "palette": [[1, 2, 3], [4, 5, 6]],
                                        "collate": "datamodules.common.collate_padded",
                                        "preprocessing": {"scale": 0.5}}}
    assert recorded_dataset_info(legacy) == DatasetInfo(
        class_names=["road", "car"], palette=[[1, 2, 3], [4, 5, 6]], preprocessing={"scale": 0.5},
        predict={"transform": "datamodules.segmentation.eval_transform", "transform_kwargs": {"scale": 0.5},
                 "collate": "datamodules.common.collate_padded"})
    assert recorded_dataset_info({}) == DatasetInfo()


def test_the_segmentation_head_refuses_data_whose_unlabelled_value_it_does_not_ignore():
    head = SegmentationHead(ignore_index=0)
    with pytest.raises(ValueError, match="the data marks unlabelled pixels 255, the segmentation head ignores 0: "
                                         "set --model.head.init_args.ignore_index 255"):
        head.set_dataset_info(DatasetInfo(class_names=["a", "b"], ignore_index=255))
    head.set_dataset_info(DatasetInfo(class_names=["a", "b"], ignore_index=0))
    assert head.class_names == ["a", "b"]
