"""Cityscapes instance and panoptic targets, from ``*_gtFine_instanceIds.png`` files written in the official layout,
checked against the files themselves and against cityscapesScripts' own panoptic conversion."""

from __future__ import annotations

import io
import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.labels import labels as CITYSCAPES_LABELS
from cityscapesscripts.preparation.createPanopticImgs import convert2panoptic
from PIL import Image

from datamodules.cityscapes import CityscapesDataModule
from datamodules.common import DatasetError
from datamodules.dataset_info import DatasetInfo, dataset_info
from datamodules.quickstart_segmentation import write_cityscapes

# The benchmark's classes as cityscapesScripts defines them: thing label k = the k-th thing by label id, semantic
# class s = the s-th stuff class by label id.
EVALUATED = sorted((label for label in CITYSCAPES_LABELS if not label.ignoreInEval and label.id >= 0),
                   key=lambda label: label.id)
THING_LABEL = {label.id: k for k, label in enumerate((la for la in EVALUATED if la.hasInstances), 1)}
STUFF_CLASS = {label.id: s for s, label in enumerate((la for la in EVALUATED if not la.hasInstances), 1)}
SKY, ROAD, PARKING, PERSON, RIDER, CAR, CARAVAN = 23, 7, 9, 24, 25, 26, 29


def street(objects: bool = True) -> np.ndarray:
    """instanceIds of a 60x80 asymmetric street: objects (label id * 1000 + index), a group of cars and one of
    people (bare thing label ids: crowds), a caravan (not evaluated: void), parking (void) and an unlabelled strip."""
    ids = np.full((60, 80), SKY, np.int64)
    ids[30:] = ROAD
    ids[30:34, :10] = PARKING
    ids[54:] = 0
    ids[10:20, 30:45] = CAR  # a group of cars
    ids[5:9, 5:15] = PERSON  # a group of people
    ids[40:50, 28:36] = CARAVAN * 1000
    if objects:
        ids[32:50, 5:25] = CAR * 1000
        ids[36:48, 40:58] = CAR * 1000 + 1
        ids[20:40, 60:66] = PERSON * 1000
        ids[20:30, 70:76] = RIDER * 1000
    return ids


def write_frame(root: Path, split: str, city: str, index: int, ids: np.ndarray) -> Path:
    """A frame's photo (things white, the rest dark), labelIds and 16-bit instanceIds; returns the photo's path."""
    name = f"{city}_{index:06d}_000019"
    label_ids = np.where(ids < 1000, ids, ids // 1000)
    photo = np.where(np.isin(label_ids, list(THING_LABEL) + [CARAVAN])[..., None], 255, 30).astype(np.uint8)
    image = root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png"
    labels = root / "gtFine" / split / city
    image.parent.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo.repeat(3, axis=2)).save(image)
    Image.fromarray(label_ids.astype(np.uint8)).save(labels / f"{name}_gtFine_labelIds.png")
    Image.fromarray(ids.astype(np.uint16)).save(labels / f"{name}_gtFine_instanceIds.png")
    return image


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> Path:
    """The quickstart Cityscapes (cars and people, no crowds) plus a val frame with crowds and void classes."""
    root = write_cityscapes(tmp_path_factory.mktemp("data") / "cityscapes")
    write_frame(root, "val", "lindau", 0, street())
    return root


@pytest.fixture
def streets(tmp_path) -> Path:
    """Hand-made frames: train 2 with objects + 1 with crowds and stuff only; val 1; test 1."""
    write_frame(tmp_path, "train", "aachen", 0, street())
    write_frame(tmp_path, "train", "aachen", 1, street()[:, ::-1].copy())
    write_frame(tmp_path, "train", "bochum", 0, street(objects=False))
    write_frame(tmp_path, "val", "frankfurt", 0, street())
    write_frame(tmp_path, "test", "berlin", 0, street())
    return tmp_path


def datamodule(root, targets, **kwargs) -> CityscapesDataModule:
    return CityscapesDataModule(str(root), targets=targets, **{"batch_size": 2, "num_workers": 0, **kwargs})


def instance_ids_of(image_path: str) -> np.ndarray:
    path = image_path.replace("leftImg8bit", "gtFine", 1).replace("_leftImg8bit.png", "_gtFine_instanceIds.png")
    return np.asarray(Image.open(path)).astype(np.int64)


def expected_instances(ids: np.ndarray, crowds: bool) -> list[tuple[int, int, bytes]]:
    """(label, iscrowd, mask) of each evaluated thing segment of an instanceIds map, read straight from its values."""
    found = []
    for value in np.unique(ids).tolist():
        label_id = value if value < 1000 else value // 1000
        if label_id in THING_LABEL and (value >= 1000 or crowds):
            found.append((THING_LABEL[label_id], int(value < 1000), (ids == value).astype(np.uint8).tobytes()))
    return sorted(found)


def instances_of(target: dict) -> list[tuple[int, int, bytes]]:
    return sorted(zip(target["labels"].tolist(), target["iscrowd"].tolist(),
                      [mask.numpy().tobytes() for mask in target["masks"]]))


def assert_boxes_and_areas_from_masks(target: dict) -> None:
    """Each box encloses its mask's pixels (xyxy of the pixel edges), each area counts them."""
    assert target["boxes"].dtype == torch.float32 and target["area"].dtype == torch.float32
    for box, area, mask in zip(target["boxes"].tolist(), target["area"].tolist(), target["masks"].numpy()):
        rows, cols = np.nonzero(mask)
        assert box == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
        assert area == mask.sum() > 0


def semantic_from_label_ids(image_path: str) -> np.ndarray:
    """The semantic map the labelIds file implies: evaluated things 0, stuff 1..11, anything else 255."""
    path = image_path.replace("leftImg8bit", "gtFine", 1).replace("_leftImg8bit.png", "_gtFine_labelIds.png")
    lookup = np.full(256, 255, np.int64)
    lookup[list(THING_LABEL)] = 0
    lookup[list(STUFF_CLASS)] = list(STUFF_CLASS.values())
    return lookup[np.asarray(Image.open(path))]


def segments_by_mask(segment_ids: np.ndarray, segments: list[dict]) -> set[tuple[int, int, bytes]]:
    """(category id, iscrowd, mask) of each segment with pixels: what two panoptic ground truths share, whatever
    their segment ids."""
    return {(s["category_id"], s["iscrowd"], (segment_ids == s["id"]).tobytes())
            for s in segments if (segment_ids == s["id"]).any()}


def test_categories_labels_and_dataset_info_follow_cityscapes_scripts(tmp_path):
    dm = datamodule(tmp_path / "nothing written yet", "panoptic")
    assert dm.categories == [{"id": la.id, "name": la.name, "isthing": int(la.hasInstances), "color": list(la.color)}
                             for la in EVALUATED]
    assert dm.num_classes == 8 and dm.num_stuff_classes == 11
    assert dm.class_names == ["person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
    assert dm.label_to_category_id == {k: label_id for label_id, k in THING_LABEL.items()}
    assert datamodule(tmp_path, "semantic").num_classes == 19  # as before

    for targets in ("instance", "panoptic"):
        info = dataset_info(datamodule(tmp_path, targets))
        buffer = io.BytesIO()
        torch.save({"data": info.as_dict()}, buffer)
        buffer.seek(0)
        assert DatasetInfo.from_dict(torch.load(buffer, weights_only=True)["data"]) == info  # plain values only
        assert info.categories == dm.categories and info.class_names == dm.class_names
        assert info.label_to_category_id == dm.label_to_category_id
        assert info.predict == {"transform": "datamodules.coco.eval_transform", "batch_size": 1,
                                "collate": "datamodules.coco.collate_detection"}
        assert info.ignore_index == (255 if targets == "panoptic" else None)  # of the semantic map


def test_val_targets_are_what_the_instance_ids_say_and_what_create_panoptic_imgs_builds(quickstart, tmp_path):
    convert2panoptic(str(quickstart / "gtFine"), str(tmp_path), setNames=["val"])
    reference = json.loads((tmp_path / "cityscapes_panoptic_val.json").read_text())
    annotations = {a["image_id"]: a for a in reference["annotations"]}
    instance_dm, panoptic_dm = datamodule(quickstart, "instance"), datamodule(quickstart, "panoptic")
    instance_dm.setup("validate")
    panoptic_dm.setup("validate")
    assert len(panoptic_dm.datasets["val"]) == len(annotations) == 9
    for index in range(9):
        instance, item = instance_dm.datasets["val"][index], panoptic_dm.datasets["val"][index]
        ids = instance_ids_of(item["path"])
        assert instance["path"] == item["path"] and instance["image"].shape == (3, *ids.shape)
        for target in (instance["target"], item["target"]):
            assert target["image_id"] == index
            assert instances_of(target) == expected_instances(ids, crowds=True)  # crowds kept for evaluation
            assert target["masks"].dtype == torch.uint8 and target["labels"].dtype == torch.int64
            assert_boxes_and_areas_from_masks(target)
        assert {"semantic", "panoptic", "segments"}.isdisjoint(instance["target"])

        target = item["target"]
        assert target["semantic"].dtype == torch.int64
        assert np.array_equal(target["semantic"].numpy(), semantic_from_label_ids(item["path"]))
        name = Path(item["path"]).name.replace("_leftImg8bit.png", "")
        rgb = np.asarray(Image.open(tmp_path / "cityscapes_panoptic_val" / annotations[name]["file_name"]), np.int64)
        theirs = segments_by_mask(rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2],
                                  annotations[name]["segments_info"])
        ours = target["panoptic"].numpy()
        assert target["panoptic"].dtype == torch.int64 and ours.shape == ids.shape
        assert segments_by_mask(ours, target["segments"]) == theirs
        assert {s["id"] for s in target["segments"]} == set(np.unique(ours).tolist()) - {0}

    # The hand-made frame: objects per class, the two groups as crowds, caravan and parking void.
    target = panoptic_dm.datasets["val"][8]["target"]
    assert "lindau" in panoptic_dm.datasets["val"][8]["path"]
    names = [instance_dm.class_names[label - 1] for label in target["labels"].tolist()]
    crowds = Counter(name for name, crowd in zip(names, target["iscrowd"].tolist()) if crowd)
    assert Counter(names) == {"car": 3, "person": 2, "rider": 1} and crowds == {"car": 1, "person": 1}
    semantic = target["semantic"].numpy()
    assert (semantic[10:20, 30:45] == 0).all() and (semantic[40:50, 28:36] == 255).all()  # crowd thing; caravan
    assert (semantic[54:] == 255).all() and (semantic[30:32, :5] == 255).all()  # unlabelled; parking
    assert (semantic[:5] == STUFF_CLASS[SKY]).all() and semantic[52, 70] == STUFF_CLASS[ROAD] == 1


def test_training_targets_follow_the_flipped_and_scaled_image_and_hold_no_crowd(streets):
    flipped = datamodule(streets, "panoptic", batch_size=3, flip_prob=1.0, scale_range=(1.0, 1.0))
    flipped.setup("fit")
    batch = next(iter(flipped.train_dataloader()))
    assert len(batch["image"]) == len(batch["target"]) == 3  # the frame without objects trains the stuff
    for image_path, target in zip(batch["path"], batch["target"]):
        ids = instance_ids_of(image_path)[:, ::-1]
        assert instances_of(target) == expected_instances(ids, crowds=False)
        assert np.array_equal(target["semantic"].numpy(), semantic_from_label_ids(image_path)[:, ::-1])
        assert "panoptic" not in target and "segments" not in target

    jittered = datamodule(streets, "panoptic", batch_size=3, scale_range=(0.5, 1.5))
    jittered.setup("fit")
    seen_sizes = set()
    for _ in range(4):
        batch = next(iter(jittered.train_dataloader()))
        for image, target in zip(batch["image"], batch["target"]):
            size = tuple(image.shape[1:])
            seen_sizes.add(size)
            assert target["masks"].shape[1:] == target["semantic"].shape == size
            assert (target["iscrowd"] == 0).all() and len(target["labels"]) == len(target["boxes"])
            assert_boxes_and_areas_from_masks(target)
            semantic = target["semantic"].numpy()
            assert (semantic[target["masks"].numpy().any(0)] == 0).all()  # instances are things
            # The image follows: things are white, the rest dark (away from edges, which resizing blurs).
            bright, thing = image.mean(0).numpy() > 0.5, semantic == 0
            edge = np.zeros_like(thing)
            for dy in (-2, -1, 0, 1, 2):
                for dx in (-2, -1, 0, 1, 2):
                    edge |= np.roll(semantic, (dy, dx), (0, 1)) != semantic
            assert bright[~edge & thing].all() and not bright[~edge & (semantic > 0) & (semantic < 255)].any()
    assert len(seen_sizes) > 1


def test_instance_training_leaves_out_images_without_objects_once(streets, caplog):
    dm = datamodule(streets, "instance", batch_size=2)
    with caplog.at_level(logging.WARNING, logger="datamodules.cityscapes"):
        dm.setup("fit")
    assert [path.name for path in dm.skipped_train_images] == ["bochum_000000_000019_leftImg8bit.png"]
    assert len(dm.datasets["train"]) == 2 and len(caplog.records) == 1 and "1 of 3" in caplog.text
    batch = next(iter(dm.train_dataloader()))
    assert all(len(t["labels"]) and "semantic" not in t for t in batch["target"])
    assert dm.datasets["val"][0]["target"]["iscrowd"].sum() == 2  # evaluation keeps the crowds

    dm.setup("predict")  # the test images, as the detector's predict loader reads them
    batch = next(iter(dm.predict_dataloader()))
    assert batch["path"][0].endswith("berlin_000000_000019_leftImg8bit.png") and "target" not in batch
    assert batch["image"][0].shape == (3, 60, 80) and batch["image"][0].dtype == torch.float32


def test_quirks_are_named(streets):
    val = streets / "gtFine" / "val" / "frankfurt"
    ids_file = val / "frankfurt_000000_000019_gtFine_instanceIds.png"

    def val_item(targets="panoptic"):
        dm = datamodule(streets, targets)
        dm.setup("validate")
        return dm.datasets["val"][0]

    Image.fromarray(street()[:30].astype(np.uint16)).save(ids_file)
    with pytest.raises(DatasetError, match=r"instanceIds.png.*segments are 30x80 .*the image is 60x80"):
        val_item()
    bad = street()
    bad[0, 0] = 40
    Image.fromarray(bad.astype(np.uint16)).save(ids_file)
    with pytest.raises(DatasetError, match=r"instanceIds.png: label ids \[40\] outside 0..33"):
        val_item("instance")
    bad[0, 0] = 45001
    Image.fromarray(bad.astype(np.uint16)).save(ids_file)
    with pytest.raises(DatasetError, match=r"instance ids \[45001\] have label id part \[45\]"):
        val_item()

    shutil.move(ids_file, streets / "elsewhere.png")
    with pytest.raises(DatasetError, match=f"{ids_file}: instance ids of .* do not exist; targets instance and "
                                           "panoptic read"):
        val_item()
    assert val_item("semantic")["mask"].shape == (60, 80)  # semantic targets need only the labelIds
    with pytest.raises(ValueError, match="targets must be one of semantic, instance, panoptic"):
        datamodule(streets, "boxes")
    with pytest.raises(ValueError, match="eval_scale 0.5 applies to targets semantic only"):
        datamodule(streets, "instance", eval_scale=0.5)
