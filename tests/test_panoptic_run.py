"""Panoptic FPN end to end through the CLI: the panoptic quickstart (the Cityscapes-layout street scenes with their
instance ids), its PQ as cityscapesScripts computes it from the written results, DDP validation, and predicting
from the checkpoint alone."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fishnet_pl.panoptic import read_panoptic_png

from .conftest import CONFIGS, predict_from_checkpoint_alone, run_checkpoint, run_cli, validation_metrics

QUICKSTART = CONFIGS / "quickstart" / "panoptic.yaml"


@pytest.fixture(scope="module")
def quickstart(classification_quickstart_dir):
    """The panoptic quickstart, run after the classification one in its directory (it starts from its backbone)."""
    cwd = classification_quickstart_dir
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        cli = run_cli(["fit", "--config", QUICKSTART, "--trainer.enable_progress_bar", "false"])
    return cli, cwd


def test_quickstart_reaches_a_panoptic_quality_well_above_chance(quickstart):
    cli, _ = quickstart
    metrics = {name: float(value) for name, value in cli.trainer.callback_metrics.items()}
    # Road everywhere (the largest class) would score PQ = 1/7 x road's PQ over the 7 classes present, under 0.15;
    # no instance found gives PQ 0 for car and person.
    assert metrics["val/pq"] > 0.45 and metrics["val/pq_things"] > 0.3 and metrics["val/pq_stuff"] > 0.45, metrics
    assert metrics["val/pq_car"] > 0.3 and metrics["val/segm_ap"] > 0.15, metrics
    shown = set(cli.trainer.progress_bar_metrics)
    assert {"train/loss", "val/pq", "val/bbox_ap", "val/segm_ap"} <= shown and "val/pq_car" not in shown, shown


def test_cityscapes_scripts_scores_the_written_results_as_logged(quickstart, tmp_path):
    from cityscapesscripts.evaluation.evalPanopticSemanticLabeling import evaluatePanoptic
    from cityscapesscripts.preparation.createPanopticImgs import convert2panoptic

    cli, cwd = quickstart
    run_dir = cwd / cli.trainer.log_dir
    with contextlib.redirect_stdout(io.StringIO()):  # both print their progress and tables
        convert2panoptic(cityscapesPath=str(cwd / "data/quickstart/cityscapes/gtFine"), outputFolder=str(tmp_path),
                         useTrainId=False, setNames=["val"])
        official = evaluatePanoptic(str(tmp_path / "cityscapes_panoptic_val.json"),
                                    str(tmp_path / "cityscapes_panoptic_val"), str(run_dir / "val_panoptic.json"),
                                    str(run_dir / "val_panoptic"), str(tmp_path / "result.json"))
    logged = cli.trainer.callback_metrics  # the last validation, whose results the run wrote
    for group, suffix in (("All", ""), ("Things", "_things"), ("Stuff", "_stuff")):
        for name in ("pq", "sq", "rq"):
            assert float(official[group][name]) == pytest.approx(float(logged[f"val/{name}{suffix}"]), abs=1e-6)
    detections = json.loads((run_dir / "val_detections.json").read_text())
    assert detections and {d["category_id"] for d in detections} <= {24, 25, 26, 27, 28, 31, 32, 33}  # label ids


def test_validation_on_three_processes_gives_the_one_process_metrics(quickstart):
    _, cwd = quickstart
    ckpt = run_checkpoint(cwd / "runs" / "quickstart" / "panoptic")
    # 8 val images on 3 processes: the distributed sampler repeats 1 to give each 3.
    args = ["--config", QUICKSTART, "--ckpt_path", ckpt, "--data.init_args.val_batch_size", "2"]
    one, three = (validation_metrics(args, cwd, devices) for devices in (1, 3))
    assert set(one) == set(three) and {"val/pq", "val/pq_car", "val/segm_ap"} <= set(one)
    assert one == pytest.approx(three, abs=1e-6)


def test_predict_from_the_checkpoint_alone_writes_panoptic_maps(quickstart, tmp_path):
    _, cwd = quickstart
    ckpt = run_checkpoint(cwd / "runs" / "quickstart" / "panoptic")
    images = sorted((cwd / "data/quickstart/cityscapes/leftImg8bit/test").rglob("*_leftImg8bit.png"))[:2]
    out, unreadable, readable = predict_from_checkpoint_alone(ckpt, images, tmp_path)
    lines = {line["path"]: line for line in map(json.loads, (out / "panoptic.jsonl").read_text().splitlines())}
    assert sorted(lines) == readable and (out / "unreadable.txt").read_text().splitlines() == unreadable
    names = {"road", "sidewalk", "building", "vegetation", "sky", "car", "person"}
    for image in images:
        line = lines[f"nested/{image.name}"]
        ids = read_panoptic_png((out / line["panoptic"]).read_bytes())
        assert ids.shape == np.asarray(Image.open(image)).shape[:2]
        assert {s["id"] for s in line["segments"]} == set(np.unique(ids).tolist()) - {0}
        assert {s["name"] for s in line["segments"]} <= names and any(s["isthing"] for s in line["segments"])
        for s in line["segments"]:
            assert s["area"] == int((ids == s["id"]).sum())
        assert json.loads((out / f"nested/{image.name}.segments.json").read_text()) == line["segments"]
        assert Image.open(out / line["drawn"]).size == Image.open(image).size


def test_coco_panoptic_trains_through_the_cli_and_panopticapi_scores_the_results_as_logged(tmp_path):
    from panopticapi.evaluation import pq_compute

    from .datamodules.test_coco_panoptic import GHOST, crowds_only, scene, void, write_split

    def real(ids_segments):  # as COCO's files are: every listed segment has pixels
        ids, segments = ids_segments
        return ids, [s for s in segments if s["id"] != GHOST]

    root = tmp_path / "coco"
    write_split(root, "train2017", {11: real(scene()), 12: real(scene(64, 48)), 14: crowds_only(),
                                    15: real(scene(flipped=True))})
    gt_json = write_split(root, "val2017", {21: real(scene()), 22: void(), 23: crowds_only(64, 48)})
    run = tmp_path / "run"
    cli = run_cli(["fit", "--model.backbone", "fishnet_tiny", "--model.head", "fishnet_pl.tasks.PanopticHead",
                   "--model.head.init_args.num_stuff_classes", "3", "--model.head.init_args.semantic_channels", "32",
                   "--model.head.init_args.fpn_channels", "32", "--model.head.init_args.min_size", "48",
                   "--model.head.init_args.max_size", "64", "--model.head.init_args.representation_size", "32",
                   "--model.head.init_args.mask_head_channels", "8", "--model.head.init_args.stuff_area_thresh", "16",
                   "--model.head.init_args.instance_score_thresh", "0.05", "--model.lr", "0.01",
                   "--data", "datamodules.coco_panoptic.COCOPanopticDataModule", "--data.root", root,
                   "--data.batch_size", "2", "--data.num_workers", "0", "--trainer.max_epochs", "2",
                   "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
                   "--trainer.default_root_dir", run])
    run_dir = Path(cli.trainer.log_dir)  # run/version_0
    written = json.loads((run_dir / "val_panoptic.json").read_text())
    assert sorted(a["image_id"] for a in written["annotations"]) == [21, 22, 23]  # the COCO image ids
    with contextlib.redirect_stdout(io.StringIO()):
        official = pq_compute(str(gt_json), str(run_dir / "val_panoptic.json"),
                              str(root / "annotations" / "panoptic_val2017"), str(run_dir / "val_panoptic"))
    logged = cli.trainer.callback_metrics
    assert official["All"]["n"] == 5 and logged["val/pq"] > 0  # every category scored
    for group, suffix in (("All", ""), ("Things", "_things"), ("Stuff", "_stuff")):
        assert official[group]["pq"] == pytest.approx(float(logged[f"val/pq{suffix}"]), abs=1e-6), group
