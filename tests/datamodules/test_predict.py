"""PredictFolderDataModule: any folder of images, prepared as a checkpoint recorded, unreadable files skipped."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.common import DatasetError
from datamodules.imagenet import eval_transform
from datamodules.predict import PredictFolderDataModule
from fishnet_pl import ClassificationHead, FishNetModule


def write_folder(root, sizes=((40, 60), (61, 33))):
    """RGB JPEG, grayscale PNG (nested), CMYK TIFF (deeper), an unreadable .jpg and a text file."""
    rng = np.random.default_rng(0)
    (root / "a" / "b").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (*sizes[0], 3), np.uint8)).save(root / "rgb.JPG")
    Image.fromarray(rng.integers(0, 255, sizes[1], np.uint8)).save(root / "a" / "gray.png")
    Image.fromarray(rng.integers(0, 255, (*sizes[0], 3), np.uint8)).convert("CMYK").save(root / "a" / "b" / "c.tif")
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    (root / "notes.txt").write_text("not an image")


def batches(datamodule):
    datamodule.setup("predict")
    return list(datamodule.predict_dataloader())


def test_every_image_under_the_folder_comes_as_rgb_in_0_1_and_unreadable_files_are_listed(tmp_path):
    write_folder(tmp_path)
    out = batches(PredictFolderDataModule(str(tmp_path), num_workers=0, num_classes=3))
    readable = [b for b in out if "path" in b]
    assert [p.split(str(tmp_path))[1] for b in readable for p in b["path"]] == ["/a/b/c.tif", "/a/gray.png",
                                                                                   "/rgb.JPG"]
    images = [b["image"] for b in readable]
    assert all(i.dtype == torch.float32 and i.shape[1] == 3 and 0 <= i.min() and i.max() <= 1 for i in images)
    assert images[1].shape[-2:] == (61, 33)  # no resize without a recorded transform
    assert [b["unreadable"] for b in out] == [[], [str(tmp_path / "a" / "broken.jpg")], [], []]
    assert out[1].keys() == {"unreadable"}  # a batch of unreadable files only: nothing to predict


def test_a_recorded_transform_and_batch_size_are_applied(tmp_path):
    write_folder(tmp_path)
    datamodule = PredictFolderDataModule(str(tmp_path), transform="datamodules.imagenet.eval_transform",
                                         transform_kwargs={"image_size": 32, "resize": 36}, batch_size=4,
                                         num_workers=0, num_classes=3)
    (batch,) = batches(datamodule)
    assert batch["image"].shape == (3, 3, 32, 32) and len(batch["unreadable"]) == 1
    expected = eval_transform(32, 36)(image=np.asarray(Image.open(tmp_path / "rgb.JPG")))["image"]
    torch.testing.assert_close(batch["image"][2], expected)


def test_images_of_different_sizes_in_one_batch_name_the_files_and_the_option(tmp_path):
    write_folder(tmp_path)
    with pytest.raises(DatasetError, match=r"gray.png \(61x33\).*set batch_size 1 \(--data.init_args.batch_size 1\)"):
        batches(PredictFolderDataModule(str(tmp_path), batch_size=4, num_workers=0, num_classes=3))


def test_a_folder_without_images_or_a_missing_one_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match="empty: no image files"):
        batches(PredictFolderDataModule(str(tmp_path / "empty"), num_classes=3))
    with pytest.raises(DatasetError, match="missing: predict_root directory does not exist"):
        batches(PredictFolderDataModule(str(tmp_path / "missing"), num_classes=3))


def test_it_only_predicts_and_needs_the_number_of_classes(tmp_path):
    datamodule = PredictFolderDataModule(str(tmp_path))
    with pytest.raises(ValueError, match="needs num_classes"):
        _ = datamodule.num_classes
    with pytest.raises(ValueError, match="only predicts"):
        datamodule.setup("fit")


def test_the_module_predicts_nothing_for_a_batch_of_unreadable_files_only():
    module = FishNetModule(head=ClassificationHead(), backbone="fishnet_tiny", num_classes=3).eval()
    assert module.predict_step({"unreadable": ["a.jpg"]}, 0) == []
    records = module.predict_step({"image": torch.rand(2, 3, 64, 64), "path": ["x", "y"], "unreadable": []}, 0)
    assert [r["path"] for r in records] == ["x", "y"] and len(records[0]["classes"]) == 3
