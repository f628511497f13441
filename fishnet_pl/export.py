"""``fishnet-pl export --ckpt_path CKPT --format onnx|pt2 --output FILE|FOLDER``: a trained model as ONNX or
``torch.export``.

``--output`` naming a folder (an existing one, or any path ending with a separator) writes
``<folder>/<task>_<backbone>_<checkpoint file stem>.<format>`` there, e.g.
``exports/classification_fishnet_tiny_last.onnx``. An existing file is replaced only with ``--overwrite``; without
it the command stops before exporting.

The exported graph takes float images in [0, 1] (RGB, the checkpoint's ``in_channels``) and includes the
normalisation with the backbone's mean and std, so users feed raw [0, 1] images:

- classification: ``images`` [B, C, H, W] -> ``logits`` [B, num_classes]; the batch is dynamic, H and W
  are fixed to the export size: the evaluation crop of the training data, which the checkpoint records and
  ``fishnet-pl predict`` uses (``load_network(CKPT).preprocessing``: resize the shorter side to ``resize``,
  centre-crop ``input_size``); the backbone's ``pretrained_cfg`` input size for a checkpoint without that
  record; ``--input_size`` overrides both.
- segmentation: ``images`` [B, C, H, W] -> ``logits`` [B, K, H, W]; batch, height and width are dynamic,
  but H and W must be multiples of the backbone's stride (``net.preprocessing["pad_multiple"]`` of
  ``load_network``, 32 for FishNet): pad other images (e.g. with the mean colour) and crop the logits.
- detection (Faster / Mask R-CNN): one ``image`` [C, H, W] of any size -> ``boxes`` [N, 4] (xyxy, input
  pixels), ``labels`` [N] (1..K), ``scores`` [N] and, for Mask R-CNN, ``masks`` [N, 1, H, W] probabilities;
  the detector resizes and normalises the image itself. Only ONNX: torchvision's detectors export with
  the TorchScript-based ONNX exporter (``dynamo=False``); ``torch.export`` (pt2) raises.

Classification and segmentation use torch's ``torch.export``-based ONNX exporter (``dynamo=True``).
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fishnet_pl.inference import build_from_checkpoint, preprocessing, read_checkpoint
from fishnet_pl.models.fuse import fuse_for_inference
from fishnet_pl.models.weights import CKPT_PREDICT_DATA_KEY
from fishnet_pl.tasks.base import TaskHead, as_head

FORMATS = ("onnx", "pt2")
DEFAULT_OPSET = 18
DETECTION_OPSET = 17


class NormalizedNetwork(nn.Module):
    """The task network behind its input normalisation: takes float images in [0, 1], [B, C, H, W]."""

    def __init__(self, network: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network((images - self.mean) / self.std)


class DetectorOutputs(nn.Module):
    """torchvision's detector on one float [C, H, W] image in [0, 1] (it resizes and normalises itself),
    returning ``(boxes, labels, scores)`` plus ``masks`` for Mask R-CNN, as tensors."""

    def __init__(self, network: nn.Module, with_masks: bool):
        super().__init__()
        self.network = network
        self.keys = ("boxes", "labels", "scores", "masks") if with_masks else ("boxes", "labels", "scores")

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.network([image])[0]
        return tuple(out[k] for k in self.keys)


def task_of(head: TaskHead) -> str:
    from fishnet_pl.tasks.detection import DetectionHead
    from fishnet_pl.tasks.segmentation import SegmentationHead

    if isinstance(head, DetectionHead):
        return "detection"
    if isinstance(head, SegmentationHead):
        return "segmentation"
    return "classification"


def exportable(ckpt: dict[str, Any], input_size: tuple[int, int] | None = None
               ) -> tuple[nn.Module, torch.Tensor, str, list[str], list[str]]:
    """The wrapper to export (eval mode, BatchNorms folded), an example input, the task, input and output names."""
    network, head = build_from_checkpoint(ckpt)
    info = preprocessing(network, head, ckpt.get(CKPT_PREDICT_DATA_KEY))
    network = fuse_for_inference(network, channels_last=False)  # layouts are the runtime's business
    in_channels = ckpt["hyper_parameters"].get("in_channels", 3)
    task = task_of(head)
    if task == "detection":
        h, w = input_size or (info["min_size"] if isinstance(info["min_size"], int) else info["min_size"][-1],) * 2
        wrapper = DetectorOutputs(network, head.with_masks)
        return wrapper.eval(), torch.rand(in_channels, h, w), task, ["image"], list(wrapper.keys)
    wrapper = NormalizedNetwork(network, info["mean"], info["std"]).eval()
    wrapper.pad_multiple = info.get("pad_multiple")
    if task == "segmentation":
        m = info["pad_multiple"]
        h, w = input_size or (2 * m, 2 * m)
        if h % m or w % m:
            raise ValueError(f"segmentation export size must be a multiple of {m} (the backbone's stride), got {h}x{w}")
    else:
        h, w = input_size or tuple(info["input_size"][-2:])
    return wrapper, torch.rand(2, in_channels, h, w), task, ["images"], ["logits"]


def _dynamic_shapes(task: str, pad_multiple: int | None) -> dict[str, dict[int, Any]]:
    from torch.export import Dim

    batch = Dim("batch", min=1, max=1024)
    if task == "classification":
        return {"images": {0: batch}}
    m = pad_multiple
    # Sides are multiples of the stride: H = m * rows, W = m * cols (derived dims).
    rows, cols = Dim("rows", min=1, max=8192 // m), Dim("cols", min=1, max=8192 // m)
    return {"images": {0: batch, 2: m * rows, 3: m * cols}}


def output_file(output: str | os.PathLike, ckpt_path: str | os.PathLike, ckpt: dict[str, Any], fmt: str,
                overwrite: bool = False) -> Path:
    """The file to write: ``output``, or ``<output>/<task>_<backbone>_<checkpoint stem>.<fmt>`` when ``output`` is
    a folder (an existing one, or a path ending with a separator). Raises ``FileExistsError`` if that file exists
    and not ``overwrite``."""
    text = os.fspath(output)
    path = Path(text)
    if path.is_dir() or text.endswith(tuple(sep for sep in (os.sep, os.altsep) if sep)):
        task = task_of(as_head(ckpt["hyper_parameters"].get("head")))
        backbone = ckpt["hyper_parameters"].get("backbone", "fishnet150")
        path = path / f"{task}_{backbone}_{Path(ckpt_path).stem}.{fmt}"
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: file exists; pass --overwrite to replace it (overwrite=True in Python), or "
                              "give another --output")
    return path


def export_checkpoint(ckpt_path: str | os.PathLike, fmt: str, output: str | os.PathLike,
                      input_size: tuple[int, int] | None = None, opset: int | None = None,
                      overwrite: bool = False) -> Path:
    """Export the checkpoint's network with its normalisation (``fmt`` "onnx" or "pt2").

    ``output`` is a file, or a folder to write ``<task>_<backbone>_<checkpoint stem>.<fmt>`` in (``output_file``);
    an existing file raises ``FileExistsError`` before anything is exported, unless ``overwrite``. Returns the
    file written."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    ckpt = read_checkpoint(ckpt_path)
    output = output_file(output, ckpt_path, ckpt, fmt, overwrite)
    wrapper, example, task, input_names, output_names = exportable(ckpt, input_size)
    output.parent.mkdir(parents=True, exist_ok=True)
    if task == "detection":
        if fmt == "pt2":
            raise NotImplementedError(
                "torch.export (pt2) cannot export torchvision's Faster / Mask R-CNN on this torch: the number "
                "of boxes after non-maximum suppression is data-dependent (torchvision's batched_nms guards on "
                "it, GuardOnDataDependentSymNode); export detection with --format onnx")
        dynamic_axes = {"image": {1: "height", 2: "width"}, **{n: {0: "detections"} for n in output_names}}
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(wrapper, (example,), str(output), dynamo=False, opset_version=opset or DETECTION_OPSET,
                              input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes)
        return output
    dynamic = _dynamic_shapes(task, wrapper.pad_multiple)
    if fmt == "pt2":
        with torch.no_grad():
            program = torch.export.export(wrapper, (example,), dynamic_shapes=dynamic, strict=False)
        torch.export.save(program, str(output))
        return output
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper, (example,), dynamo=True, opset_version=opset or DEFAULT_OPSET,
                                    input_names=input_names, output_names=output_names,
                                    dynamic_shapes=dynamic, verbose=False)
    program.save(str(output))
    return output


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fishnet-pl export", allow_abbrev=False,  # --ckpt_pat is a typo, not --ckpt_path
        description="Export a trained fishnet-pl checkpoint as ONNX or torch.export (.pt2). The graph takes "
                    "float images in [0, 1] and normalises them itself.")
    parser.add_argument("--ckpt_path", required=True, help="a fishnet-pl Lightning checkpoint (.ckpt)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="onnx or pt2 (torch.export); "
                        "detection exports only to onnx")
    parser.add_argument("--output", required=True,
                        help="file to write, or a folder (existing, or ending with a path separator) to write "
                             "<task>_<backbone>_<checkpoint file stem>.<format> in, e.g. "
                             "classification_fishnet_tiny_last.onnx")
    parser.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    parser.add_argument("--input_size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="example input size: classification's fixed size (default: the evaluation crop the "
                             "checkpoint records of its training data, as predict uses it, else the backbone's "
                             "pretrained input size); for segmentation a multiple of the stride")
    parser.add_argument("--opset", type=int, default=None,
                        help=f"ONNX opset (default {DEFAULT_OPSET}, detection {DETECTION_OPSET})")
    return parser


def export_main(args: list[str]) -> Path:
    """``fishnet-pl export ...`` (``args`` without the ``export`` word)."""
    ns = build_parser().parse_args(args)
    output = export_checkpoint(ns.ckpt_path, ns.format, ns.output,
                               tuple(ns.input_size) if ns.input_size else None, ns.opset, ns.overwrite)
    print(f"wrote {output}")
    return output
