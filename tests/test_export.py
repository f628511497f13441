"""Trained models outside Lightning: ``load_network``, smp's save_pretrained/from_pretrained, and
``fishnet-pl export`` to ONNX and torch.export for every task, on tiny checkpoints made without fitting; the
exported classifier against ``fishnet-pl predict`` on the fitted quickstart."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import timm
import torch
from PIL import Image

from datamodules.dataset_info import dataset_info
from datamodules.imagenet import classification_info
from datamodules.predict import import_object
from datamodules.segmentation_folder import SegmentationFolderDataModule
from fishnet_pl.cli import main
from fishnet_pl.export import export_checkpoint
from fishnet_pl.inference import load_network
from fishnet_pl.module import FishNetModule
from fishnet_pl.tasks import ClassificationHead, DetectionHead, SegmentationHead

from .conftest import run_checkpoint, run_cli

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
CLASS_NAMES = ["cat", "dog", "fish"]


def make_checkpoint(path: Path, head, num_classes: int, datamodule=None) -> FishNetModule:
    """A checkpoint as Lightning writes it (the keys load_network reads), from a fresh tiny module."""
    torch.manual_seed(0)
    module = FishNetModule(head, backbone="fishnet_tiny", num_classes=num_classes).eval()
    if datamodule is not None:  # what the module's setup does with a trainer's datamodule
        module.head.set_dataset_info(dataset_info(datamodule))
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": "2.6.6", "epoch": 0, "global_step": 0}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return module


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Checkpoints and their modules: classification, segmentation (FPN), detection (Mask R-CNN)."""
    root = tmp_path_factory.mktemp("ckpts")
    heads = {
        "classification": (ClassificationHead(), 3, SimpleNamespace(classes=CLASS_NAMES)),
        "segmentation": (SegmentationHead("FPN", {"decoder_pyramid_channels": 32, "decoder_segmentation_channels": 32}),
                         3, SimpleNamespace(class_names=CLASS_NAMES)),
        "detection": (DetectionHead("maskrcnn", fpn_channels=32, min_size=SIZE, max_size=2 * SIZE,
                                    representation_size=64, mask_head_channels=16, box_detections_per_img=20),
                      2, None),
    }
    out = {}
    for task, (head, k, dm) in heads.items():
        path = root / f"{task}.ckpt"
        out[task] = (path, make_checkpoint(path, head, k, dm))
    return out


def normalized(net, x):
    mean = torch.tensor(net.preprocessing["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(net.preprocessing["std"]).view(1, -1, 1, 1)
    return (x - mean) / std


#: ``preprocessing``'s interpolation names as OpenCV flags (its recorded "bilinear" is OpenCV's).
CV2_INTERPOLATION = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}


def prepare_for_classifier(image: np.ndarray, pre: dict) -> torch.Tensor:
    """An RGB uint8 [H, W, 3] image as ``preprocessing`` says, with OpenCV alone: the shorter side resized to
    ``resize`` (sides times the same factor, truncated), the centre crop of ``input_size``; float [3, h, w] in
    [0, 1], not normalised."""
    h, w = image.shape[:2]
    factor = pre["resize"] / min(h, w)
    image = cv2.resize(image, (int(w * factor), int(h * factor)), interpolation=CV2_INTERPOLATION[pre["interpolation"]])
    ch, cw = pre["input_size"][1:]
    top, left = (image.shape[0] - ch) // 2, (image.shape[1] - cw) // 2
    crop = image[top:top + ch, left:left + cw]
    return torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float() / 255


def ort_run(path: Path, x: torch.Tensor) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})


# ---------------------------------------------------------------------- load_network
@torch.no_grad()
def test_load_network_matches_module(ckpts):
    x = torch.rand(2, 3, SIZE, SIZE)
    for task, (path, module) in ckpts.items():
        net = load_network(path)
        assert not net.training
        pre = net.preprocessing
        assert set(pre) >= {"mean", "std", "input_size", "resize", "crop_pct", "interpolation"}
        if task == "detection":
            assert net.class_names is None
            ref, out = module(x), net(list(x))
            for r, o in zip(ref, out):
                assert r.keys() == o.keys()
                for key in r:
                    torch.testing.assert_close(o[key], r[key])
            continue
        assert net.class_names == CLASS_NAMES
        if task == "segmentation":
            assert pre["pad_multiple"] == module.head.pad_multiple == 32  # FishNet's output stride
        torch.testing.assert_close(net(normalized(net, x)), module(x), rtol=0, atol=1e-6)
        fused = load_network(path, fuse=True)  # BatchNorms folded, channels_last: same outputs, no BN after a conv
        assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules()) < sum(
            isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
        torch.testing.assert_close(fused(normalized(net, x)), module(x), rtol=1e-4, atol=1e-4)


def test_load_network_without_lightning_and_smp_pretrained(ckpts, tmp_path):
    """In a process that never imports Lightning: load and run every task; save the segmentation model with
    smp's save_pretrained; a fresh process with only fishnet_pl and smp reloads it with identical outputs."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    seg_dir, io_file = tmp_path / "smp_model", tmp_path / "io.pt"
    paths = {task: str(path) for task, (path, _) in ckpts.items()}
    first = textwrap.dedent(f"""
        import sys, torch
        from fishnet_pl import load_network
        paths = {paths!r}
        x = torch.rand(2, 3, {SIZE}, {SIZE})
        with torch.no_grad():
            for task, path in paths.items():
                net = load_network(path)
                out = net(list(x)) if task == "detection" else net(x)
                if task == "segmentation":
                    assert out.shape == (2, 3, {SIZE}, {SIZE}), out.shape
                    net.save_pretrained(r"{seg_dir}")
                    torch.save({{"x": x, "logits": out}}, r"{io_file}")
        assert "lightning" not in sys.modules and "pytorch_lightning" not in sys.modules
        print("OK")
    """)
    second = textwrap.dedent(f"""
        import sys, torch
        import fishnet_pl
        import segmentation_models_pytorch as smp
        net = smp.from_pretrained(r"{seg_dir}").eval()
        io = torch.load(r"{io_file}")
        with torch.no_grad():
            out = net(io["x"])
        assert torch.allclose(out, io["logits"], rtol=0, atol=1e-6), (out - io["logits"]).abs().max()
        assert "lightning" not in sys.modules
        print("OK")
    """)
    for code in (first, second):
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0 and "OK" in run.stdout, run.stderr[-3000:]


# ---------------------------------------------------------------------- export
@torch.no_grad()
def test_export_classification(ckpts, tmp_path):
    path, module = ckpts["classification"]
    onnx_file, pt2_file = tmp_path / "cls.onnx", tmp_path / "cls.pt2"
    main(["export", "--ckpt_path", str(path), "--format", "onnx", "--output", str(onnx_file),
          "--input_size", str(SIZE), str(SIZE)])
    export_checkpoint(path, "pt2", pt2_file, input_size=(SIZE, SIZE))
    program = torch.export.load(str(pt2_file)).module()
    for batch in (1, 3):
        x = torch.rand(batch, 3, SIZE, SIZE)
        ref = module(x)
        (logits,) = ort_run(onnx_file, x)
        np.testing.assert_allclose(logits, ref.numpy(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(program(x), ref, atol=1e-4, rtol=1e-4)  # BatchNorms folded: rounding


@torch.no_grad()
def test_export_segmentation(ckpts, tmp_path):
    path, module = ckpts["segmentation"]
    onnx_file, pt2_file = tmp_path / "seg.onnx", tmp_path / "seg.pt2"
    export_checkpoint(path, "onnx", onnx_file)
    main(["export", "--ckpt_path", str(path), "--format", "pt2", "--output", str(pt2_file)])
    program = torch.export.load(str(pt2_file)).module()
    for shape in ((1, 3, SIZE, SIZE), (2, 3, SIZE, 3 * SIZE // 2)):  # sides: multiples of the stride, 32
        x = torch.rand(*shape)
        ref = module(x)
        (logits,) = ort_run(onnx_file, x)
        assert logits.shape == (shape[0], 3, *shape[2:])
        np.testing.assert_allclose(logits, ref.numpy(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(program(x), ref, atol=1e-4, rtol=1e-4)  # BatchNorms folded: rounding


@torch.no_grad()
def test_export_detection_onnx(ckpts, tmp_path):
    path, module = ckpts["detection"]
    onnx_file = tmp_path / "det.onnx"
    main(["export", "--ckpt_path", str(path), "--format", "onnx", "--output", str(onnx_file)])
    for h, w in ((SIZE, SIZE), (SIZE + 16, SIZE - 16)):  # any image size: the detector resizes it
        image = torch.rand(3, h, w)
        ref = module([image])[0]
        boxes, labels, scores, masks = ort_run(onnx_file, image)
        assert len(boxes) == len(ref["boxes"]) > 0
        np.testing.assert_allclose(boxes, ref["boxes"].numpy(), atol=1e-3, rtol=1e-4)
        np.testing.assert_array_equal(labels, ref["labels"].numpy())
        np.testing.assert_allclose(scores, ref["scores"].numpy(), atol=1e-4)
        assert masks.shape == (len(boxes), 1, h, w)
        np.testing.assert_allclose(masks, ref["masks"].numpy(), atol=1e-3)


def test_export_detection_pt2_is_a_clear_error(ckpts, tmp_path):
    with pytest.raises(NotImplementedError, match="--format onnx"):
        main(["export", "--ckpt_path", str(ckpts["detection"][0]), "--format", "pt2",
              "--output", str(tmp_path / "det.pt2")])


# ---------------------------------------------------------------------- the recorded evaluation transform
def test_preprocessing_describes_the_evaluation_transform_the_checkpoint_records(ckpts, tmp_path):
    """``load_network(...).preprocessing`` reproduces, pixel for pixel, the evaluation transform the training
    datamodule recorded (the one ``fishnet-pl predict`` applies); without a record, the backbone's pretrained_cfg."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (97, 131, 3), np.uint8)  # odd, non-square: rounding and centring show
    recorded = {}
    classification = SimpleNamespace(dataset_info=classification_info(CLASS_NAMES, 64, 80, batch_size=32))
    segmentation = SegmentationFolderDataModule(str(tmp_path / "unused"), classes=CLASS_NAMES, eval_scale=0.6)
    for task, head, datamodule in (("classification", ClassificationHead(), classification),
                                   ("segmentation", SegmentationHead("FPN", {"decoder_pyramid_channels": 32,
                                                                             "decoder_segmentation_channels": 32}),
                                    segmentation)):
        path = tmp_path / f"{task}.ckpt"
        make_checkpoint(path, head, 3, datamodule)
        config = datamodule.dataset_info.predict
        recorded[task] = import_object(config["transform"])(**config["transform_kwargs"])(image=image)["image"]
        pre = load_network(path).preprocessing
        if task == "classification":
            assert pre["input_size"] == (3, 64, 64) and pre["resize"] == 80 and pre["crop_pct"] == 64 / 80
            assert torch.equal(prepare_for_classifier(image, pre), recorded[task])
        else:
            assert pre["scale"] == 0.6 and pre["interpolation"] == "bilinear"
            h, w = int(97 * pre["scale"]), int(131 * pre["scale"])
            mine = cv2.resize(image, (w, h), interpolation=CV2_INTERPOLATION[pre["interpolation"]])
            assert torch.equal(torch.from_numpy(mine).permute(2, 0, 1).float() / 255, recorded[task])

    # The module-scoped checkpoints' datamodule recorded no transform: timm's pretrained_cfg, as fit would pick it.
    cfg = timm.get_pretrained_cfg("fishnet_tiny")
    pre = load_network(ckpts["classification"][0]).preprocessing
    assert pre["input_size"] == tuple(cfg.input_size) and pre["resize"] == round(cfg.input_size[-1] / cfg.crop_pct)
    assert pre["interpolation"] == cfg.interpolation


@torch.no_grad()
def test_exported_quickstart_classifier_agrees_with_predict(classification_quickstart_dir, tmp_path, capsys):
    """The fitted quickstart (64-pixel crops of 72-pixel images), exported to a folder: the ONNX input is the
    training crop, and on images prepared as ``load_network(...).preprocessing`` says, ONNX Runtime's top-1
    class and probability are ``fishnet-pl predict``'s, for the dataset's images and resized, non-square copies."""
    ckpt = run_checkpoint(classification_quickstart_dir / "runs" / "quickstart" / "classification")
    photos, out = tmp_path / "photos", tmp_path / "predictions"
    photos.mkdir()
    val = classification_quickstart_dir / "data" / "quickstart" / "imagenet" / "val"
    for i, wnid in enumerate(sorted(p.name for p in val.iterdir())):
        for j, source in enumerate(sorted((val / wnid).iterdir())[:3]):
            with Image.open(source) as im:
                im.save(photos / f"{wnid}_{j}.png")
                size = ((150, 100), (90, 131), (200, 200))[(i + j) % 3]  # (width, height)
                im.resize(size, Image.BICUBIC).save(photos / f"{wnid}_{j}_{size[0]}x{size[1]}.png")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        run_cli(["predict", "--ckpt_path", ckpt, "--data.predict_root", photos, "--predict_dir", out,
                 "--trainer.enable_progress_bar", "false"])
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == len(list(photos.iterdir())) == 24

    capsys.readouterr()
    main(["export", "--ckpt_path", str(ckpt), "--format", "onnx", "--output", f"{tmp_path / 'exports'}{os.sep}"])
    onnx_file = tmp_path / "exports" / f"classification_fishnet_tiny_{ckpt.stem}.onnx"
    assert capsys.readouterr().out.splitlines() == [f"wrote {onnx_file}"]

    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [3, 64, 64]
    pre = load_network(ckpt).preprocessing
    assert pre["input_size"] == (3, 64, 64) and pre["resize"] == 72
    images = torch.stack([prepare_for_classifier(np.asarray(Image.open(r["file"]).convert("RGB")), pre)
                          for r in records])
    (logits,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    probabilities = torch.from_numpy(logits).softmax(1)
    assert probabilities.argmax(1).tolist() == [r["classes"][0] for r in records]
    np.testing.assert_allclose(probabilities.max(1).values.numpy(), [r["scores"][0] for r in records], atol=1e-4)


# ---------------------------------------------------------------------- where export writes
def test_export_refuses_an_existing_file_unless_overwrite(ckpts, tmp_path):
    path = ckpts["detection"][0]
    kept = tmp_path / "model.pt2"
    kept.write_bytes(b"an earlier export")
    # Refused before the export starts: detection's pt2 export would raise NotImplementedError.
    with pytest.raises(FileExistsError, match=f"{re.escape(str(kept))}.*--overwrite"):
        main(["export", "--ckpt_path", str(path), "--format", "pt2", "--output", str(kept)])
    assert kept.read_bytes() == b"an earlier export"

    path = ckpts["classification"][0]
    with pytest.raises(FileExistsError, match=f"{re.escape(str(kept))}.*--overwrite"):
        main(["export", "--ckpt_path", str(path), "--format", "pt2", "--output", str(kept)])
    main(["export", "--ckpt_path", str(path), "--format", "pt2", "--output", str(kept), "--overwrite",
          "--input_size", str(SIZE), str(SIZE)])
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(str(kept)).module()(x), ckpts["classification"][1](x),
                                   atol=1e-4, rtol=1e-4)


def test_export_to_a_folder_writes_the_run_name(ckpts, tmp_path, capsys):
    path = ckpts["segmentation"][0]
    folder = tmp_path / "exports"
    folder.mkdir()
    expected = folder / "segmentation_fishnet_tiny_segmentation.pt2"  # <task>_<backbone>_<checkpoint stem>
    capsys.readouterr()
    main(["export", "--ckpt_path", str(path), "--format", "pt2", "--output", str(folder)])
    assert capsys.readouterr().out.splitlines() == [f"wrote {expected}"]
    assert sorted(folder.iterdir()) == [expected]
    x = torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(str(expected)).module()(x), ckpts["segmentation"][1](x),
                                   atol=1e-4, rtol=1e-4)
    # The same refusal for the file in the folder.
    with pytest.raises(FileExistsError, match=f"{re.escape(str(expected))}.*--overwrite"):
        main(["export", "--ckpt_path", str(path), "--format", "pt2", "--output", str(folder)])
