"""Cityscapes datamodule on small data written in the official on-disk layout."""

from __future__ import annotations

import json
import logging
from collections import Counter

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from datamodules.cityscapes import QUICKSTART_ROOT, CityscapesDataModule, read_train_ids
from datamodules.cityscapes_labels import CLASS_NAMES, LABEL_ID_TO_TRAIN_ID, PALETTE
from datamodules.common import DatasetError
from datamodules.quickstart_segmentation import HEIGHT, WIDTH, write_cityscapes

from ..conftest import CONFIGS

# Label id -> photo colour: the image's colour tells which label a pixel has, after any transform.
# Unlabeled is black like the padding, since both become 255 in the mask.
ID_COLOURS = {0: (0, 0, 0), 7: (200, 40, 40), 11: (220, 220, 40), 23: (40, 200, 40), 26: (40, 40, 200)}


def scene(height: int = 60, width: int = 80) -> np.ndarray:
    """Label ids of an asymmetric street: sky, a building on the left, road, a car on the right, unlabeled strip."""
    ids = np.full((height, width), 23, np.uint8)
    ids[height // 6:height // 2, : width // 3] = 11
    ids[height // 2:] = 7
    ids[2 * height // 3:height - 8, width // 2:width - 6] = 26
    ids[height - 6:] = 0
    return ids


def photo_of(ids: np.ndarray) -> np.ndarray:
    photo = np.zeros((*ids.shape, 3), np.uint8)
    for label_id, colour in ID_COLOURS.items():
        photo[ids == label_id] = colour
    return photo


def write_frame(root, split, city, index, ids=None, image_size=None):
    """One frame: the photo (colour-coded by label), its labelIds and the files real Cityscapes keeps beside it."""
    ids = scene() if ids is None else ids
    name = f"{city}_{index:06d}_000019"
    photo = photo_of(ids)
    image = root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png"
    labels = root / "gtFine" / split / city
    image.parent.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo).resize(image_size or photo.shape[1::-1]).save(image)
    Image.fromarray(ids).save(labels / f"{name}_gtFine_labelIds.png")
    # Decoys a careless glob would pick up: RGB, 16-bit ids far above 33, json.
    Image.fromarray(photo).save(labels / f"{name}_gtFine_color.png")
    Image.fromarray(ids.astype(np.uint16) * 1000).save(labels / f"{name}_gtFine_instanceIds.png")
    (labels / f"{name}_gtFine_polygons.json").write_text(json.dumps({"imgHeight": 60, "imgWidth": 80, "objects": []}))
    return image, labels / f"{name}_gtFine_labelIds.png"


@pytest.fixture
def cityscapes(tmp_path):
    """Train: 2 + 2 frames in two cities; val: 2 frames; test: 1 frame."""
    for split, cities in (("train", ("aachen", "bochum")), ("val", ("frankfurt",)), ("test", ("berlin",))):
        for city in cities:
            for i in range(1 if split == "test" else 2):
                write_frame(tmp_path, split, city, i)
    return tmp_path


def datamodule(root, **kwargs):
    return CityscapesDataModule(str(root), **{"batch_size": 2, "num_workers": 0, "crop_size": (48, 64),
                                              "scale_range": (0.5, 1.5), "color_jitter": 0, **kwargs})


def to_rgb(image: torch.Tensor) -> np.ndarray:
    """Back to the uint8 range: float [3, H, W] in [0, 1] -> [H, W, 3] in 0..255."""
    return (image * 255).permute(1, 2, 0).numpy()


def as_float(rgb: np.ndarray) -> torch.Tensor:
    """What the datamodule should deliver for a uint8 [H, W, 3] image: float32 [3, H, W], each value / 255."""
    return torch.from_numpy(rgb).permute(2, 0, 1).float() / 255


def assert_unit_range(image: torch.Tensor) -> None:
    """Not normalised (the model does that): float32 in [0, 1], each value a uint8 value / 255."""
    assert image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert torch.equal((image * 255).round() / 255, image)


def train_ids_from_colour(rgb: np.ndarray) -> np.ndarray:
    """The train id each pixel's (nearest) colour stands for."""
    ids = np.array(list(ID_COLOURS))
    colours = np.array(list(ID_COLOURS.values()), np.float32)
    nearest = ((rgb[..., None, :] - colours) ** 2).sum(-1).argmin(-1)
    return LABEL_ID_TO_TRAIN_ID[ids[nearest]]


def interior(mask: np.ndarray, radius: int = 2) -> np.ndarray:
    """Pixels farther than ``radius`` from a label edge (where bilinear image and nearest mask may differ)."""
    padded, (height, width) = np.pad(mask, radius, mode="edge"), mask.shape
    size = 2 * radius + 1
    return np.logical_and.reduce([padded[dy:dy + height, dx:dx + width] == mask
                                  for dy in range(size) for dx in range(size)])


def error_of(load) -> str:
    """The DatasetError message of ``load()``.

    Its traceback is dropped (it forms a cycle with torch's re-raising frame), so the failed DataLoader
    iterator shuts its worker down now, not at a garbage collection during a later test, which
    was seen to wait 5 s for the worker.
    """
    try:
        load()
    except DatasetError as err:
        err.__traceback__ = None
        return str(err)
    raise AssertionError("no DatasetError")


def test_label_ids_become_the_19_train_ids_and_everything_else_ignore(tmp_path):
    path = tmp_path / "x_gtFine_labelIds.png"
    Image.fromarray(np.arange(34, dtype=np.uint8).reshape(2, 17)).save(path)
    train_ids = read_train_ids(path).flatten().tolist()
    expected = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
                27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
    assert train_ids == [expected.get(label_id, 255) for label_id in range(34)]
    assert len(CLASS_NAMES) == len(PALETTE) == 19
    assert (CLASS_NAMES[0], CLASS_NAMES[13], CLASS_NAMES[18]) == ("road", "car", "bicycle")
    assert (PALETTE[0], PALETTE[10], PALETTE[18]) == ((128, 64, 128), (70, 130, 180), (119, 11, 32))
    dm = datamodule(tmp_path / "nothing written yet")
    assert dm.num_classes == 19 and dm.class_names == list(CLASS_NAMES)


def test_validation_keeps_full_size_unpadded_and_maps_labels(cityscapes):
    ids = scene(HEIGHT, WIDTH)  # 120 x 240: not a multiple of 32, and it stays so
    write_frame(cityscapes, "val", "frankfurt", 0, ids)
    write_frame(cityscapes, "val", "frankfurt", 1, ids)
    dm = datamodule(cityscapes, val_batch_size=2)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (2, 3, HEIGHT, WIDTH) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (2, HEIGHT, WIDTH) and batch["mask"].dtype == torch.int64
    assert (batch["mask"][0].numpy() == LABEL_ID_TO_TRAIN_ID[ids]).all()
    assert torch.equal(batch["image"][0], as_float(photo_of(ids)))  # full size: every pixel its uint8 value / 255
    assert batch["path"][0].endswith("frankfurt/frankfurt_000000_000019_leftImg8bit.png")
    half = datamodule(cityscapes, eval_scale=0.5)
    half.setup("validate")
    batch = next(iter(half.val_dataloader()))
    assert batch["image"].shape == (1, 3, HEIGHT // 2, WIDTH // 2)
    assert batch["image"].dtype == torch.float32 and 0 <= batch["image"].min() and batch["image"].max() <= 1
    assert (batch["mask"][0].numpy() == LABEL_ID_TO_TRAIN_ID[ids[::2, ::2]]).all()  # nearest: no blended ids


def test_training_crops_transform_image_and_mask_together(cityscapes):
    torch.manual_seed(0)
    dm = datamodule(cityscapes, batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 48, 64) and batch["mask"].shape == (4, 48, 64)
    assert batch["mask"].dtype == torch.int64 and len(batch["path"]) == 4
    assert_unit_range(batch["image"])
    dataset, agreement, padded = dm.datasets["train"], [], 0
    for _ in range(16):  # random scale (padded with image 0 / mask 255 when small), crop and flip
        item = dataset[0]
        mask, inside = item["mask"].numpy(), interior(item["mask"].numpy())
        agreement.append((train_ids_from_colour(to_rgb(item["image"])) == mask)[inside].mean())
        assert inside.mean() > 0.5
        padded += bool((item["mask"][:, 0] == 255).all() or (item["mask"][0] == 255).all())
        black = torch.from_numpy(inside) & (item["mask"] == 255)  # padding and the unlabeled strip
        assert (item["image"][:, black] == 0).all()
    assert min(agreement) == 1  # a flip or crop applied to one but not the other would break this
    assert padded  # some crops came from images scaled below the crop size

    # Flip only: the mask must be mirrored with the image.
    flipped = datamodule(cityscapes, flip_prob=1.0, scale_range=(1, 1), crop_size=(60, 80))
    flipped.setup("fit")
    item = flipped.datasets["train"][0]
    assert (item["mask"].numpy() == LABEL_ID_TO_TRAIN_ID[scene()][:, ::-1]).all()
    assert (train_ids_from_colour(to_rgb(item["image"])) == item["mask"].numpy()).all()
    assert torch.equal(item["image"], as_float(np.ascontiguousarray(photo_of(scene())[:, ::-1])))

    # Colour jitter touches the image only.
    jittered = datamodule(cityscapes, color_jitter=0.2, flip_prob=0, scale_range=(1, 1), crop_size=(60, 80))
    jittered.setup("fit")
    item = jittered.datasets["train"][0]
    assert (item["mask"].numpy() == LABEL_ID_TO_TRAIN_ID[scene()]).all()
    assert not np.allclose(to_rgb(item["image"]), photo_of(scene()), atol=2)
    assert_unit_range(item["image"])


def test_image_without_label_file_is_named_at_setup(cityscapes):
    image, label = write_frame(cityscapes, "train", "aachen", 7)
    label.unlink()
    with pytest.raises(DatasetError, match=f"{label.name}: label file of {image.name} does not exist"):
        datamodule(cityscapes).setup("fit")


def test_label_ids_outside_0_to_33_are_named_even_from_a_worker(cityscapes):
    bad = scene()
    bad[0, 0] = 40
    _, label = write_frame(cityscapes, "val", "frankfurt", 0, bad)
    dm = datamodule(cityscapes, num_workers=1)
    dm.setup("validate")
    assert f"{label.name}: label ids [40] outside 0..33" in error_of(lambda: list(dm.val_dataloader()))


def test_image_and_label_of_different_sizes_are_named(cityscapes):
    image, label = write_frame(cityscapes, "val", "frankfurt", 0, image_size=(81, 60))
    dm = datamodule(cityscapes)
    dm.setup("validate")
    with pytest.raises(DatasetError, match=f"{label.name}: label is 60x80 .* image {image.name} is 60x81"):
        dm.datasets["val"][0]


def test_missing_image_folder_and_empty_split_are_named(cityscapes, tmp_path_factory):
    with pytest.raises(DatasetError, match="leftImg8bit: leftImg8bit images directory does not exist"):
        datamodule(tmp_path_factory.mktemp("empty")).setup("fit")
    for image in (cityscapes / "leftImg8bit" / "val" / "frankfurt").iterdir():
        image.unlink()
    with pytest.raises(DatasetError, match=r"leftImg8bit/val: no <city>/\*_leftImg8bit.png images"):
        datamodule(cityscapes).setup("validate")
    with pytest.raises(ValueError, match="scale_range"):
        datamodule(cityscapes, scale_range=(2.0, 0.5))


def test_two_workers_draw_different_augmentations_and_a_seed_repeats_them(tmp_path):
    # Eight copies of one noise image: two equal crops would mean two workers shared a random stream.
    noise = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    for i in range(8):
        image, _ = write_frame(tmp_path, "train", "aachen", i)
        Image.fromarray(noise).save(image)
    write_frame(tmp_path, "val", "frankfurt", 0)

    def crops(seed):
        torch.manual_seed(seed)
        dm = datamodule(tmp_path, num_workers=2, batch_size=1)
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader = torch.utils.data.DataLoader(loader.dataset, batch_size=1, num_workers=2,
                                             worker_init_fn=loader.worker_init_fn)  # unshuffled: worker 0, 1, 0, ...
        return [b["image"] for b in loader]

    first = crops(1)
    assert len({c.numpy().tobytes() for c in first}) == len(first)
    assert all(torch.equal(a, b) for a, b in zip(first, crops(1)))
    assert not all(torch.equal(a, b) for a, b in zip(first, crops(2)))


def test_state_dict_resumes_the_augmentation_stream(cityscapes):
    torch.manual_seed(0)
    dm = datamodule(cityscapes)
    dm.setup("fit")
    for _ in range(3):
        dm.datasets["train"][0]
    state = dm.state_dict()
    expected = [dm.datasets["train"][0] for _ in range(3)]

    torch.manual_seed(1)  # a resumed run seeds differently; the checkpointed stream wins
    resumed = datamodule(cityscapes)
    resumed.setup("fit")
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.datasets["train"][0]
        assert torch.equal(got["image"], want["image"]) and torch.equal(got["mask"], want["mask"])


def test_predict_over_a_folder_or_the_test_split(cityscapes, tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    (folder / "street").mkdir()
    Image.new("RGB", (50, 30), (1, 2, 3)).save(folder / "street" / "a.png")
    Image.new("RGB", (50, 30), (1, 2, 3)).save(folder / "b.jpg")
    (folder / "notes.txt").write_text("not an image")
    dm = datamodule(cityscapes, predict_root=str(folder), val_batch_size=2)
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert set(batch) == {"image", "path", "index", "size"} and batch["image"].shape == (2, 3, 30, 50)
    assert [p.rsplit("/", 1)[1] for p in batch["path"]] == ["b.jpg", "a.png"]
    assert torch.equal(batch["image"][1], as_float(np.full((30, 50, 3), (1, 2, 3), np.uint8)))  # a.png, lossless
    dm = datamodule(cityscapes)
    dm.setup("predict")
    batches = list(dm.predict_dataloader())
    assert [b["path"][0].rsplit("/", 1)[1] for b in batches] == ["berlin_000000_000019_leftImg8bit.png"]
    assert "mask" not in batches[0]


def test_quickstart_is_written_once_into_its_own_folder_in_the_official_layout_and_trains(in_tmp, caplog):
    recipe = yaml.safe_load((CONFIGS / "quickstart" / "segmentation.yaml").read_text())["data"]["init_args"]
    assert recipe["root"] == QUICKSTART_ROOT and recipe["quickstart"] is True
    root = in_tmp / QUICKSTART_ROOT
    dm = datamodule(QUICKSTART_ROOT, quickstart=True, crop_size=(96, 192), scale_range=(0.75, 1.5), batch_size=4)
    assert dm.num_classes == 19  # before any file exists
    with caplog.at_level(logging.INFO):
        dm.prepare_data()
    assert f"quickstart: using the built-in demo data in {root} " in caplog.text
    dm.setup("fit")
    images = sorted((root / "leftImg8bit").rglob("*_leftImg8bit.png"))
    per_city = Counter(p.parts[-3] + "/" + p.parts[-2] for p in images)
    assert per_city == {"train/aachen": 16, "train/bochum": 16, "val/frankfurt": 8, "test/berlin": 4}
    suffixes = {"_gtFine_color.png", "_gtFine_instanceIds.png", "_gtFine_labelIds.png", "_gtFine_polygons.json"}
    for image in images[::7]:
        stem = image.name.removesuffix("_leftImg8bit.png")
        labels = image.parents[3] / "gtFine" / image.parts[-3] / image.parts[-2]
        assert {p.name.removeprefix(stem) for p in labels.glob(f"{stem}_*")} == suffixes
        label_ids = np.asarray(Image.open(labels / f"{stem}_gtFine_labelIds.png"))
        instance_ids = np.asarray(Image.open(labels / f"{stem}_gtFine_instanceIds.png")).astype(np.int64)
        colour = np.asarray(Image.open(labels / f"{stem}_gtFine_color.png"))
        polygons = json.loads((labels / f"{stem}_gtFine_polygons.json").read_text())
        assert Image.open(image).size == (WIDTH, HEIGHT) and label_ids.shape == (HEIGHT, WIDTH)
        assert (np.where(instance_ids >= 1000, instance_ids // 1000, instance_ids) == label_ids).all()
        assert (colour[label_ids == 26] == (0, 0, 142)).all() and (colour[label_ids == 0] == 0).all()
        assert (polygons["imgHeight"], polygons["imgWidth"]) == (HEIGHT, WIDTH)
        assert {"sky", "road", "car"} <= {o["label"] for o in polygons["objects"]}

    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 96, 192) and batch["mask"].shape == (4, 96, 192)
    dm.setup("validate")
    seen = set().union(*(b["mask"].unique().tolist() for b in dm.val_dataloader()))
    assert {0, 1, 2, 10, 11, 13, 255} <= seen and seen <= set(range(19)) | {255}

    mtime = images[0].stat().st_mtime_ns
    dm.prepare_data()
    write_cityscapes(root)
    assert images[0].stat().st_mtime_ns == mtime
    (in_tmp / "other").mkdir()
    (in_tmp / "other" / "mine.txt").write_text("")
    with pytest.raises(DatasetError, match="other: exists and is not empty.*--data.init_args.quickstart false"):
        write_cityscapes(in_tmp / "other")


@pytest.mark.parametrize("exists", [False, True], ids=["missing", "empty"])
def test_quickstart_with_a_root_of_yours_that_holds_no_dataset_stops_and_writes_nothing(in_tmp, exists):
    mine = in_tmp / "my_data"
    if exists:
        mine.mkdir()
    with pytest.raises(DatasetError, match=rf"{mine}: holds no dataset \(expected leftImg8bit/ and gtFine/ .*"
                                           r"set quickstart: false \(--data.init_args.quickstart false\)"):
        datamodule(mine, quickstart=True).prepare_data()
    assert list(in_tmp.rglob("*")) == ([mine] if exists else [])


def test_quickstart_reads_a_root_of_yours_that_holds_a_dataset(cityscapes, caplog):
    before = sorted(cityscapes.rglob("*"))
    dm = datamodule(cityscapes, quickstart=True)
    with caplog.at_level(logging.INFO):
        dm.prepare_data()
        dm.setup("fit")
    assert len(dm.datasets["train"]) == 4 and sorted(cityscapes.rglob("*")) == before
    assert "demo data" not in caplog.text
