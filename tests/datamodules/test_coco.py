"""COCODataModule on small datasets written in the real COCO layout (json + image files)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
import yaml
from lightning.fabric.utilities.data import _replace_dunder_methods
from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.data import _update_dataloader
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from datamodules.coco import QUICKSTART_ROOT, COCODataModule, GroupedBatchSampler
from datamodules.common import DatasetError
from datamodules.quickstart_detection import write_detection

from ..conftest import CONFIGS

# pycocotools' compiled decoder (2.0.11) trips numpy 2's copy-keyword deprecation on every mask; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

# Unsorted, non-contiguous ids: labels follow the id order (2 -> 1, 5 -> 2, 9 -> 3).
CATEGORIES = [{"id": 9, "name": "kite"}, {"id": 2, "name": "bicycle"}, {"id": 5, "name": "plane"}]
# Masks given pixel by pixel, stored as compressed and as uncompressed RLE.
L_SHAPE = np.zeros((48, 64), np.uint8)
L_SHAPE[10:30, 5:10] = L_SHAPE[25:30, 5:25] = 1
RING = np.zeros((48, 64), np.uint8)
RING[30:46, 40:60], RING[34:42, 44:56] = 1, 0


def image(image_id: int, width: int = 64, height: int = 48) -> dict:
    return {"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": width, "height": height}


def ann(ann_id: int, image_id: int, category_id: int, bbox, iscrowd: int = 0, segmentation=None) -> dict:
    """An annotation whose default mask is its box as a polygon (pycocotools fills [x, x + w) exactly)."""
    x, y, w, h = bbox
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": list(bbox), "area": w * h,
            "iscrowd": iscrowd, "segmentation": segmentation or [[x, y, x + w, y, x + w, y + h, x, y + h]]}


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"counts": rle["counts"].decode(), "size": list(mask.shape)}


def uncompressed_rle(mask: np.ndarray) -> dict:
    """Column-major run lengths starting with zeros, as COCO stores crowd regions."""
    flat, counts, value, run = mask.flatten(order="F"), [], 0, 0
    for pixel in flat:
        if pixel != value:
            counts.append(run)
            value, run = pixel, 0
        run += 1
    return {"counts": [*counts, run], "size": list(mask.shape)}


def mask_box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def mask_box_xywh(mask: np.ndarray) -> list[int]:
    x1, y1, x2, y2 = (int(v) for v in mask_box(mask))
    return [x1, y1, x2 - x1, y2 - y1]


def write_split(root: Path, split: str, images: list[dict], annotations: list[dict], categories=CATEGORIES) -> Path:
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for info in images:
        pixels = rng.integers(0, 255, (info["height"], info["width"], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / split / info["file_name"])
    dataset = {"info": {}, "licenses": [], "images": images, "annotations": annotations, "categories": categories}
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(dataset))
    return path


@pytest.fixture
def coco_root(tmp_path) -> Path:
    root = tmp_path / "coco"
    crowd = compressed_rle(RING)
    write_split(root, "train2017", [image(11), image(12, 48, 64), image(13), image(14), image(15, 48, 64)], [
        ann(101, 11, 9, [4, 4, 20, 16]),
        ann(102, 11, 2, mask_box_xywh(RING), iscrowd=1, segmentation=crowd),
        ann(103, 11, 5, [30, 30, 0, 10]),  # zero width
        ann(104, 11, 5, [70, 10, 5, 5]),  # right of the 64-pixel image: nothing left after clipping
        ann(105, 12, 5, [8, 8, 16, 24]),
        ann(106, 13, 2, mask_box_xywh(RING), iscrowd=1, segmentation=crowd),  # only a crowd: skipped in training
        ann(107, 15, 2, [10, 20, 20, 30]),
    ])
    write_split(root, "val2017", [image(21), image(22), image(23)], [
        ann(201, 21, 2, [2, 2, 30, 20]),
        ann(202, 21, 9, mask_box_xywh(RING), iscrowd=1, segmentation=uncompressed_rle(RING)),
        ann(203, 21, 9, [40, 2, 10, 0]),  # zero height
        ann(204, 23, 2, [3, 4, 12, 9]),  # polygon
        ann(205, 23, 5, mask_box_xywh(L_SHAPE), segmentation=compressed_rle(L_SHAPE)),
        ann(206, 23, 9, mask_box_xywh(RING), segmentation=uncompressed_rle(RING)),
    ])  # image 22 has no annotation
    return root


def by_id(dataset) -> dict[int, dict]:
    return {item["target"]["image_id"]: item for item in (dataset[i] for i in range(len(dataset)))}


def test_categories_map_to_contiguous_labels_and_back(coco_root):
    dm = COCODataModule(str(coco_root), num_workers=0)  # before setup: what LightningCLI links into the model
    assert dm.num_classes == 3
    assert dm.class_names == ["bicycle", "plane", "kite"]
    assert dm.label_to_category_id == {1: 2, 2: 5, 3: 9}
    assert dm.val_annotation_file == str(coco_root / "annotations" / "instances_val2017.json")
    dm.setup("fit")
    train = by_id(dm.datasets["train"])
    assert train[11]["target"]["labels"].tolist() == [3]  # category 9
    assert [dm.label_to_category_id[label] for label in train[12]["target"]["labels"].tolist()] == [5]


def test_crowds_and_empty_images_train_vs_eval(coco_root, caplog):
    dm = COCODataModule(str(coco_root), num_workers=0)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    assert "2 of 5 images have no usable (non-crowd) annotation" in caplog.text
    assert dm.skipped_train_image_ids == [13, 14]
    train, val = by_id(dm.datasets["train"]), by_id(dm.datasets["val"])
    assert sorted(train) == [11, 12, 15]
    assert train[11]["target"]["iscrowd"].tolist() == [0]  # the crowd ring is gone, and so are the empty boxes
    assert train[11]["target"]["masks"].shape[0] == 1
    assert sorted(val) == [21, 22, 23]
    assert val[21]["target"]["iscrowd"].tolist() == [0, 1]  # crowd kept for the evaluator; zero-height box dropped
    assert val[21]["target"]["labels"].tolist() == [1, 3]
    assert val[22]["target"]["boxes"].shape == (0, 4) and val[22]["target"]["masks"].shape == (0, 48, 64)


def test_polygon_and_both_rle_forms_decode_to_their_pixels(coco_root):
    dm = COCODataModule(str(coco_root), num_workers=0)
    dm.setup("validate")
    target = by_id(dm.datasets["val"])[23]["target"]
    rectangle = np.zeros((48, 64), np.uint8)
    rectangle[4:13, 3:15] = 1
    masks = target["masks"].numpy()
    assert masks.dtype == np.uint8
    np.testing.assert_array_equal(masks[0], rectangle)
    np.testing.assert_array_equal(masks[1], L_SHAPE)
    np.testing.assert_array_equal(masks[2], RING)
    assert target["boxes"].tolist() == [[3, 4, 15, 13], mask_box(L_SHAPE), mask_box(RING)]
    assert target["area"].tolist() == [12 * 9, 20 * 20, 20 * 16]  # the json's areas (here: of the boxes)


def test_flip_and_scale_keep_boxes_on_their_masks(coco_root):
    dm = COCODataModule(str(coco_root), num_workers=0, flip_prob=1.0, scale_range=(1.0, 1.0))
    dm.setup("fit")
    item = by_id(dm.datasets["train"])[11]
    assert item["target"]["boxes"].tolist() == [[64 - 24, 4, 64 - 4, 20]]  # mirrored in the 64-pixel width
    assert item["target"]["boxes"][0].tolist() == mask_box(item["target"]["masks"][0].numpy())

    dm = COCODataModule(str(coco_root), num_workers=0, scale_range=(0.5, 1.5))
    dm.setup("fit")
    sizes = set()
    for seed in range(8):
        dm.datasets["train"].reseed(seed)
        for index in range(len(dm.datasets["train"])):
            item = dm.datasets["train"][index]
            image, target = item["image"], item["target"]
            assert image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
            assert target["masks"].shape[1:] == image.shape[1:]
            for box, mask in zip(target["boxes"].tolist(), target["masks"].numpy()):
                np.testing.assert_allclose(box, mask_box(mask), atol=1.5)  # nearest-neighbour mask resize
            sizes.add(tuple(image.shape))
    assert len(sizes) > 3  # the scale jitter changes the image size


def test_batches_in_detection_format(coco_root, tmp_path):
    dm = COCODataModule(str(coco_root), num_workers=0, batch_size=2, with_masks=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "target", "path"} and len(batch["image"]) == 2
    target = batch["target"][0]
    assert set(target) == {"boxes", "labels", "image_id", "iscrowd", "area"}  # no masks asked for
    assert (target["boxes"].dtype, target["labels"].dtype, target["iscrowd"].dtype, target["area"].dtype) == \
        (torch.float32, torch.int64, torch.int64, torch.float32)
    assert len(dm.train_dataloader()) == 1  # 3 annotated images, full batches only

    dm.setup("predict")  # default: the val split, with COCO ids
    batch = next(iter(dm.predict_dataloader()))
    assert set(batch) == {"image", "path", "image_id"} and batch["image_id"] == [21, 22]
    folder = tmp_path / "photos" / "sub"
    folder.mkdir(parents=True)
    Image.new("RGB", (30, 20)).save(folder / "a.png")
    dm = COCODataModule(str(coco_root), num_workers=0, predict_root=str(tmp_path / "photos"))
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert set(batch) == {"image", "path"} and batch["image"][0].shape == (3, 20, 30)


def test_missing_image_fails_at_setup_naming_it(coco_root):
    (coco_root / "val2017" / "000000000022.jpg").unlink()
    dm = COCODataModule(str(coco_root), num_workers=0)
    with pytest.raises(DatasetError, match="000000000022.jpg"):
        dm.setup("validate")


@pytest.mark.parametrize("change, message", [
    ({"bbox": [1, 1, -3, 4]}, "bbox"),
    ({"category_id": 4}, "category_id 4"),
])
def test_bad_annotation_names_it_and_its_file(coco_root, change, message):
    path = coco_root / "annotations" / "instances_train2017.json"
    dataset = json.loads(path.read_text())
    dataset["annotations"][4].update(change)
    path.write_text(json.dumps(dataset))
    dm = COCODataModule(str(coco_root), num_workers=0)
    with pytest.raises(DatasetError, match=message) as error:
        dm.setup("fit")
    assert f"{path}: annotation 105" in str(error.value)


def test_aspect_ratio_batches_survive_lightning_ddp_sampler(tmp_path):
    root = tmp_path / "coco"
    sizes = [(64, 48), (48, 64), (64, 64), (40, 64), (64, 40), (64, 48), (48, 64)] * 2  # 8 wide, 6 tall
    images = [image(i, w, h) for i, (w, h) in enumerate(sizes, 1)]
    annotations = [ann(100 + i, i, 2, [2, 2, 20, 20]) for i in range(1, len(sizes) + 1)]
    write_split(root, "train2017", images, annotations)
    write_split(root, "val2017", images[:1], annotations[:1])
    dm = COCODataModule(str(root), num_workers=0, batch_size=3)
    dm.setup("fit")
    groups = dm.datasets["train"].group_ids
    assert groups.count(1) == 6

    # What the Trainer does: capture the loader's arguments in the hook, then rebuild it per rank.
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = dm.train_dataloader()
    per_rank = []
    for rank in range(2):
        sampler = _get_distributed_sampler(loader, shuffle=True, overfit_batches=0, mode=RunningStage.TRAINING,
                                           num_replicas=2, rank=rank)
        ddp_loader = _update_dataloader(loader, sampler, mode=RunningStage.TRAINING)
        assert isinstance(ddp_loader.batch_sampler, GroupedBatchSampler)
        assert isinstance(ddp_loader.batch_sampler.sampler, DistributedSampler)
        batches = list(ddp_loader.batch_sampler)
        assert len(batches) == len(ddp_loader) == 7 // 3  # the same number of steps on every rank
        assert all(len(b) == 3 and len({groups[i] for i in b}) == 1 for b in batches)  # one group per batch
        assert set().union(*batches) <= set(sampler)  # only this rank's share
        per_rank.append(set().union(*batches))
        batch = next(iter(ddp_loader))
        assert len({img.shape[2] >= img.shape[1] for img in batch["image"]}) == 1  # all wide or all tall
    assert not per_rank[0] & per_rank[1]

    # drop_last=False (what Lightning sets when predicting): every index exactly once.
    batches = list(GroupedBatchSampler(range(len(groups)), 3, drop_last=False, group_ids=groups))
    assert sorted(i for b in batches for i in b) == list(range(len(groups))) and len(batches) == 5


def test_quickstart_writer_layout_idempotence_and_determinism(tmp_path):
    root = write_detection(tmp_path / "a")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    stamps = [p.stat().st_mtime_ns for p in files]
    assert write_detection(root) == root and [p.stat().st_mtime_ns for p in files] == stamps  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary folder left behind
    other = write_detection(tmp_path / "b")
    assert [p.read_bytes() for p in files] == [(other / p.relative_to(root)).read_bytes() for p in files]

    for split, count in (("train2017", 40), ("val2017", 10)):
        raw = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        assert {"info", "licenses", "images", "annotations", "categories"} <= set(raw)
        coco = COCO(str(root / "annotations" / f"instances_{split}.json"))
        assert len(coco.imgs) == count == len(list((root / split).glob("*.jpg")))
        assert sorted(coco.cats) == [1, 3, 7]
        assert any(info["height"] > info["width"] for info in coco.imgs.values())  # some tall images
        crowds = [a for a in coco.anns.values() if a["iscrowd"]]
        assert crowds and all(isinstance(a["segmentation"]["counts"], list) for a in crowds)
        assert all(isinstance(a["segmentation"], list) for a in coco.anns.values() if not a["iscrowd"])
        assert all(coco.imgToAnns[i] for i in coco.imgs if i != 1000)
    assert not COCO(str(root / "annotations" / "instances_train2017.json")).imgToAnns[1000]  # the empty image


@pytest.mark.parametrize("exists", [False, True], ids=["missing", "empty"])
def test_quickstart_datamodule_fills_its_own_folder_and_says_where(in_tmp, caplog, exists):
    recipe = yaml.safe_load((CONFIGS / "quickstart" / "detection.yaml").read_text())["data"]["init_args"]
    assert recipe["root"] == QUICKSTART_ROOT and recipe["quickstart"] is True
    root = in_tmp / QUICKSTART_ROOT
    if exists:
        root.mkdir(parents=True)  # empty, as a mounted volume would be
    dm = COCODataModule(QUICKSTART_ROOT, quickstart=True, num_workers=0)
    assert dm.num_classes == 3 and dm.label_to_category_id == {1: 1, 2: 3, 3: 7}  # before any file exists
    with caplog.at_level(logging.INFO):
        dm.prepare_data()
    assert f"quickstart: using the built-in demo data in {root} " in caplog.text
    dm.setup("fit")
    assert dm.skipped_train_image_ids == [1000]
    assert len(dm.datasets["train"]) == 39 and len(dm.datasets["val"]) == 10
    assert any(item["target"]["iscrowd"].any() for item in by_id(dm.datasets["val"]).values())


@pytest.mark.parametrize("exists", [False, True], ids=["missing", "empty"])
def test_quickstart_with_a_root_of_yours_that_holds_no_dataset_stops_and_writes_nothing(in_tmp, exists):
    mine = in_tmp / "my_data"
    if exists:
        mine.mkdir()
    dm = COCODataModule(str(mine), quickstart=True, num_workers=0)
    message = (rf"{mine}: holds no dataset \(expected annotations/instances_val2017.json and <split>/ images\); "
               r".* set quickstart: false \(--data.init_args.quickstart false\)")
    for step in (lambda: dm.num_classes, dm.prepare_data):
        with pytest.raises(DatasetError, match=message):
            step()
    assert list(in_tmp.rglob("*")) == ([mine] if exists else [])


def test_quickstart_reads_a_root_of_yours_that_holds_a_dataset(coco_root, caplog):
    before = sorted(coco_root.rglob("*"))
    dm = COCODataModule(str(coco_root), quickstart=True, num_workers=0)
    with caplog.at_level(logging.INFO):
        dm.prepare_data()
        dm.setup("validate")
    assert dm.class_names == ["bicycle", "plane", "kite"] and len(dm.datasets["val"]) == 3
    assert sorted(coco_root.rglob("*")) == before and "demo data" not in caplog.text


@pytest.mark.parametrize("workers", [0, 2])
def test_training_batches_resume_mid_epoch_with_the_same_images_and_augmentation(tmp_path, workers):
    # What a resumed run does: a new process loads the train loader's saved state (Lightning keeps it in the
    # checkpoint) and the saved global random state (RNGStateCheckpoint), then continues the epoch and the next.
    root = tmp_path / "coco"
    sizes = [(64, 48), (48, 64), (64, 64), (40, 64), (64, 40), (64, 48), (48, 64)] * 2
    images = [image(i, w, h) for i, (w, h) in enumerate(sizes, 1)]
    write_split(root, "train2017", images, [ann(100 + i, i, 2, [2, 2, 20, 20]) for i in range(1, len(sizes) + 1)])
    write_split(root, "val2017", images[:1], [ann(101, 1, 2, [2, 2, 20, 20])])

    def train_loader(seed: int):
        torch.manual_seed(seed)
        dm = COCODataModule(str(root), num_workers=workers, batch_size=2, scale_range=(0.5, 1.5))
        dm.setup("fit")
        return dm.train_dataloader()

    def contents(batch) -> tuple:
        return batch["path"], [img.sum().item() for img in batch["image"]], [t["boxes"] for t in batch["target"]]

    loader = train_loader(seed=7)
    expected = [contents(b) for _ in range(2) for b in loader]  # 2 epochs of 7 batches
    loader, seen = train_loader(seed=7), []
    for batch in loader:
        seen.append(contents(batch))
        if len(seen) == 3:
            state, rng = loader.state_dict(), torch.get_rng_state()
            break
    resumed = train_loader(seed=123)  # another process: its own seeds until the checkpoint's are loaded
    resumed.load_state_dict(state)
    epoch = iter(resumed)
    torch.set_rng_state(rng)
    seen += [contents(b) for b in epoch] + [contents(b) for b in resumed]
    assert len(seen) == len(expected) == 14
    for got, want in zip(seen, expected):
        assert got[0] == want[0] and got[1] == want[1]
        assert all(torch.equal(a, b) for a, b in zip(got[2], want[2]))
