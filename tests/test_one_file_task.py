"""A new task is one file: ``RegressionHead`` below (one number per image on any timm backbone) needs no edit
anywhere in the package to predict through ``fishnet-pl predict`` (its own file format; the generic writer's
folder, unreadable list and closing line), to export to ONNX and torch.export, and to load with ``load_network``."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchmetrics import MeanSquaredError, MetricCollection

from datamodules.imagenet import classification_info
from datamodules.predict import import_object
from fishnet_pl.cli import main
from fishnet_pl.inference import load_network
from fishnet_pl.models.registry import create_backbone
from fishnet_pl.tasks import ClassificationHead, DetectionHead
from fishnet_pl.tasks.base import TaskHead
from fishnet_pl.writers import PredictionWriter, ResultsWriter, task_callbacks

from .conftest import predict_from_checkpoint_alone
from .test_export import make_checkpoint, normalized, ort_run


class RegressionHead(TaskHead):
    """One number per image: the timm model with a single output, trained with the mean squared error."""

    def build(self, backbone: str, num_classes: int, in_chans: int) -> nn.Module:
        network = create_backbone(backbone, num_classes=1, in_chans=in_chans)
        self.set_normalization(network, in_chans)
        self.metrics = nn.ModuleDict({stage: MetricCollection({"mse": MeanSquaredError()})
                                      for stage in ("val", "test")})
        return network

    def forward(self, network: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return network(self.normalize(images))[:, 0]

    def training_step(self, network: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = F.mse_loss(self(network, batch["image"]), batch["target"])
        return loss, {"loss": loss}

    def evaluation_step(self, network: nn.Module, batch: dict, stage: str) -> None:
        self.metrics[stage].update(self(network, batch["image"]), batch["target"])

    def predict_step(self, network: nn.Module, batch: dict) -> list[dict[str, Any]]:
        values = self(network, batch["image"]).tolist()
        return [{"path": path, "value": value} for path, value in zip(batch["path"], values)]

    def write_predictions(self, records: list[dict[str, Any]], paths: list[str], folder: Path, first: bool) -> None:
        with open(folder / "values.csv", "w" if first else "a") as f:
            f.writelines(f"{path},{record['value']}\n" for path, record in zip(paths, records))


def test_a_head_in_one_file_predicts_exports_and_loads(tmp_path, caplog):
    evaluation = SimpleNamespace(dataset_info=classification_info(None, 64, 72, batch_size=32))  # its transform
    ckpt = tmp_path / "regression.ckpt"
    module = make_checkpoint(ckpt, RegressionHead(), 1, evaluation)
    rng = np.random.default_rng(0)
    photos = []
    for name, size in (("a.png", (70, 90)), ("b.jpg", (96, 64))):
        photos.append(tmp_path / name)
        Image.fromarray(rng.integers(0, 255, (*size, 3), np.uint8)).save(photos[-1])

    # load_network: the plain timm network, its preprocessing the recorded evaluation transform.
    net = load_network(ckpt)
    assert net.preprocessing["input_size"] == (3, 64, 64) and net.preprocessing["resize"] == 72
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(normalized(net, x))[:, 0], module(x), rtol=0, atol=1e-6)

    # predict: the head's values.csv, in the generic writer's folder, mirroring the input paths.
    with caplog.at_level(logging.INFO):
        out, unreadable, readable = predict_from_checkpoint_alone(ckpt, photos, tmp_path)
    values = dict(line.split(",") for line in (out / "values.csv").read_text().splitlines())
    assert sorted(values) == readable
    assert (out / "unreadable.txt").read_text().splitlines() == unreadable
    assert [m for m in caplog.messages if "images predicted" in m] == [
        f"predict: {len(readable)} images predicted, 1 skipped as unreadable (listed in unreadable.txt, e.g. "
        f"{unreadable[0]}); files written to {out}"]
    config = evaluation.dataset_info.predict
    prepare = import_object(config["transform"])(**config["transform_kwargs"])
    for path, value in values.items():
        image = np.asarray(Image.open(tmp_path / "my photos" / path).convert("RGB"))
        with torch.no_grad():
            expected = module(prepare(image=image)["image"][None])
        assert abs(float(value) - expected.item()) < 1e-5, path

    # export: named after the task, normalisation inside, dynamic batch at the evaluation crop.
    exports = tmp_path / "exports"
    for fmt in ("onnx", "pt2"):
        main(["export", "--ckpt_path", str(ckpt), "--format", fmt, "--output", f"{exports}{os.sep}"])
    assert sorted(p.name for p in exports.iterdir()) == ["regression_fishnet_tiny_regression.onnx",
                                                         "regression_fishnet_tiny_regression.pt2"]
    program = torch.export.load(str(exports / "regression_fishnet_tiny_regression.pt2")).module()
    with torch.no_grad():
        for batch in (1, 3):
            ref = module(x[:batch])
            (logits,) = ort_run(exports / "regression_fishnet_tiny_regression.onnx", x[:batch])
            np.testing.assert_allclose(logits[:, 0], ref.numpy(), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(program(x[:batch])[:, 0], ref, atol=1e-4, rtol=1e-4)


def test_the_writers_a_run_gets_are_the_files_its_head_writes():
    """A results writer only for a head with results files (detection's COCO results); no prediction writer for a
    head that writes no files (``trainer.predict`` still returns its records)."""

    class RecordsOnly(RegressionHead):
        write_predictions = TaskHead.write_predictions

    assert [type(c) for c in task_callbacks(DetectionHead())] == [PredictionWriter, ResultsWriter]
    assert [type(c) for c in task_callbacks(ClassificationHead())] == [PredictionWriter]
    assert [type(c) for c in task_callbacks(RegressionHead())] == [PredictionWriter]
    assert task_callbacks(RecordsOnly()) == [] and PredictionWriter.for_head(RecordsOnly()) is None
