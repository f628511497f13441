"""Predicting a folder: PredictFolderDataModule (any folder of images, prepared as a checkpoint recorded,
unreadable files skipped) and the prediction writers' files."""

from __future__ import annotations

import json
import logging

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.common import DatasetError
from datamodules.dataset_info import DatasetInfo
from datamodules.imagenet import eval_transform
from datamodules.predict import PredictFolderDataModule
from fishnet_pl import ClassificationHead, DetectionHead, FishNetModule, SegmentationHead
from fishnet_pl.writers import PredictionWriter


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


# ---------------------------------------------------------------- the prediction writers' files
SMALL_DETECTOR = {"fpn_channels": 32, "anchor_sizes": (16, 32, 64, 128, 256), "min_size": 64, "max_size": 96,
                  "representation_size": 64, "mask_head_channels": 16, "box_score_thresh": 0.0,
                  "predict_score_thresh": 0.0}
HEADS = {"classification": lambda: ClassificationHead(),
         "segmentation": lambda: SegmentationHead(decoder="FPN"),
         "detection": lambda: DetectionHead(**SMALL_DETECTOR)}
#: Each task's files for an image at ``<predict_root>/<relative path>``, and its JSON lines file.
OUTPUTS = {"classification": ((), "predictions.jsonl"), "segmentation": ((".mask.png", ".overlay.png"), None),
           "detection": ((".png",), "detections.jsonl")}


def write_same_names(root):
    """``a/img.jpg`` and ``b/img.jpg``, ``x.jpg`` beside ``x.png``, and an unreadable file: the relative paths."""
    rng = np.random.default_rng(1)
    names = ["a/img.jpg", "b/img.jpg", "x.jpg", "x.png"]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (64, 96, 3), np.uint8)).save(root / name)  # FishNet: multiples of 32
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    return names


def predict(task, photos, root_dir, **writer):
    """``trainer.predict`` of an untrained small model over the folder ``photos``, writing as ``fishnet-pl predict``
    does; returns the writer."""
    module = FishNetModule(head=HEADS[task](), backbone="fishnet_tiny", num_classes=3)
    writer = PredictionWriter.for_head(module.head, **writer)
    trainer = L.Trainer(default_root_dir=root_dir, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", callbacks=[writer])
    collate = "datamodules.coco.collate_detection" if task == "detection" else None  # as COCODataModule records
    datamodule = PredictFolderDataModule(str(photos), collate=collate, num_classes=3, num_workers=0)
    trainer.predict(module, datamodule=datamodule, return_predictions=False)
    return writer


@pytest.mark.parametrize("task", OUTPUTS)
def test_outputs_mirror_the_input_paths_so_same_names_never_collide(task, tmp_path, caplog):
    names = write_same_names(tmp_path / "photos")
    with caplog.at_level(logging.INFO):
        predict(task, tmp_path / "photos", tmp_path / "run", output_dir=tmp_path / "out")
    suffixes, jsonl = OUTPUTS[task]
    out = tmp_path / "out"
    expected = {f"{name}{suffix}" for name in names for suffix in suffixes}
    written = {p.relative_to(out).as_posix() for p in out.rglob("*.png")}
    assert written == expected
    if jsonl:
        lines = [json.loads(line) for line in (out / jsonl).read_text().splitlines()]
        assert [line["path"] for line in lines] == names
        assert [line["file"] for line in lines] == [str(tmp_path / "photos" / name) for name in names]
    assert (out / "unreadable.txt").read_text().split() == [str(tmp_path / "photos" / "broken.png")]
    # One line at the end says where the files went and how many images were predicted and skipped.
    summary = [m for m in caplog.messages if "images predicted" in m]
    assert summary == [f"predict: 4 images predicted, 1 skipped as unreadable (listed in unreadable.txt, e.g. "
                       f"{tmp_path / 'photos' / 'broken.png'}); files written to {out}"]


def test_a_second_run_writes_into_a_new_folder_and_a_given_folder_with_files_is_refused(tmp_path):
    names = write_same_names(tmp_path / "photos")
    predict("classification", tmp_path / "photos", tmp_path / "run")
    first = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "run" / "predictions").iterdir()}
    assert sorted(p.name for p in first) == ["predictions.jsonl", "unreadable.txt"]
    predict("classification", tmp_path / "photos", tmp_path / "run")
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "run" / "predictions").iterdir()} == first
    second = tmp_path / "run" / "predictions_1" / "predictions.jsonl"
    assert [json.loads(line)["path"] for line in second.read_text().splitlines()] == names

    given = tmp_path / "run" / "predictions"  # explicitly, holding the first run's files
    with pytest.raises(FileExistsError, match=f"{given}: holds files .* pass --overwrite true, or give another"):
        predict("classification", tmp_path / "photos", tmp_path / "run", output_dir=given)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in given.iterdir()} == first
    predict("classification", tmp_path / "photos", tmp_path / "run", output_dir=given, overwrite=True)
    assert (given / "predictions.jsonl").stat().st_mtime_ns > first[given / "predictions.jsonl"][1]


def test_the_overlay_carries_a_legend_of_the_classes_present(tmp_path):
    """Below the blended image: a swatch in each present class's colour, with its name in white."""
    palette = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    labels = np.zeros((60, 90), np.uint8)
    labels[:, 30:] = 2  # classes 0 and 2 present, 1 and 3 not
    image = np.full((60, 90, 3), 128, np.uint8)
    head = SegmentationHead()
    head.num_classes = 4
    head.set_dataset_info(DatasetInfo(class_names=["road", "car", "sky", "person"], palette=palette))
    head.write_predictions([{"path": "street.jpg", "labels": labels, "image": image}], ["street.jpg"], tmp_path,
                           first=True)
    overlay = np.asarray(Image.open(tmp_path / "street.jpg.overlay.png"))
    assert overlay.shape[1] == 90 and overlay.shape[0] > 60
    np.testing.assert_array_equal(overlay[:60], (0.5 * image + 0.5 * np.asarray(palette, np.uint8)[labels]).round())
    legend = overlay[60:]

    def pixels(colour):
        return int(np.all(legend == colour, axis=-1).sum())

    swatch = 100  # at least a 10 x 10 square: the smallest font is 10 pixels high
    assert pixels(palette[0]) >= swatch and pixels(palette[2]) >= swatch
    assert pixels(palette[1]) == pixels(palette[3]) == 0
    text = np.all(legend > 200, axis=-1) & (legend.max(-1) == legend.min(-1))  # white, grey where antialiased
    assert text.sum() > 20
