"""COCOPanopticDataModule on small sets written in the real COCO panoptic format: JPEGs, a json per split and PNGs
whose colours encode segment ids as panopticapi's ``id2rgb`` does; targets are checked against the files."""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser
from panopticapi.utils import id2rgb, rgb2id
from PIL import Image

from datamodules.coco_panoptic import COCOPanopticDataModule
from datamodules.common import DatasetError
from datamodules.dataset_info import DatasetInfo, dataset_info

from ..conftest import CONFIGS

# Unsorted, non-contiguous ids above 80: labels follow the id order (things 84 -> 1, 90 -> 2; stuff 121 -> 1,
# 150 -> 2, 200 -> 3). The wall has no colour in the json.
CATEGORIES = [
    {"id": 150, "name": "sky", "supercategory": "sky", "isthing": 0, "color": [70, 130, 180]},
    {"id": 90, "name": "kite", "supercategory": "sports", "isthing": 1, "color": [0, 82, 0]},
    {"id": 200, "name": "wall", "supercategory": "wall", "isthing": 0},
    {"id": 84, "name": "zebra", "supercategory": "animal", "isthing": 1, "color": [199, 100, 0]},
    {"id": 121, "name": "grass", "supercategory": "plant", "isthing": 0, "color": [152, 251, 152]},
]
THING_LABEL, STUFF_CLASS = {84: 1, 90: 2}, {121: 1, 150: 2, 200: 3}
# Segment ids as COCO's are: colours, so that all three channels matter.
SKY, GRASS, WALL, ZEBRA_A, ZEBRA_B, KITE, KITE_CROWD, ZEBRA_CROWD, GHOST = (
    7_000_150, 3_400_121, 9_870_200, 12_345_084, 65_536 + 84, 255 * 256 + 90, 16_000_090, 256 + 84, 5_555_555)


def scene(height: int = 48, width: int = 64, flipped: bool = False) -> tuple[np.ndarray, list[dict]]:
    """An asymmetric scene: sky over grass, two zebras, a kite, a group of kites (crowd), a wall, a void corner;
    and its segments (plus one listed with area 0: no pixels)."""
    ids = np.full((height, width), SKY, np.int64)
    ids[height // 3:] = GRASS
    ids[: height // 3, width - 8:] = WALL
    ids[20:30, 5:20] = ZEBRA_A
    ids[31:44, 40:60] = ZEBRA_B
    ids[3:10, 25:33] = KITE
    ids[2:8, 40:50] = KITE_CROWD
    ids[height - 4:, :10] = 0
    if flipped:
        ids = ids[:, ::-1].copy()
    segments = [{"id": i, "category_id": c, "iscrowd": crowd, "area": int((ids == i).sum()), "bbox": [0, 0, 1, 1]}
                for i, c, crowd in ((SKY, 150, 0), (GRASS, 121, 0), (WALL, 200, 0), (ZEBRA_A, 84, 0),
                                    (ZEBRA_B, 84, 0), (KITE, 90, 0), (KITE_CROWD, 90, 1))]
    return ids, segments + [{"id": GHOST, "category_id": 90, "iscrowd": 0, "area": 0, "bbox": [0, 0, 0, 0]}]


def crowds_only(height: int = 48, width: int = 64) -> tuple[np.ndarray, list[dict]]:
    """Grass and a crowd of zebras: no instance to train on, but the semantic branch learns from it."""
    ids = np.full((height, width), GRASS, np.int64)
    ids[10:30, 10:40] = ZEBRA_CROWD
    return ids, [{"id": GRASS, "category_id": 121, "iscrowd": 0, "area": int((ids == GRASS).sum())},
                 {"id": ZEBRA_CROWD, "category_id": 84, "iscrowd": 1, "area": 600}]


def void(height: int = 48, width: int = 64) -> tuple[np.ndarray, list[dict]]:
    return np.zeros((height, width), np.int64), []


def write_split(root: Path, split: str, scenes: dict[int, tuple[np.ndarray, list[dict]]],
                categories=CATEGORIES) -> Path:
    """JPEGs (thing pixels white, the rest dark), the PNGs (``id2rgb``) and the json of a split."""
    (root / split).mkdir(parents=True, exist_ok=True)
    pngs = root / "annotations" / f"panoptic_{split}"
    pngs.mkdir(parents=True, exist_ok=True)
    things = [c["id"] for c in categories if c["isthing"]]
    images, annotations = [], []
    for image_id, (ids, segments) in scenes.items():
        name = f"{image_id:012d}"
        category = np.zeros(ids.shape, np.int64)
        for s in segments:
            category[ids == s["id"]] = s["category_id"]
        photo = np.where(np.isin(category, things), 255, 30).astype(np.uint8)
        Image.fromarray(np.repeat(photo[..., None], 3, axis=2)).save(root / split / f"{name}.jpg", quality=100)
        Image.fromarray(id2rgb(ids)).save(pngs / f"{name}.png")
        images.append({"id": image_id, "file_name": f"{name}.jpg", "height": ids.shape[0], "width": ids.shape[1]})
        annotations.append({"image_id": image_id, "file_name": f"{name}.png", "segments_info": segments})
    path = root / "annotations" / f"panoptic_{split}.json"
    path.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": annotations,
                                "categories": categories}))
    return path


@pytest.fixture
def coco_root(tmp_path) -> Path:
    root = tmp_path / "coco"
    write_split(root, "train2017", {11: scene(), 12: scene(64, 48), 13: void(), 14: crowds_only(),
                                    15: scene(flipped=True)})
    write_split(root, "val2017", {21: scene(), 22: void(), 23: crowds_only(64, 48)})
    return root


def datamodule(root: Path, **kwargs) -> COCOPanopticDataModule:
    return COCOPanopticDataModule(str(root), **{"batch_size": 2, "num_workers": 0, **kwargs})


def png_of(image_path: str) -> Path:
    path = Path(image_path)
    return path.parents[1] / "annotations" / f"panoptic_{path.parent.name}" / f"{path.stem}.png"


def files_of(image_path: str) -> tuple[np.ndarray, list[dict]]:
    """The segment ids (``rgb2id``) of an image's PNG and its json segments."""
    path = Path(image_path)
    data = json.loads((path.parents[1] / "annotations" / f"panoptic_{path.parent.name}.json").read_text())
    annotation = next(a for a in data["annotations"] if a["file_name"] == f"{path.stem}.png")
    return rgb2id(np.asarray(Image.open(png_of(image_path)))).astype(np.int64), annotation["segments_info"]


def expected_instances(ids: np.ndarray, segments: list[dict], crowds: bool) -> list[tuple[int, int, bytes]]:
    """(label, iscrowd, mask) of each thing segment with pixels, read straight from the files."""
    return sorted((THING_LABEL[s["category_id"]], s["iscrowd"], (ids == s["id"]).astype(np.uint8).tobytes())
                  for s in segments if s["category_id"] in THING_LABEL and (ids == s["id"]).any()
                  and (crowds or not s["iscrowd"]))


def expected_semantic(ids: np.ndarray, segments: list[dict]) -> np.ndarray:
    semantic = np.full(ids.shape, 255, np.int64)
    for s in segments:
        semantic[ids == s["id"]] = 0 if s["category_id"] in THING_LABEL else STUFF_CLASS[s["category_id"]]
    return semantic


def instances_of(target: dict) -> list[tuple[int, int, bytes]]:
    return sorted(zip(target["labels"].tolist(), target["iscrowd"].tolist(),
                      [mask.numpy().tobytes() for mask in target["masks"]]))


def assert_boxes_and_areas_from_masks(target: dict) -> None:
    assert target["boxes"].dtype == torch.float32 and target["area"].dtype == torch.float32
    assert len(target["boxes"]) == len(target["labels"]) == len(target["masks"]) == len(target["area"])
    for box, area, mask in zip(target["boxes"].tolist(), target["area"].tolist(), target["masks"].numpy()):
        rows, cols = np.nonzero(mask)
        assert box == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
        assert area == mask.sum() > 0


def by_id(dataset) -> dict[int, dict]:
    return {item["target"]["image_id"]: item for item in (dataset[i] for i in range(len(dataset)))}


def test_categories_labels_and_dataset_info(coco_root):
    dm = datamodule(coco_root)  # before setup: what LightningCLI links into the model
    assert [c["id"] for c in dm.categories] == [84, 90, 121, 150, 200]
    assert dm.num_classes == 2 and dm.num_stuff_classes == 3 and dm.class_names == ["zebra", "kite"]
    assert dm.label_to_category_id == {1: 84, 2: 90}
    colours = {c["id"]: c["color"] for c in dm.categories}
    assert all(colours[c["id"]] == c["color"] for c in CATEGORIES if "color" in c)  # the json's colours kept
    assert len(colours[200]) == 3 and all(0 <= v <= 255 for v in colours[200])  # a fixed palette fills in
    assert colours[200] == datamodule(coco_root).categories[-1]["color"] and colours[200] not in [
        c["color"] for c in CATEGORIES if "color" in c]

    info = dataset_info(dm)
    buffer = io.BytesIO()
    torch.save({"data": info.as_dict()}, buffer)
    buffer.seek(0)
    assert DatasetInfo.from_dict(torch.load(buffer, weights_only=True)["data"]) == info  # plain values only
    assert info.categories == [{k: c[k] for k in ("id", "name", "isthing", "color")} for c in dm.categories]
    assert info.class_names == ["zebra", "kite"] and info.label_to_category_id == {1: 84, 2: 90}
    assert info.ignore_index == 255
    assert info.predict == {"transform": "datamodules.coco.eval_transform", "batch_size": 2,
                            "collate": "datamodules.coco.collate_detection"}


def test_val_targets_are_what_the_png_and_json_say(coco_root, caplog):
    dm = datamodule(coco_root)
    with caplog.at_level(logging.WARNING, logger="datamodules.coco_panoptic"):
        dm.setup("validate")
    assert dm.empty_segments == {"val2017": 1} and len(caplog.records) == 1  # the ghost kite, counted once
    assert "1 segments are listed with area 0" in caplog.text
    val = by_id(dm.datasets["val"])
    assert sorted(val) == [21, 22, 23]  # the image without segments is kept for evaluation
    for image_id, item in val.items():
        target, (ids, segments) = item["target"], files_of(item["path"])
        assert target["image_id"] == target["results_id"] == image_id  # the COCO id
        assert item["image"].shape == (3, *ids.shape) and item["image"].dtype == torch.float32
        assert instances_of(target) == expected_instances(ids, segments, crowds=True)
        assert_boxes_and_areas_from_masks(target)
        assert target["semantic"].dtype == torch.int64
        assert np.array_equal(target["semantic"].numpy(), expected_semantic(ids, segments))
        assert target["panoptic"].dtype == torch.int64 and np.array_equal(target["panoptic"].numpy(), ids)
        assert target["segments"] == [{k: s[k] for k in ("id", "category_id", "iscrowd")} for s in segments
                                      if (ids == s["id"]).any()]  # those with pixels
    crowd = val[21]["target"]
    assert crowd["labels"].tolist().count(1) == 2 and crowd["iscrowd"].sum() == 1  # zebras; the kites' crowd
    assert GHOST not in [s["id"] for s in crowd["segments"]]
    empty = val[22]["target"]
    assert (empty["semantic"] == 255).all() and (empty["panoptic"] == 0).all() and empty["segments"] == []
    assert empty["masks"].shape == (0, 48, 64) and empty["boxes"].shape == (0, 4)
    assert val[23]["target"]["iscrowd"].tolist() == [1] and val[23]["image"].shape == (3, 64, 48)


def test_training_batches_follow_the_flipped_image_hold_no_crowd_and_skip_empty_images(coco_root, caplog):
    dm = datamodule(coco_root, flip_prob=1.0, scale_range=(1.0, 1.0), group_aspect_ratio=False)
    with caplog.at_level(logging.WARNING, logger="datamodules.coco_panoptic"):
        dm.setup("fit")
    assert dm.skipped_train_image_ids == [13] and "1 of 5 images have no segment" in caplog.text
    assert sum("left out of training" in r.message for r in caplog.records) == 1
    seen = []
    for batch in dm.train_dataloader():
        assert set(batch) == {"image", "target", "path"} and len(batch["image"]) == 2
        for image, path, target in zip(batch["image"], batch["path"], batch["target"]):
            ids, segments = files_of(path)
            ids = ids[:, ::-1]
            seen.append(target["image_id"])
            assert target["results_id"] == target["image_id"] == int(Path(path).stem)
            assert instances_of(target) == expected_instances(ids, segments, crowds=False)
            assert (target["iscrowd"] == 0).all() and "panoptic" not in target and "segments" not in target
            assert_boxes_and_areas_from_masks(target)
            semantic = target["semantic"].numpy()
            assert np.array_equal(semantic, expected_semantic(ids, segments))
            thing = image.mean(0).numpy() > 0.5  # the photo follows: things white, the rest dark
            assert np.array_equal(thing, semantic == 0)
    assert sorted(seen) == [11, 12, 14, 15]  # the crowds-only image trains the stuff


def test_aspect_ratio_batches_with_scale_jitter_stay_consistent(coco_root):
    dm = datamodule(coco_root, scale_range=(0.5, 1.5))
    dm.setup("fit")
    assert dm.datasets["train"].group_ids == [0, 1, 0, 0]  # 11, 12 (tall), 14, 15
    sizes = set()
    for _ in range(3):
        for batch in dm.train_dataloader():
            assert len({img.shape[2] >= img.shape[1] for img in batch["image"]}) == 1  # all wide or all tall
            for image, target in zip(batch["image"], batch["target"]):
                sizes.add(tuple(image.shape[1:]))
                assert target["masks"].shape[1:] == target["semantic"].shape == image.shape[1:]
                assert_boxes_and_areas_from_masks(target)
                assert (target["semantic"].numpy()[target["masks"].numpy().any(0)] == 0).all()
    assert len(sizes) > 2


def test_predict_reads_the_val_images_with_their_coco_ids(coco_root):
    dm = datamodule(coco_root)
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert set(batch) == {"image", "path", "image_id"} and batch["image_id"] == [21, 22]


def test_an_image_the_json_has_no_annotation_for_is_all_void(coco_root):
    for split, image_id in (("train2017", 13), ("val2017", 22)):
        edit_json(coco_root, split, lambda data, image_id=image_id: data["annotations"].remove(
            next(a for a in data["annotations"] if a["image_id"] == image_id)))
        (coco_root / "annotations" / f"panoptic_{split}" / f"{image_id:012d}.png").unlink()  # not read
    dm = datamodule(coco_root)
    dm.setup("fit")
    assert dm.skipped_train_image_ids == [13]
    target = by_id(dm.datasets["val"])[22]["target"]
    assert (target["semantic"] == 255).all() and (target["panoptic"] == 0).all() and target["segments"] == []
    assert target["labels"].shape == (0,) and target["semantic"].shape == (48, 64)


def test_png_folder_directly_under_root(coco_root):
    shutil.move(coco_root / "annotations" / "panoptic_val2017", coco_root / "panoptic_val2017")
    dm = datamodule(coco_root)
    assert dm.png_dir("val2017") == coco_root / "panoptic_val2017"
    dm.setup("validate")
    assert np.array_equal(by_id(dm.datasets["val"])[21]["target"]["panoptic"].numpy(), scene()[0])
    shutil.rmtree(coco_root / "panoptic_val2017")
    with pytest.raises(DatasetError, match=r"panoptic_val2017: the val2017 panoptic PNG folder does not exist \(nor "):
        datamodule(coco_root).setup("validate")


def edit_json(root: Path, split: str, edit) -> Path:
    path = root / "annotations" / f"panoptic_{split}.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


def test_quirks_of_the_json_are_named(coco_root):
    def validate():
        datamodule(coco_root).setup("validate")

    def unknown_category(data):
        data["annotations"][0]["segments_info"][1]["category_id"] = 33

    path = edit_json(coco_root, "val2017", unknown_category)
    with pytest.raises(DatasetError, match=rf"{path}: image 21 \(000000000021.jpg\): segment {GRASS} has "
                                           r"category_id 33, not one of \[84, 90, 121, 150, 200\]"):
        validate()
    edit_json(coco_root, "val2017", lambda data: data["annotations"][0]["segments_info"][1].update(category_id=121))

    edit_json(coco_root, "val2017", lambda data: data["annotations"][1].update(image_id=99))
    with pytest.raises(DatasetError, match=rf"{path}: the annotation of 000000000022.png refers to image 99, which is "
                                           "not in 'images'"):
        validate()
    edit_json(coco_root, "val2017", lambda data: data["annotations"][1].update(image_id=22))

    train = edit_json(coco_root, "train2017", lambda data: data["categories"].pop())
    with pytest.raises(DatasetError, match=rf"{train}: category ids \[84, 90, 150, 200\] differ from the val split's"):
        datamodule(coco_root).setup("fit")


def test_quirks_of_the_pngs_are_named(coco_root):
    def val_item(image_id: int) -> dict:
        dm = datamodule(coco_root)
        dm.setup("validate")
        return by_id(dm.datasets["val"])[image_id]

    png = coco_root / "annotations" / "panoptic_val2017" / "000000000021.png"
    ids = scene()[0]
    ids[0, 0] = 4_242_424
    Image.fromarray(id2rgb(ids)).save(png)
    with pytest.raises(DatasetError, match=rf"{png} \(image .*000000000021.jpg\): segment id 4242424 has pixels but "
                                           "no entry in the segments list"):
        val_item(21)

    Image.fromarray(id2rgb(scene()[0][:40])).save(png)
    with pytest.raises(DatasetError, match=rf"{png} \(image .*000000000021.jpg\): segments are 40x64 .*the image is "
                                           "48x64"):
        val_item(21)

    # A segment the json lists with pixels (area > 0) that the PNG lacks is left out as well.
    ids = scene()[0]
    ids[ids == KITE] = SKY
    Image.fromarray(id2rgb(ids)).save(png)
    target = val_item(21)["target"]
    assert KITE not in [s["id"] for s in target["segments"]] and target["labels"].tolist().count(2) == 1  # crowd

    png.unlink()
    with pytest.raises(DatasetError, match=rf"{png}: the panoptic PNG of image 000000000021.jpg \(listed in .*"
                                           r"panoptic_val2017.json\) does not exist"):
        val_item(21)


def test_config_file_instantiates_the_datamodule(coco_root):
    parser = ArgumentParser()
    parser.add_subclass_arguments(L.LightningDataModule, "data")
    config = parser.parse_path(CONFIGS / "data" / "coco_panoptic.yaml")
    config.data.init_args.root = str(coco_root)
    dm = parser.instantiate(config).data
    assert isinstance(dm, COCOPanopticDataModule)
    assert (dm.batch_size, dm.num_workers, dm.scale_range) == (2, None, (1.0, 1.0))
    assert dm.num_classes == 2 and dm.num_stuff_classes == 3
