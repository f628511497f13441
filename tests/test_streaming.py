"""ImageNet converted to LitData shards and streamed: the folder datamodule's samples, trained through the CLI,
resumed mid-epoch exactly."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from datamodules.common import DatasetError
from datamodules.imagenet import ImageNetDataModule
from datamodules.quickstart import write_classification
from datamodules.streaming import StreamingImageNetDataModule
from datamodules.streaming_convert import convert_imagenet, main

from .conftest import CONFIGS, csv_logger, run_cli

SIZES = {"image_size": 32, "val_resize": 36}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(folder root, shards): the quickstart dataset (real JPEGs, ImageNet layout) and its shards, via the CLI."""
    tmp = tmp_path_factory.mktemp("streaming")
    root = write_classification(tmp / "imagenet")
    main(["convert", "--data", "imagenet", "--root", str(root), "--output", str(tmp / "shards"),
          "--num-workers", "2", "--chunk-bytes", "100KB"])  # several shards per split
    return root, tmp / "shards"


def streaming(shards, **kwargs) -> StreamingImageNetDataModule:
    datamodule = StreamingImageNetDataModule(str(shards), **{"batch_size": 8, "num_workers": 0, **SIZES, **kwargs})
    datamodule.setup("fit")
    return datamodule


def test_streamed_validation_images_are_the_folder_datamodules(converted):
    root, shards = converted
    assert len(list((shards / "train").glob("*.bin"))) > 2
    folder = ImageNetDataModule(str(root), num_workers=0, **SIZES)
    folder.setup("fit")
    streamed = streaming(shards)
    assert streamed.classes == folder.classes and streamed.num_classes == 4
    assert streamed.class_names == folder.class_names == ["circle", "square", "triangle", "stripes"]

    seen = []
    for batch in streamed.val_dataloader():
        assert batch["image"].dtype == torch.float32 and batch["label"].dtype == batch["index"].dtype == torch.int64
        for image, label, index, path in zip(batch["image"], batch["label"], batch["index"], batch["path"]):
            expected = folder.datasets["val"][int(index)]
            assert path == Path(expected["path"]).relative_to(root).as_posix()
            assert int(label) == expected["label"]
            torch.testing.assert_close(image, expected["image"], rtol=0, atol=0)  # same bytes, same transform
            seen.append(int(index))
    assert sorted(seen) == list(range(len(folder.datasets["val"])))  # every image once (no drop_last)
    train = list(streamed.train_dataloader())
    assert sorted(int(i) for batch in train for i in batch["index"]) == list(range(len(folder.datasets["train"])))
    # Mixed batches, though the folders are class by class: the conversion wrote the images in a random order.
    assert np.mean([len(set(batch["label"].tolist())) for batch in train]) > 2.5


def test_on_three_processes_validation_reads_every_image_once_and_training_splits_evenly(converted):
    from litdata.utilities.env import _DistributedEnv  # what each DDP process detects

    _, shards = converted
    seen = {"val": [], "train": []}
    for rank in range(3):
        datamodule = streaming(shards, batch_size=5)
        for split, indexes in seen.items():
            datamodule.datasets[split].distributed_env = _DistributedEnv(world_size=3, global_rank=rank, num_nodes=1)
            loader = datamodule.train_dataloader() if split == "train" else datamodule.val_dataloader()
            indexes.append([int(i) for batch in loader for i in batch["index"]])
    val = [i for rank in seen["val"] for i in rank]
    assert sorted(val) == list(range(48))  # the metrics then count each image once, as on one process
    assert {len(rank) for rank in seen["train"]} == {60} and len({i for r in seen["train"] for i in r}) == 180


def test_training_augmentation_is_the_folder_pipeline_seeded_per_epoch_and_image(converted):
    root, shards = converted
    folder = ImageNetDataModule(str(root), num_workers=0, **SIZES)
    folder.setup("fit")
    dataset = streaming(shards).datasets["train"]
    first = dataset[0]
    # The folder datamodule's own training pipeline, seeded as the shards' dataset seeds it.
    seed = np.random.SeedSequence([dataset.seed, dataset.current_epoch, first["index"]]).generate_state(1)[0]
    folder.datasets["train"].reseed(int(seed))
    torch.testing.assert_close(first["image"], folder.datasets["train"][first["index"]]["image"], rtol=0, atol=0)
    torch.testing.assert_close(dataset[0]["image"], first["image"], rtol=0, atol=0)  # reproducible
    dataset.current_epoch += 1
    assert not torch.equal(dataset[0]["image"], first["image"])  # a new epoch, new crops


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loader_resumed_from_its_state_gives_the_remaining_batches_then_the_next_epoch(converted, workers):
    _, shards = converted
    torch.manual_seed(1)  # the run's seed (seed_everything)
    uninterrupted = streaming(shards, num_workers=workers).train_dataloader()
    epoch = list(uninterrupted)
    next_epoch = [batch["index"] for batch in uninterrupted]
    torch.manual_seed(1)
    stopped = streaming(shards, num_workers=workers).train_dataloader()
    batches = iter(stopped)
    for _ in range(3):
        next(batches)
    buffer = io.BytesIO()
    torch.save(stopped.state_dict(), buffer)  # as a checkpoint keeps it
    del batches

    torch.manual_seed(2)  # a new process, seeded otherwise: the state brings the run's seed back
    resumed = streaming(shards, num_workers=workers).train_dataloader()
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert len(resumed) == len(epoch)
    batches = iter(resumed)  # what Lightning does: len(loader) - 3 batches, never asking for one more
    rest = [next(batches) for _ in range(len(epoch) - 3)]
    for got, expected in zip(rest, epoch[3:]):
        assert torch.equal(got["index"], expected["index"])
        torch.testing.assert_close(got["image"], expected["image"], rtol=0, atol=0)
    # And the epoch after is a whole new one, as in the run that never stopped.
    assert [batch["index"].tolist() for batch in resumed] == [i.tolist() for i in next_epoch]


def test_missing_shards_and_an_undecodable_sample_name_the_path(converted, tmp_path):
    _, shards = converted
    with pytest.raises(DatasetError, match=f"{tmp_path}/classes.json: cannot read.*datamodules.streaming convert"):
        StreamingImageNetDataModule(str(tmp_path)).setup("fit")
    broken = tmp_path / "val"
    broken.mkdir()
    (tmp_path / "classes.json").write_text((shards / "classes.json").read_text())
    chunks = sorted((shards / "val").iterdir())
    for path in chunks:
        (broken / path.name).write_bytes(path.read_bytes())
    chunk = next(p for p in chunks if p.suffix == ".bin")
    data = bytearray(chunk.read_bytes())
    start = data.index(b"\xff\xd8\xff")  # the first image's JPEG bytes: its header zeroed
    data[start:start + 400] = bytes(400)
    (broken / chunk.name).write_bytes(bytes(data))
    datamodule = StreamingImageNetDataModule(str(tmp_path), batch_size=8, num_workers=0, **SIZES)
    datamodule.setup("validate")
    with pytest.raises(DatasetError, match=rf"{broken}/{chunk.name}: sample \d+ \(val/n\d+/\S+\.JPEG\) cannot"):
        list(datamodule.val_dataloader())


def fit_args(shards, *extra) -> list:
    """FishNet-tiny on the shards: the quickstart recipe with the streaming data file, 32x32, 3 batches an epoch."""
    return ["fit", "--config", CONFIGS / "quickstart" / "classification.yaml",
            "--config", CONFIGS / "data" / "imagenet_streaming.yaml", "--data.init_args.shards", shards,
            "--data.init_args.batch_size", "16", "--data.init_args.num_workers", "1",
            "--data.init_args.image_size", "32", "--data.init_args.val_resize", "36",
            "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
            "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false", *extra]


def test_fit_from_shards_and_resume_mid_epoch_with_the_weights_of_an_uninterrupted_run(converted, in_tmp):
    _, shards = converted
    a = run_cli([*fit_args(shards), *csv_logger("a")])
    assert a.trainer.num_training_batches == 3 and torch.isfinite(a.trainer.callback_metrics["val/acc1"])
    stop = ["--trainer.callbacks+=fishnet_pl.callbacks.LastCheckpoint", "--trainer.callbacks.every_n_train_steps=2",
            "--trainer.callbacks+=tests.helpers.InterruptAtStep", "--trainer.callbacks.step=2"]
    with pytest.raises(SystemExit):  # stopped in the middle of the first epoch, like Ctrl-C
        run_cli([*fit_args(shards), *csv_logger("b"), *stop])
    checkpoint = torch.load("b/checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    # Lightning's fit loop saves the loader's state_dict (and hands it back before iterating on resume).
    (loader_state,) = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state["num_samples_yielded"] == 2 * 16
    run_cli([*fit_args(shards), *csv_logger("b"), "--ckpt_path", "b/checkpoints/last.ckpt"])
    a_final = torch.load("a/checkpoints/last.ckpt", weights_only=True)
    b_final = torch.load("b/checkpoints/last.ckpt", weights_only=True)
    assert a_final["global_step"] == b_final["global_step"] == 6
    for key, value in a_final["state_dict"].items():
        torch.testing.assert_close(b_final["state_dict"][key], value, msg=key)


def test_the_readmes_streaming_composition_resolves(capsys):
    parts = ["backbone/fishnet150", "task/classification", "data/imagenet_streaming", "trainer/default",
             "trainer/gpu8"]
    with pytest.raises(SystemExit):
        run_cli(["fit", *(a for part in parts for a in ("--config", CONFIGS / f"{part}.yaml")), "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["data"]["class_path"] == "datamodules.streaming.StreamingImageNetDataModule"
    assert config["data"]["init_args"]["batch_size"] == 32 and config["model"]["backbone"] == "fishnet150"
    assert "--config configs/data/imagenet_streaming.yaml" in (CONFIGS.parent / "docs/training.md").read_text()


def test_convert_names_an_unreadable_image_or_skips_it_and_keeps_to_its_own_folder(tmp_path):
    root = write_classification(tmp_path / "imagenet")
    with pytest.raises(DatasetError, match="imagenet: holds LOC_synset_mapping.txt, train, val, not only converted"):
        convert_imagenet(str(root), str(root), num_workers=1)  # would empty the dataset's own folders
    with pytest.raises(DatasetError, match=f"{tmp_path}: holds imagenet, not only"):
        convert_imagenet(str(root), str(tmp_path), num_workers=1)
    bad = next((root / "train").rglob("*.JPEG"))
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(Exception, match=f"{bad}: cannot be read or decoded as an image"):
        convert_imagenet(str(root), str(tmp_path / "shards"), num_workers=1)
    record = convert_imagenet(str(root), str(tmp_path / "shards"), num_workers=1, skip_unreadable=True)
    assert record["images"] == {"train": 191, "val": 48} and record["num_classes"] == 4


def test_data_bench_times_the_shards_beside_the_folders(converted, tmp_path, capsys):
    from bench import data

    _, shards = converted
    payload = data.main(["--datamodules", "imagenet", "--source", "folder,shards", "--shards", str(shards),
                         "--seconds", "0.1", "--json", str(tmp_path / "data.json")])
    folder, streamed = payload["results"]["imagenet"], payload["results"]["imagenet (shards)"]
    assert streamed["images_per_s"] > 0 and streamed["decode_images_per_s"] > 0
    assert streamed["train_images"] == folder["train_images"] == 192
    assert streamed["output_shape"] == folder["output_shape"] == "3x224x224"
    assert "| imagenet (shards) |" in capsys.readouterr().out
