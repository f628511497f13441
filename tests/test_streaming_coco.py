"""COCO converted to LitData shards and streamed: the folder datamodule's samples and evaluation attributes,
trained and evaluated through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from datamodules.coco import COCODataModule
from datamodules.common import DatasetError
from datamodules.quickstart_detection import write_detection
from datamodules.streaming import StreamingCOCODataModule, StreamingImageNetDataModule
from datamodules.streaming_convert import main

from .conftest import CONFIGS, csv_logger, run_cli

# pycocotools' compiled decoder (2.0.11) trips numpy 2's copy-keyword deprecation on every mask; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(folder root, shards): the detection quickstart (COCO layout: crowds, an empty training image, non-contiguous
    category ids) and its shards, via the CLI."""
    tmp = tmp_path_factory.mktemp("streaming_coco")
    root = write_detection(tmp / "coco")
    main(["convert", "--data", "coco", "--root", str(root), "--output", str(tmp / "shards"),
          "--num-workers", "2", "--chunk-bytes", "100KB"])  # several shards per split
    return root, tmp / "shards"


def folder_and_streamed(root, shards, stage: str = "fit") -> tuple[COCODataModule, StreamingCOCODataModule]:
    folder = COCODataModule(str(root), batch_size=4, num_workers=0)
    streamed = StreamingCOCODataModule(str(shards), batch_size=4, num_workers=0)
    folder.setup(stage)
    streamed.setup(stage)
    return folder, streamed


def test_streamed_validation_batches_are_the_folder_datamodules(converted):
    root, shards = converted
    assert len(list((shards / "train").glob("*.bin"))) > 2
    folder, streamed = folder_and_streamed(root, shards)
    for attr in ("categories", "num_classes", "class_names", "label_to_category_id", "skipped_train_image_ids",
                 "dataset_info"):
        assert getattr(streamed, attr) == getattr(folder, attr), attr
    assert streamed.skipped_train_image_ids == [1000]  # the quickstart's training image without objects
    assert json.loads(open(streamed.val_annotation_file).read()) == json.loads(open(folder.val_annotation_file).read())

    expected = {item["target"]["image_id"]: item for item in folder.datasets["val"]}
    seen = []
    for batch in streamed.val_dataloader():
        assert set(batch) == {"image", "target", "path"}
        for image, target, path in zip(batch["image"], batch["target"], batch["path"]):
            want = expected[target["image_id"]]
            assert path == f"val2017/{target['image_id']:012d}.jpg" and want["path"].endswith(path)
            torch.testing.assert_close(image, want["image"], rtol=0, atol=0)  # same bytes, same transform
            assert set(target) == set(want["target"]) == {"boxes", "labels", "image_id", "iscrowd", "area", "masks"}
            for key, value in want["target"].items():
                if key != "image_id":
                    assert value.dtype == target[key].dtype, key
                    torch.testing.assert_close(target[key], value, rtol=0, atol=0, msg=key)
            seen.append(target["image_id"])
    assert sorted(seen) == sorted(expected)  # every image once, crowds kept for the evaluator
    assert any(target["iscrowd"].any() for item in folder.datasets["val"] for target in [item["target"]])

    train_ids = sorted(t["image_id"] for batch in streamed.train_dataloader() for t in batch["target"])
    kept = {record.image_id for record in folder.datasets["train"].images}  # 39 of 40: 9 whole batches of 4
    assert set(train_ids) <= kept and len(set(train_ids)) == len(train_ids) == 36 and 1000 not in train_ids

    folder.setup("predict")
    streamed.setup("predict")
    batch = next(iter(streamed.predict_dataloader()))
    assert set(batch) == {"image", "path", "image_id"} == set(next(iter(folder.predict_dataloader())))


def test_training_augmentation_is_the_folder_pipeline_seeded_per_epoch_and_image(converted):
    root, shards = converted
    folder, streamed = folder_and_streamed(root, shards)
    dataset = streamed.datasets["train"]
    first = dataset[0]
    index = [r.image_id for r in folder.datasets["train"].images].index(first["target"]["image_id"])
    # The folder datamodule's own training pipeline, seeded as the shards' dataset seeds its image.
    seed = np.random.SeedSequence([dataset.seed, dataset.current_epoch, index]).generate_state(1)[0]
    folder.datasets["train"].reseed(int(seed))
    want = folder.datasets["train"][index]
    torch.testing.assert_close(first["image"], want["image"], rtol=0, atol=0)
    for key in ("boxes", "labels", "masks", "area"):
        torch.testing.assert_close(first["target"][key], want["target"][key], rtol=0, atol=0, msg=key)
    assert not first["target"]["iscrowd"].any()  # crowds were left out of the training shards
    dataset.current_epoch += 1
    assert not torch.equal(dataset[0]["image"], first["image"])  # a new epoch, a new flip and scale


def test_a_resumed_training_loader_gives_the_remaining_batches_of_the_interrupted_epoch(converted):
    root, shards = converted
    torch.manual_seed(1)  # the run's seed (seed_everything)
    epoch = list(folder_and_streamed(root, shards)[1].train_dataloader())
    torch.manual_seed(1)
    stopped = folder_and_streamed(root, shards)[1].train_dataloader()
    batches = iter(stopped)
    next(batches), next(batches)
    state = stopped.state_dict()
    del batches
    torch.manual_seed(2)  # a new process: the loader's state brings the run's seed back
    resumed = folder_and_streamed(root, shards)[1].train_dataloader()
    resumed.load_state_dict(state)
    batches = iter(resumed)  # as Lightning does: len(loader) - 2 batches, never asking for one more
    rest = [next(batches) for _ in range(len(epoch) - 2)]
    for got, expected in zip(rest, epoch[2:], strict=True):
        assert [t["image_id"] for t in got["target"]] == [t["image_id"] for t in expected["target"]]
        for image, want in zip(got["image"], expected["image"]):
            torch.testing.assert_close(image, want, rtol=0, atol=0)  # the same augmentation


def test_shards_of_another_dataset_or_without_masks_are_named(converted, tmp_path):
    root, shards = converted
    with pytest.raises(DatasetError, match=f"{shards}/classes.json: shards of coco, not imagenet"):
        StreamingImageNetDataModule(str(shards)).setup("fit")
    main(["convert", "--data", "coco", "--root", str(root), "--output", str(tmp_path), "--no-masks",
          "--num-workers", "1"])
    with pytest.raises(DatasetError, match=f"{tmp_path}: converted without masks"):
        StreamingCOCODataModule(str(tmp_path)).setup("validate")
    boxes_only = StreamingCOCODataModule(str(tmp_path), with_masks=False, num_workers=0)
    boxes_only.setup("validate")
    assert "masks" not in boxes_only.datasets["val"][0]["target"]


def test_mask_rcnn_fits_from_the_shards_and_logs_coco_ap(converted, in_tmp):
    _, shards = converted
    cli = run_cli(["fit", "--config", CONFIGS / "quickstart" / "detection.yaml",
                   "--config", CONFIGS / "data" / "coco_streaming.yaml", "--data.init_args.shards", shards,
                   "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
                   "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                   "--trainer.limit_val_batches", "2", "--trainer.num_sanity_val_steps", "0",
                   "--trainer.enable_progress_bar", "false", *csv_logger("run")])
    assert cli.trainer.global_step == 2 and cli.model.hparams.num_classes == 3
    assert torch.isfinite(cli.trainer.callback_metrics["val/bbox_ap"])
    assert "val/bbox_ap" in (in_tmp / "run" / "metrics.csv").read_text().splitlines()[0]


def test_the_streaming_data_file_composes_with_the_detection_recipe_files(capsys):
    parts = ["backbone/fishnet150", "task/detection", "data/coco_streaming", "trainer/default", "trainer/gpu8"]
    with pytest.raises(SystemExit):
        run_cli(["fit", *(a for part in parts for a in ("--config", CONFIGS / f"{part}.yaml")), "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["data"]["class_path"] == "datamodules.streaming.StreamingCOCODataModule"
    assert config["data"]["init_args"]["with_masks"] and config["data"]["init_args"]["scale_range"] == [1.0, 1.0]
    assert "--config configs/data/coco_streaming.yaml" in (CONFIGS.parent / "docs/training.md").read_text()
