"""Several tasks on one backbone, out of Lightning (issue 23): ``load_network`` of a multi-task checkpoint, export of
one of its tasks, predict from the checkpoint alone into a folder per task, and ``torch.compile`` of every task's
network; on one short CLI fit of the multi-task quickstart."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.predict import import_object
from fishnet_pl import FishNetModule
from fishnet_pl.checkpoint import read_checkpoint, recorded_dataset_info
from fishnet_pl.cli import main
from fishnet_pl.inference import load_network
from fishnet_pl.tasks import ClassificationHead, MultiTaskHead, SegmentationHead

from .conftest import ROOT, csv_logger, run_checkpoint, run_cli
from .test_export import make_checkpoint, normalized, ort_run
from .test_multitask import SEG, batches, multitask_config, three_tasks

TASKS = ["cls", "det", "seg"]  # as multitask_config writes them (sorted)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """(working directory, last.ckpt, the module as trained): two steps of the multi-task quickstart, fp32."""
    cwd = tmp_path_factory.mktemp("multitask")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        cli = run_cli(["fit", "--config", multitask_config(cwd), "--trainer.max_epochs", "1",
                       "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
                       "--trainer.precision", "32-true", "--trainer.enable_progress_bar", "false",
                       *csv_logger(cwd / "run")])
    return cwd, run_checkpoint(cwd / "run"), cli.model.eval()


def photos(cwd: Path, folder: Path) -> list[str]:
    """A folder of a few quickstart images of each task (nested) and an unreadable one; the readable ones' paths
    relative to it."""
    data = cwd / "data" / "quickstart"
    sources = [*sorted((data / "imagenet" / "val").rglob("*.JPEG"))[:2], *sorted((data / "cityscapes").rglob(
        "*_leftImg8bit.png"))[:1], *sorted((data / "coco" / "val2017").glob("*.jpg"))[:1]]
    assert len(sources) == 4, sources
    (folder / "nested").mkdir(parents=True)
    for i, source in enumerate(sources):
        with Image.open(source) as image:
            image.convert("RGB").save(folder / ("nested" if i % 2 else ".") / f"{i}_{source.stem}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))


# ---------------------------------------------------------------------- load_network
@torch.no_grad()
def test_load_network_runs_every_task_on_0_1_images_and_gives_each_tasks_network(fitted):
    cwd, ckpt, module = fitted
    net = load_network(ckpt)
    assert not net.training and list(net.tasks) == TASKS
    data = recorded_dataset_info(read_checkpoint(ckpt))
    for shape in ((2, 3, 64, 64), (1, 3, 64, 96)):
        x = torch.rand(*shape)
        out, expected = net(x), module(x)
        assert list(out) == TASKS
        torch.testing.assert_close(out["cls"], expected["cls"])
        torch.testing.assert_close(out["seg"], expected["seg"])
        assert out["seg"].shape == (shape[0], 19, *shape[2:])
        for got, ref in zip(out["det"], expected["det"]):
            assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    # Each output is what the task's network gives, on images prepared as its preprocessing says.
    x = torch.rand(2, 3, 64, 64)
    out = net(x)
    seg = net.task("seg")
    assert seg is net.tasks["seg"] and seg.encoder.model.model is net.backbone  # sharing the one backbone
    torch.testing.assert_close(net.task("cls")(normalized(net.task("cls"), x)), out["cls"])
    torch.testing.assert_close(seg(normalized(seg, x)), out["seg"])
    # Segmentation pads other sizes as its head does (the classifier, a FishNet, takes multiples of 32 only).
    odd = torch.rand(1, 3, 50, 90)
    padded = torch.nn.functional.pad(normalized(seg, odd), (0, 96 - 90, 0, 64 - 50))
    torch.testing.assert_close(net.heads["seg"](seg, odd), seg(padded)[..., :50, :90])
    assert net.task("det")(list(x))[0]["boxes"].shape == out["det"][0]["boxes"].shape
    # Each task's attributes, as load_network gives a single-task network; per task on the multi-task one.
    assert seg.preprocessing["pad_multiple"] == 32 and seg.class_names == data.tasks["seg"].class_names
    assert net.task("cls").preprocessing["input_size"] == (3, 64, 64) and net.task("cls").preprocessing["resize"] == 72
    assert net.task("det").preprocessing["min_size"] == 128
    assert net.preprocessing == {t: net.task(t).preprocessing for t in TASKS}
    assert net.class_names == {t: data.tasks[t].class_names for t in TASKS} and len(net.class_names["cls"]) == 4
    assert net.state_dict().keys() == module.network.state_dict().keys()  # the heads hold no weights
    with pytest.raises(ValueError, match=re.escape("no task 'depth' in this multi-task network; its tasks are "
                                                   "['cls', 'det', 'seg']")):
        net.task("depth")

    fused = load_network(ckpt, fuse=True)  # BatchNorms folded: the same outputs up to rounding
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules()) < sum(
        isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert fused.task("seg").encoder.model.model is fused.backbone
    got = fused(x)
    torch.testing.assert_close(got["cls"], out["cls"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["seg"], out["seg"], rtol=1e-4, atol=1e-4)
    assert fused.task("seg").preprocessing == seg.preprocessing


# ---------------------------------------------------------------------- export
@torch.no_grad()
def test_export_one_task_of_a_multitask_checkpoint_as_a_single_task_checkpoint_exports(fitted, tmp_path, capsys):
    cwd, ckpt, module = fitted
    capsys.readouterr()
    main(["export", "--task", "seg", "--ckpt_path", str(ckpt), "--format", "onnx", "--output", f"{tmp_path}/"])
    onnx_file = tmp_path / f"seg_fishnet_tiny_{ckpt.stem}.onnx"  # named after the task
    assert capsys.readouterr().out.splitlines() == [f"wrote {onnx_file}"]
    for shape in ((1, 3, 64, 64), (2, 3, 64, 96)):  # dynamic batch and sides, multiples of the stride
        x = torch.rand(*shape)
        (logits,) = ort_run(onnx_file, x)
        np.testing.assert_allclose(logits, module(x)["seg"].numpy(), atol=1e-4, rtol=1e-4)


def test_export_of_a_multitask_checkpoint_needs_one_of_its_tasks_and_a_single_task_one_none(fitted, tmp_path):
    ckpt = fitted[1]
    for args, named in (([], "without --task"), (["--task", "depth"], "has no task 'depth'")):
        with pytest.raises(ValueError, match=re.escape(f"{ckpt}: a multi-task checkpoint {named}; it exports one "
                                                       "task at a time: add --task with one of ['cls', 'det', 'seg']")):
            main(["export", *args, "--ckpt_path", str(ckpt), "--format", "onnx", "--output", f"{tmp_path}/"])
    single = tmp_path / "single.ckpt"
    make_checkpoint(single, ClassificationHead(), 3)
    with pytest.raises(ValueError, match=re.escape(f"{single}: a single-task checkpoint (classification); "
                                                   "--task cls chooses one task of a multi-task checkpoint")):
        main(["export", "--task", "cls", "--ckpt_path", str(single), "--format", "onnx", "--output", f"{tmp_path}/"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["single.ckpt"]  # nothing written
    module = fitted[2]
    with pytest.raises(ValueError, match=re.escape("exports one task at a time: fishnet-pl export --task with one of "
                                                   "['cls', 'det', 'seg']")):
        module.head.export_wrapper(module.network, {}, 3)


def test_load_network_of_a_multitask_checkpoint_needs_no_lightning(fitted):
    code = textwrap.dedent(f"""
        import sys, torch
        from fishnet_pl import load_network
        net = load_network(r"{fitted[1]}")
        with torch.no_grad():
            out = net(torch.rand(1, 3, 64, 64))
        assert out["seg"].shape == (1, 19, 64, 64) and out["cls"].shape == (1, 4), out
        assert "lightning" not in sys.modules and "pytorch_lightning" not in sys.modules
        print("OK")
    """)
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "OK" in run.stdout, run.stderr[-3000:]


# ---------------------------------------------------------------------- predict
@torch.no_grad()
def test_predict_from_the_checkpoint_alone_writes_each_tasks_files_in_its_folder(fitted, tmp_path, caplog):
    cwd, ckpt, module = fitted
    folder, out, elsewhere = tmp_path / "my photos", tmp_path / "out", tmp_path / "elsewhere"
    readable = photos(cwd, folder)
    elsewhere.mkdir()
    args = ["predict", "--ckpt_path", ckpt, "--data.predict_root", folder, "--predict_dir", out,
            "--trainer.enable_progress_bar", "false"]
    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.INFO):
        mp.chdir(elsewhere)  # no config, no dataset, no run folder
        run_cli(args)
    assert not list(elsewhere.iterdir())
    assert sorted(p.name for p in out.iterdir()) == ["cls", "det", "seg", "unreadable.txt"]
    assert (out / "unreadable.txt").read_text() == f"{folder / 'broken.jpg'}\n"  # listed once, not once per task
    assert [m for m in caplog.messages if "images predicted" in m] == [
        f"predict: 4 images predicted by each task (cls, det, seg), 1 skipped as unreadable (listed in "
        f"unreadable.txt, e.g. {folder / 'broken.jpg'}); files written to {out}, a folder per task (cls/, det/, seg/)"]

    # Each task's files as its single-task predict writes them, its images prepared by its own recorded transform.
    info = recorded_dataset_info(read_checkpoint(ckpt)).tasks
    net = load_network(ckpt)

    def output(task: str, relative: str):
        """The task's output for the image prepared by its recorded transform (each size its own)."""
        transform = import_object(info[task].predict["transform"])(**info[task].predict.get("transform_kwargs", {}))
        image = transform(image=np.asarray(Image.open(folder / relative).convert("RGB")))["image"]
        return net.heads[task](net.task(task), image[None])

    records = [json.loads(line) for line in (out / "cls" / "predictions.jsonl").read_text().splitlines()]
    assert sorted(r["path"] for r in records) == readable
    for r in records:
        probs = output("cls", r["path"]).softmax(1)[0]
        assert r["classes"][0] == int(probs.argmax()) and r["names"][0] == info["cls"].class_names[r["classes"][0]]
        assert r["scores"] == pytest.approx(probs.topk(4).values.tolist(), abs=1e-4)

    palette = [c for colour in info["seg"].palette for c in colour]
    for relative in readable:
        mask = Image.open(out / "seg" / f"{relative}.mask.png")
        assert mask.getpalette()[:len(palette)] == palette  # the task's own data: Cityscapes' colours
        expected = output("seg", relative).argmax(1)[0].numpy()
        assert np.mean(np.asarray(mask) == expected) > 0.999  # the fused network's rounding may flip a tie
        assert (out / "seg" / f"{relative}.overlay.png").is_file()

    lines = [json.loads(line) for line in (out / "det" / "detections.jsonl").read_text().splitlines()]
    assert sorted(line["path"] for line in lines) == readable
    threshold = module.head.heads["det"].predict_score_thresh
    for line in lines:
        assert (out / "det" / line["drawn"]).is_file()
        scores = output("det", line["path"])[0]["scores"]
        assert len(line["detections"]) == int((scores >= threshold).sum())

    # An earlier run's files stay: the same --predict_dir is refused.
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(elsewhere)
        with pytest.raises(FileExistsError, match=f"{re.escape(str(out))}: holds files of an earlier run"):
            run_cli(args)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# ---------------------------------------------------------------------- torch.compile
def test_compile_compiles_every_tasks_network_which_the_steps_run():
    graphs = []

    def recording(graph, example_inputs):  # a torch.compile backend: note the graph, run it as it is
        graphs.append(graph)
        return graph.forward

    plain = three_tasks().eval()
    torch.manual_seed(0)
    head = MultiTaskHead({"cls": ClassificationHead(), "seg": SegmentationHead(**SEG)})
    compiled = FishNetModule(head, backbone="fishnet_tiny", num_classes={"cls": 4, "seg": 5},
                             compile={"backend": recording}).eval()
    assert all(network._compiled_call_impl is not None for network in compiled.network.tasks.values())
    assert plain.network.tasks["cls"]._compiled_call_impl is None
    compiled.load_state_dict({k: v for k, v in plain.state_dict().items() if not k.startswith("network.tasks.det.")})
    data = batches()
    with torch.no_grad():
        for task in ("cls", "seg"):
            before = len(graphs)
            loss, _ = compiled.head.training_step(compiled.network, {task: data[task]})
            assert len(graphs) > before, f"{task}: nothing compiled ran"
            expected, _ = plain.head.training_step(plain.network, {task: data[task]})
            torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
