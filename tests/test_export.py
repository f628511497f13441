"""Trained models outside Lightning: ``load_network``, smp's save_pretrained/from_pretrained, and
``fishnet-pl export`` to ONNX and torch.export for every task, on tiny checkpoints made without fitting."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fishnet_pl.cli import main
from fishnet_pl.export import export_checkpoint
from fishnet_pl.inference import load_network
from fishnet_pl.module import FishNetModule, _class_names
from fishnet_pl.tasks import ClassificationHead, DetectionHead, SegmentationHead

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
CLASS_NAMES = ["cat", "dog", "fish"]


def make_checkpoint(path: Path, head, num_classes: int, datamodule=None) -> FishNetModule:
    """A checkpoint as Lightning writes it (the keys load_network reads), from a fresh tiny module."""
    torch.manual_seed(0)
    module = FishNetModule(head, backbone="fishnet_tiny", num_classes=num_classes).eval()
    if datamodule is not None:  # what the module's setup does with a trainer's datamodule
        module._trainer = SimpleNamespace(datamodule=datamodule)
        module.head.set_class_names(_class_names(module))
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": "2.6.6", "epoch": 0, "global_step": 0}
    module.on_save_checkpoint(ckpt)
    module._trainer = None
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
        assert set(pre) >= {"mean", "std", "input_size", "crop_pct", "interpolation"}
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
