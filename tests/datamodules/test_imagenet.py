"""ImageNet datamodule on small data written in the real on-disk layouts."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from datamodules.common import DatasetError, default_num_workers, read_rgb
from datamodules.imagenet import QUICKSTART_ROOT, ImageNetDataModule
from datamodules.imagenet_labels import SYNSET_MAPPING
from datamodules.quickstart import CLASSIFICATION_CLASSES, write_classification

from ..conftest import CONFIGS, run_cli

WNIDS = ("n01440764", "n01443537")


def write_image(path, colour=(200, 30, 30), mode="RGB", fmt="JPEG", size=(40, 48)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).convert(mode).save(path, format=fmt)
    return path


@pytest.fixture
def imagenet(tmp_path):
    """Two classes, three training and two validation images each, in torchvision's layout."""
    for label, wnid in enumerate(WNIDS):
        for split, n in (("train", 3), ("val", 2)):
            for i in range(n):
                write_image(tmp_path / split / wnid / f"{wnid}_{i}.JPEG", colour=(255 * label, 80, 80))
    return tmp_path


def datamodule(root, **kwargs):
    return ImageNetDataModule(str(root), **{"batch_size": 2, "num_workers": 0, "image_size": 32, "val_resize": 36,
                                            **kwargs})


def test_folder_layout_gives_unit_range_batches_with_sorted_labels(imagenet):
    dm = datamodule(imagenet)
    assert dm.classes == list(WNIDS) and dm.num_classes == 2
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["label"].tolist() == [0, 0]
    # Not normalised (the model does that): float32 in [0, 1], exactly the uint8 value / 255.
    for b in (batch, next(iter(dm.train_dataloader()))):
        image = b["image"]
        assert image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
        assert torch.equal((image * 255).round() / 255, image)
    # Class 1 images are red. They decode to one colour, so resize and crop keep it: every pixel is it / 255.
    red = next(b for b in dm.val_dataloader() if b["label"][0] == 1)
    colour = read_rgb(red["path"][0])[0, 0]
    assert colour[0] > 250
    expected = torch.tensor(colour, dtype=torch.float32).div(255)[:, None, None].expand(3, 32, 32)
    assert torch.equal(red["image"][0], expected)


def test_official_flat_validation_folder_with_ground_truth(imagenet, tmp_path_factory):
    root = tmp_path_factory.mktemp("flat")
    (root / "train").symlink_to(imagenet / "train")
    for i in range(3):
        write_image(root / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG")
    truth = root / "LOC_val_solution.csv"
    truth.write_text("ImageId,PredictionString\n" + "".join(
        f"ILSVRC2012_val_{i + 1:08d},{w} 1 2 3 4\n" for i, w in enumerate(("n01443537", "n01440764", "n01443537"))))
    dm = datamodule(root, val_ground_truth=str(truth), batch_size=3)
    dm.setup("validate")
    assert next(iter(dm.val_dataloader()))["label"].tolist() == [1, 0, 1]


def test_cmyk_grayscale_and_png_named_jpeg_all_load_as_rgb(imagenet):
    wnid_dir = imagenet / "train" / WNIDS[0]
    write_image(wnid_dir / "cmyk.JPEG", mode="CMYK")
    write_image(wnid_dir / "gray.JPEG", mode="L")
    write_image(wnid_dir / "png_inside.JPEG", fmt="PNG")
    dm = datamodule(imagenet)
    dm.setup("fit")
    names = [p.name for p, _ in dm.datasets["train"].samples]
    for name in ("cmyk.JPEG", "gray.JPEG", "png_inside.JPEG"):
        assert dm.datasets["train"][names.index(name)]["image"].shape == (3, 32, 32)


def test_truncated_image_error_names_the_file_even_from_a_worker(imagenet):
    bad = imagenet / "val" / WNIDS[0] / f"{WNIDS[0]}_0.JPEG"
    bad.write_bytes(bad.read_bytes()[:200])
    dm = datamodule(imagenet, num_workers=1)
    dm.setup("validate")
    with pytest.raises(Exception, match=f"{bad.name}: cannot be decoded"):
        list(dm.val_dataloader())


def test_skip_unreadable_counts_and_continues(imagenet):
    bad = imagenet / "val" / WNIDS[0] / f"{WNIDS[0]}_1.JPEG"
    bad.write_bytes(b"not an image")
    dm = datamodule(imagenet, skip_unreadable=True, batch_size=4)
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    assert sum(len(b["label"]) for b in batches) == 4 and dm.datasets["val"].skipped == [str(bad)]


def test_missing_root_and_empty_class_folder_are_named(imagenet, tmp_path_factory):
    with pytest.raises(DatasetError, match="nowhere: dataset root directory does not exist"):
        _ = datamodule(tmp_path_factory.mktemp("x") / "nowhere").num_classes
    for image in (imagenet / "train" / WNIDS[1]).iterdir():
        image.unlink()
    with pytest.raises(DatasetError, match=f"{WNIDS[1]}: empty class folder"):
        datamodule(imagenet).setup("fit")


def test_two_workers_draw_different_augmentations_and_a_seed_repeats_them(tmp_path):
    # Sixteen copies of one noise image: two equal crops would mean two workers shared a random stream.
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8))
    for split in ("train", "val"):
        for i in range(16):
            (tmp_path / split / WNIDS[0]).mkdir(parents=True, exist_ok=True)
            noise.save(tmp_path / split / WNIDS[0] / f"{i}.png")

    def crops(seed):
        torch.manual_seed(seed)
        dm = datamodule(tmp_path, num_workers=2, batch_size=1)
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader = torch.utils.data.DataLoader(loader.dataset, batch_size=1, num_workers=2,
                                             worker_init_fn=loader.worker_init_fn)  # unshuffled: worker 0, 1, 0, ...
        return [b["image"] for b in loader]

    first = crops(1)
    assert len({tuple(c.flatten()[:64].tolist()) for c in first}) == len(first)
    assert all(torch.equal(a, b) for a, b in zip(first, crops(1)))
    assert not all(torch.equal(a, b) for a, b in zip(first, crops(2)))


def test_quickstart_fills_its_own_folder_once_names_classes_by_shape_and_says_where(in_tmp, caplog):
    recipe = yaml.safe_load((CONFIGS / "quickstart" / "classification.yaml").read_text())["data"]["init_args"]
    assert recipe["root"] == QUICKSTART_ROOT and recipe["quickstart"] is True
    dm = datamodule(QUICKSTART_ROOT, quickstart=True)
    shapes = ["circle", "square", "triangle", "stripes"]
    assert dm.num_classes == 4 and dm.class_names == shapes  # before any file exists (the CLI links num_classes)
    with caplog.at_level(logging.INFO):
        dm.prepare_data()
    root = in_tmp / QUICKSTART_ROOT
    assert f"quickstart: using the built-in demo data in {root} " in caplog.text
    files = sorted(root.rglob("*.JPEG"))
    assert len(files) == 4 * 60 and dm.classes == list(CLASSIFICATION_CLASSES)
    # The names now come from the LOC_synset_mapping.txt written with the images, as ImageNet's do.
    assert (root / SYNSET_MAPPING).read_text().splitlines()[0] == "n00000001 circle" and dm.class_names == shapes
    mtime = files[0].stat().st_mtime_ns
    (root / SYNSET_MAPPING).unlink()  # a quickstart folder written before the names: they are added
    write_classification(root)
    assert files[0].stat().st_mtime_ns == mtime and dm.class_names == shapes
    with Image.open(files[0]) as image:
        assert image.format == "JPEG" and image.mode == "RGB"


@pytest.mark.parametrize("exists", [False, True], ids=["missing", "empty"])
def test_quickstart_with_a_root_of_yours_that_holds_no_dataset_stops_and_writes_nothing(in_tmp, exists):
    mine = in_tmp / "my_data"  # a typo, or a folder not filled yet
    if exists:
        mine.mkdir()
    dm = datamodule(mine, quickstart=True)
    message = (rf"{mine}: holds no dataset \(expected train/<class>/ and val/<class>/ folders of images\); .* "
               rf"set quickstart: false \(--data.init_args.quickstart false\); for the demo, leave root at "
               rf"{QUICKSTART_ROOT}")
    for step in (lambda: dm.num_classes, dm.prepare_data):
        with pytest.raises(DatasetError, match=message):
            step()
    assert list(in_tmp.rglob("*")) == ([mine] if exists else [])  # nor the quickstart folder


def test_quickstart_recipe_on_a_root_of_yours_that_holds_no_dataset_stops_before_training(in_tmp):
    args = ["fit", "--config", CONFIGS / "quickstart" / "classification.yaml", "--data.init_args.root", "my_data"]
    with pytest.raises(DatasetError, match=f"{in_tmp / 'my_data'}: holds no dataset"):
        run_cli(args)
    assert not (in_tmp / "my_data").exists() and not (in_tmp / "data").exists()


def test_quickstart_reads_a_root_of_yours_that_holds_a_dataset(imagenet, caplog):
    before = sorted(imagenet.rglob("*"))
    dm = datamodule(imagenet, quickstart=True)
    with caplog.at_level(logging.INFO):
        dm.prepare_data()
        dm.setup("fit")
    assert dm.classes == list(WNIDS) and len(dm.datasets["train"]) == 6
    assert sorted(imagenet.rglob("*")) == before and "demo data" not in caplog.text


def test_class_names_come_from_imagenets_synset_mapping_else_the_folder_names(imagenet, tmp_path_factory):
    assert datamodule(imagenet).class_names == list(WNIDS)  # no LOC_synset_mapping.txt
    (imagenet / SYNSET_MAPPING).write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n"
                                           "n01484850 great white shark, white shark, man-eater\n")
    dm = datamodule(imagenet)
    assert dm.class_names == ["tench", "goldfish"] and dm.classes == list(WNIDS)  # labels stay in wnid order

    # Kaggle's download: train/ and val/ in ILSVRC/Data/CLS-LOC, the mapping three folders above. Two classes
    # share the name "crane" (a bird, a machine): each keeps its own by its wnid.
    kaggle = tmp_path_factory.mktemp("kaggle")
    root = kaggle / "ILSVRC" / "Data" / "CLS-LOC"
    for wnid in ("n02012849", "n03126707"):
        for split in ("train", "val"):
            write_image(root / split / wnid / f"{wnid}_0.JPEG")
    (kaggle / SYNSET_MAPPING).write_text("n02012849 crane\nn03126707 crane\n")
    assert datamodule(root).class_names == ["crane (n02012849)", "crane (n03126707)"]
    (kaggle / SYNSET_MAPPING).write_text("n02012849\n")
    with pytest.raises(DatasetError, match=rf"{kaggle / SYNSET_MAPPING}:1: expected '<wnid> <name>"):
        _ = datamodule(root).class_names


def test_num_workers_follow_the_cores_this_job_may_use_unless_given(imagenet):
    import os
    from types import SimpleNamespace

    cores = len(os.sched_getaffinity(0))
    assert default_num_workers(1) == max(1, cores - 1) and default_num_workers(4 * cores) == 1
    dm = datamodule(imagenet, num_workers=None)
    dm.setup("fit")
    assert dm.train_dataloader().num_workers == dm.val_dataloader().num_workers == default_num_workers(1)
    dm.trainer = SimpleNamespace(num_devices=2)  # two training processes on this node share the cores
    assert dm.train_dataloader().num_workers == default_num_workers(2)
    assert datamodule(imagenet, num_workers=3).workers == 3
    recipe = yaml.safe_load((CONFIGS / "imagenet" / "fishnet150.yaml").read_text())
    assert recipe["data"]["init_args"]["num_workers"] is None  # the recipes follow the machine
