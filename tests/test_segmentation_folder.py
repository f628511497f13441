"""Segmentation on any dataset: small sets written in each real layout (own folders with a classes file and
RGB colour masks, ADE20K, PASCAL VOC with palette PNGs and split lists), read directly and trained through
the CLI with the shipped data configs."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from datamodules.common import DatasetError
from datamodules.segmentation_folder import SegmentationFolderDataModule

from .conftest import CONFIGS, csv_logger, run_cli

HEIGHT, WIDTH = 64, 96
VOC_PALETTE = yaml.safe_load((CONFIGS / "data/voc2012.yaml").read_text())["data"]["init_args"]["palette"]
# Own folders: 4 classes by colour, white = unlabelled.
OWN_CLASSES = {"classes": ["background", "road", "car", "person"],
               "palette": [[0, 0, 0], [128, 64, 128], [0, 0, 142], [220, 20, 60]],
               "ignore_colors": [[255, 255, 255]]}


# ---------------------------------------------------------------------- writing small sets
def scene(rng: np.random.Generator, labels: list[int], height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """Label values of a random scene: ``labels[0]`` everywhere, then boxes and an ellipse of the others."""
    ids = np.full((height, width), labels[0], np.uint8)
    for label in labels[1:]:
        y, x = int(rng.integers(0, height - 16)), int(rng.integers(0, width - 20))
        ids[y:y + int(rng.integers(10, 24)), x:x + int(rng.integers(14, 36))] = label
    yy, xx = np.mgrid[:height, :width]
    cy, cx = int(rng.integers(12, height - 12)), int(rng.integers(12, width - 12))
    ids[((yy - cy) / 10) ** 2 + ((xx - cx) / 14) ** 2 < 1] = labels[-1]
    return ids


def photo(ids: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """An image whose colour tells each pixel's label (plus noise), so a model has something to learn."""
    colours = np.random.default_rng(7).integers(0, 256, (256, 3))
    pixels = colours[ids] + rng.normal(0, 8, (*ids.shape, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_own(root, rng, counts=(("train", 4), ("val", 2)), sizes=((HEIGHT, WIDTH),)) -> dict:
    """``images/<split>/<folder>/*.jpg`` + RGB ``annotations/...png`` + ``classes.yaml`` (image i of a split in
    ``sizes[i % len(sizes)]``); returns path -> class ids."""
    (root / "classes.yaml").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.yaml").write_text(yaml.safe_dump(OWN_CLASSES))
    palette = np.array(OWN_CLASSES["palette"], np.uint8)
    expected = {}
    for split, count in counts:
        for i in range(count):
            ids = scene(rng, [0, 1, 2, 3], *sizes[i % len(sizes)])
            colours = palette[ids]
            colours[-4:] = 255  # an unlabelled strip
            ids[-4:] = 255
            folder = f"street_{i % 2}"  # nested: found recursively
            for kind, image, suffix in (("images", photo(ids % 4, rng), ".jpg"),
                                        ("annotations", Image.fromarray(colours), ".png")):
                (root / kind / split / folder).mkdir(parents=True, exist_ok=True)
                image.save(root / kind / split / folder / f"frame{i}{suffix}")
            expected[str(root / "images" / split / folder / f"frame{i}.jpg")] = ids
    return expected


def write_ade(root, rng, sizes=((HEIGHT, WIDTH),) * 4) -> None:
    """ADEChallengeData2016 layout: labels 0 (other) and 1 wall, 3 sky, 7 road, 21 car; val in two sizes."""
    val_sizes = ((HEIGHT, WIDTH), (72, 80))
    for split, prefix, split_sizes in (("training", "train", sizes), ("validation", "val", val_sizes)):
        for i, (height, width) in enumerate(split_sizes, 1):
            ids = scene(rng, [1, 3, 7, 21, 0], height, width)
            for kind, image, suffix in (("images", photo(ids, rng), ".jpg"),
                                        ("annotations", Image.fromarray(ids), ".png")):
                (root / kind / split).mkdir(parents=True, exist_ok=True)
                image.save(root / kind / split / f"ADE_{prefix}_{i:08d}{suffix}")


def write_voc(root, rng) -> dict:
    """VOCdevkit/VOC2012: JPEGImages, palette PNGs in SegmentationClass with 255 object borders, split lists.
    Returns image stem -> label indices."""
    flat = [c for colour in VOC_PALETTE for c in colour] + [224, 224, 192] * (256 - len(VOC_PALETTE))
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    expected = {}
    for i in range(7):
        stem = f"2007_{i:06d}"
        ids = scene(rng, [0, 1, 8, 15])
        objects = ids > 0
        inner = objects.copy()
        inner[1:-1, 1:-1] &= objects[:-2, 1:-1] & objects[2:, 1:-1] & objects[1:-1, :-2] & objects[1:-1, 2:]
        ids[objects & ~inner] = 255  # VOC's "void" outline around every object
        label = Image.fromarray(ids)
        label.putpalette(flat)  # mode L -> P, the pixels unchanged
        label.save(root / "SegmentationClass" / f"{stem}.png")
        photo(ids % 21, rng).save(root / "JPEGImages" / f"{stem}.jpg")
        expected[stem] = ids
    # 2007_000006 is in no list (VOC's test images have no labels either)
    lists = {"train": [0, 1, 2, 3], "val": [4, 5]}
    for split, items in lists.items():
        (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("".join(f"2007_{i:06d}\n" for i in items))
    return expected


# ---------------------------------------------------------------------- helpers
def composed(data_config: str, root) -> list:
    """The README's composition on a CPU: FishNet-tiny, the segmentation task, the data file on ``root``."""
    files = ("backbone/fishnet_tiny.yaml", "task/segmentation.yaml", f"data/{data_config}.yaml", "trainer/cpu.yaml")
    return [*(a for f in files for a in ("--config", CONFIGS / f)), "--data.init_args.root", root,
            "--data.init_args.num_workers", "0", "--trainer.enable_progress_bar", "false"]


def fit(data_config: str, root, out, *extra) -> dict[str, float]:
    """``fishnet-pl fit`` of FishNet-tiny + FPN on ``root`` for 2 steps and one validation; the logged val/ metrics."""
    run_cli(["fit", *composed(data_config, root), "--seed_everything", "0",
             "--data.init_args.batch_size", "2", "--data.init_args.crop_size", "[64, 64]",
             "--model.head.init_args.decoder_kwargs",
             "{decoder_pyramid_channels: 32, decoder_segmentation_channels: 32}",  # a small FPN
             "--trainer.max_epochs", "1", "--trainer.max_steps", "-1", "--trainer.limit_train_batches", "2",
             "--trainer.check_val_every_n_epoch", "1", "--trainer.num_sanity_val_steps", "0",
             "--trainer.default_root_dir", out, *csv_logger(out), *extra])
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return {k: float(v) for row in rows for k, v in row.items() if k.startswith("val/") and v}


def dataset(root, stage="validate", split="val", **kwargs):
    dm = SegmentationFolderDataModule(str(root), num_workers=0, **kwargs)
    dm.setup(stage)
    return dm.datasets[split]


# ---------------------------------------------------------------------- configs
@pytest.mark.parametrize("data", ["segmentation_folder", "ade20k", "voc2012"])
def test_the_data_files_compose_with_backbone_task_and_trainer_files(data, capsys):
    files = ["backbone/fishnet150.yaml", "task/segmentation.yaml", f"data/{data}.yaml", "trainer/default.yaml",
             "trainer/gpu8.yaml"]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", *(a for f in files for a in ("--config", CONFIGS / f)), "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["data"]["class_path"] == "datamodules.segmentation_folder.SegmentationFolderDataModule"
    assert config["model"]["head"]["class_path"] == "fishnet_pl.tasks.SegmentationHead"
    init = config["data"]["init_args"]
    if data != "segmentation_folder":  # the benchmark sets name their classes and colours in the config
        assert len(init["classes"]) == len(init["palette"]) == {"ade20k": 150, "voc2012": 21}[data]
        assert init["reduce_zero_label"] is (data == "ade20k")


# ---------------------------------------------------------------------- own folders, RGB colour masks
def test_own_folders_with_colour_masks_train_validate_and_predict_in_the_class_colours(in_tmp):
    root = in_tmp / "my_set"
    expected = write_own(root, np.random.default_rng(0))
    dm = SegmentationFolderDataModule(str(root))
    assert (dm.num_classes, dm.class_names) == (4, OWN_CLASSES["classes"])
    assert dm.palette == [tuple(c) for c in OWN_CLASSES["palette"]]
    val = dataset(root)
    assert len(val) == 2
    for i in range(len(val)):
        item = val[i]
        assert item["image"].dtype == torch.float32 and item["image"].shape == (3, HEIGHT, WIDTH)
        assert item["mask"].dtype == torch.int64
        assert np.array_equal(item["mask"].numpy(), expected[item["path"]])  # colours -> classes, white -> 255

    metrics = fit("segmentation_folder", root, in_tmp / "run")
    assert 0 <= metrics["val/miou"] <= 1 and {"val/iou_road", "val/iou_car"} <= set(metrics)

    ckpt = next((in_tmp / "run").rglob("last.ckpt"))
    run_cli(["predict", *composed("segmentation_folder", root), "--ckpt_path", ckpt, "--trainer.logger", "false",
             "--predict_dir", in_tmp / "pred"])
    masks = sorted((in_tmp / "pred").rglob("*.mask.png"), key=lambda m: m.name)  # under images/val/<folder>/
    assert [m.name for m in masks] == ["frame0.jpg.mask.png", "frame1.jpg.mask.png"]  # the val images: no test split
    with Image.open(masks[0]) as mask:
        assert mask.size == (WIDTH, HEIGHT)
        assert np.array_equal(np.reshape(mask.getpalette()[:12], (4, 3)), OWN_CLASSES["palette"])


def test_classes_come_from_the_file_without_reading_images_or_from_the_config(tmp_path):
    (tmp_path / "labels.json").write_text('{"classes": ["sky", "sea"], "palette": [[0, 0, 255], [0, 90, 160]]}')
    dm = SegmentationFolderDataModule(str(tmp_path), classes="labels.json")  # JSON too; no image folder at all
    assert (dm.num_classes, dm.class_names, dm.palette) == (2, ["sky", "sea"], [(0, 0, 255), (0, 90, 160)])
    given = SegmentationFolderDataModule(str(tmp_path / "nowhere"), classes=["a", "b", "c"])
    assert (given.num_classes, given.palette) == (3, None)  # the prediction writer then picks its own colours
    with pytest.raises(DatasetError, match=r"nowhere/classes.yaml: classes file does not exist"):
        SegmentationFolderDataModule(str(tmp_path / "nowhere")).num_classes  # noqa: B018
    with pytest.raises(DatasetError, match="palette has 1 colours for 2 classes"):
        SegmentationFolderDataModule(str(tmp_path), classes="labels.json", palette=[(1, 2, 3)]).num_classes  # noqa: B018


def test_unknown_colour_label_value_and_missing_label_are_named(tmp_path):
    root = tmp_path / "my_set"
    write_own(root, np.random.default_rng(1), counts=(("val", 2),))
    label = root / "annotations/val/street_1/frame1.png"
    colours = np.asarray(Image.open(label)).copy()
    colours[5, 5] = (1, 2, 3)
    Image.fromarray(colours).save(label)
    val = dataset(root)
    with pytest.raises(DatasetError, match=rf"{label}: colours \[\(1, 2, 3\)\] \(1 pixels\) are not class colours"):
        val[1]

    # Index labels: 7 is no class of 4 (and not the ignore index).
    Image.fromarray(np.full((HEIGHT, WIDTH), 7, np.uint8)).save(label)
    with pytest.raises(DatasetError, match=rf"{label}: label values \[7\] are neither classes \(0..3 for 4 classes\)"):
        val[1]

    label.unlink()
    with pytest.raises(DatasetError, match=rf"{label}: label file of frame1.jpg does not exist"):
        dataset(root)


def test_evaluation_batches_of_mixed_sizes_give_the_metrics_and_masks_of_one_image_at_a_time(in_tmp):
    # Images of two sizes (as ADE20K's, which all differ): a batch pads them to its largest (labels 255: ignored)
    # and each image is predicted at its own size. Batches of 3: [64x96, 64x96, 72x80] and [72x80].
    root = in_tmp / "my_set"
    sizes = ((HEIGHT, WIDTH), (72, 80))
    write_own(root, np.random.default_rng(2), counts=(("val", 4),), sizes=sizes)
    metrics, masks = {}, {}
    for batch in (1, 3):
        args = [*composed("segmentation_folder", root), "--seed_everything", "0", "--trainer.logger", "false",
                "--data.init_args.val_batch_size", batch]
        cli = run_cli(["validate", *args])
        metrics[batch] = {name: value.item() for name, value in cli.trainer.callback_metrics.items()}
        run_cli(["predict", *args, "--predict_dir", in_tmp / f"predicted_{batch}"])
        masks[batch] = {p.name: np.asarray(Image.open(p)) for p in (in_tmp / f"predicted_{batch}").rglob("*mask.png")}
    assert metrics[1]["val/miou"] > 0 and metrics[3] == metrics[1]
    assert sorted(masks[3]) == sorted(masks[1]) and len(masks[1]) == 4
    for name, mask in masks[3].items():
        assert mask.shape == sizes[int(name.removeprefix("frame")[0]) % 2]  # its image's size, unpadded
        np.testing.assert_array_equal(mask, masks[1][name])


# ---------------------------------------------------------------------- ADE20K
def test_ade20k_reduces_zero_label_and_trains(in_tmp):
    root = in_tmp / "ADEChallengeData2016"
    write_ade(root, np.random.default_rng(3))
    config = yaml.safe_load((CONFIGS / "data/ade20k.yaml").read_text())["data"]["init_args"]
    val = dataset(root, **{k: v for k, v in config.items() if k not in ("root", "num_workers")})
    raw = np.asarray(Image.open(root / "annotations/validation/ADE_val_00000001.png"))
    mask = val[0]["mask"].numpy()
    assert {0, 1, 3, 7, 21} <= set(np.unique(raw).tolist())
    assert (mask[raw == 0] == 255).all()  # "other" is ignored
    assert np.array_equal(mask[raw > 0], raw[raw > 0] - 1)  # wall 1 -> 0, sky 3 -> 2, ...

    metrics = fit("ade20k", root, in_tmp / "run")  # validation images of two sizes
    assert 0 <= metrics["val/miou"] <= 1
    assert {"val/iou_wall", "val/iou_sky", "val/iou_road", "val/iou_car"} <= set(metrics)


# ---------------------------------------------------------------------- PASCAL VOC
def test_voc_palette_pngs_are_read_as_indices_with_borders_ignored_and_train(in_tmp):
    root = in_tmp / "VOCdevkit/VOC2012"
    expected = write_voc(root, np.random.default_rng(4))
    config = yaml.safe_load((CONFIGS / "data/voc2012.yaml").read_text())["data"]["init_args"]
    val = dataset(root, **{k: v for k, v in config.items() if k not in ("root", "num_workers")})
    assert [p.name for p, _ in val.samples] == ["2007_000004.jpg", "2007_000005.jpg"]  # the list, in its order
    with Image.open(val.samples[0][1]) as label:
        assert label.mode == "P"
    mask = val[0]["mask"].numpy()
    assert np.array_equal(mask, expected["2007_000004"])  # indices (not colours); the 255 outlines stay 255
    assert {0, 255} < set(np.unique(mask).tolist())

    metrics = fit("voc2012", root, in_tmp / "run")
    assert 0 <= metrics["val/miou"] <= 1 and {"val/iou_background", "val/iou_aeroplane"} <= set(metrics)


def test_voc_with_sbd_lists_and_label_folders(tmp_path):
    root = tmp_path / "VOC2012"
    write_voc(root, np.random.default_rng(5))
    # SBD's extra image: label only in SegmentationClassAug; DeepLab's list format (image and label paths).
    (root / "SegmentationClassAug").mkdir()
    Image.open(root / "SegmentationClass/2007_000001.png").save(root / "SegmentationClassAug/2007_000001.png")
    Image.open(root / "SegmentationClass/2007_000006.png").save(root / "SegmentationClassAug/2007_000006.png")
    (root / "SegmentationClass/2007_000006.png").unlink()
    (root / "ImageSets/Segmentation/aug.txt").write_text(
        "/JPEGImages/2007_000001.jpg /SegmentationClassAug/2007_000001.png\n"
        "/JPEGImages/2007_000006.jpg /SegmentationClassAug/2007_000006.png\n")
    train = dataset(root, "fit", "train", classes=[str(k) for k in range(21)], img_dir="JPEGImages",
                    ann_dir=["SegmentationClass", "SegmentationClassAug"],
                    train_split=["ImageSets/Segmentation/train.txt", "ImageSets/Segmentation/aug.txt"],
                    val_split="ImageSets/Segmentation/val.txt")
    pairs = [(image.stem, label.parent.name) for image, label in train.samples]
    assert pairs == [("2007_000000", "SegmentationClass"), ("2007_000001", "SegmentationClass"),
                     ("2007_000002", "SegmentationClass"), ("2007_000003", "SegmentationClass"),
                     ("2007_000006", "SegmentationClassAug")]  # each image once, its label from the first folder


def test_state_dict_resumes_the_augmentation_stream(tmp_path):
    write_own(tmp_path, np.random.default_rng(6), counts=(("train", 2), ("val", 1)))

    def crops(dm, n=3):
        return [dm.datasets["train"][0]["image"] for _ in range(n)]

    dm = SegmentationFolderDataModule(str(tmp_path), num_workers=0, crop_size=(32, 32))
    dm.setup("fit")
    crops(dm, 1)
    state = dm.state_dict()
    expected = crops(dm)
    resumed = SegmentationFolderDataModule(str(tmp_path), num_workers=0, crop_size=(32, 32))
    resumed.setup("fit")
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(crops(resumed), expected))
