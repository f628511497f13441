"""``fishnet-pl export --ckpt_path CKPT --format onnx|pt2 --output FILE|FOLDER``: a trained model as ONNX or
``torch.export``.

``--output`` naming a folder (an existing one, or any path ending with a separator) writes
``<folder>/<task>_<backbone>_<checkpoint file stem>.<format>`` there, e.g.
``exports/classification_fishnet_tiny_last.onnx``. An existing file is replaced only with ``--overwrite``; without
it the command stops before exporting.

The exported graph takes float images in [0, 1] (RGB, the checkpoint's ``in_channels``) and includes the
normalisation with the backbone's mean and std, so users feed raw [0, 1] images. Each task's head says what
it exports (``TaskHead.export_wrapper``: inputs, outputs, which sizes are dynamic):

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

Other networks use torch's ``torch.export``-based ONNX exporter (``dynamo=True``).

A multi-task checkpoint exports one task at a time: ``--task seg`` exports the network of its task ``seg``
exactly as a single-task checkpoint of that task exports (a folder ``--output`` gets
``seg_<backbone>_<stem>.<format>``); without ``--task`` it stops, naming the tasks, and ``--task`` on a single-task
checkpoint stops too.
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from datamodules.dataset_info import DatasetInfo
from fishnet_pl.checkpoint import read_checkpoint, recorded_dataset_info, task_info
from fishnet_pl.inference import build_from_checkpoint, preprocessing
from fishnet_pl.models.fuse import fuse_for_inference
from fishnet_pl.tasks.base import ExportSpec, TaskHead, as_head
from fishnet_pl.tasks.multitask import MultiTaskNetwork

FORMATS = ("onnx", "pt2")
DEFAULT_OPSET = 18


def exportable(ckpt: dict[str, Any], input_size: tuple[int, int] | None = None, task: str | None = None,
               ckpt_path: str | os.PathLike = "the checkpoint") -> ExportSpec:
    """What to export (eval mode, BatchNorms folded), as the checkpoint's head wraps its network; of a multi-task
    checkpoint, the network of ``task`` as its head wraps it (``task_network``)."""
    network, head, data = task_network(ckpt, task, ckpt_path)
    info = preprocessing(network, head, data)
    network = fuse_for_inference(network, channels_last=False)  # layouts are the runtime's business
    return head.export_wrapper(network, info, ckpt["hyper_parameters"].get("in_channels", 3), input_size)


def task_network(ckpt: dict[str, Any], task: str | None = None,
                 ckpt_path: str | os.PathLike = "the checkpoint") -> tuple[nn.Module, TaskHead, DatasetInfo]:
    """The checkpoint's network, head and recorded data; for a multi-task checkpoint those of ``task`` (its
    network sharing the backbone), which it needs, as a single-task one needs none."""
    network, head = build_from_checkpoint(ckpt)
    data = recorded_dataset_info(ckpt)
    if not isinstance(network, MultiTaskNetwork):
        if task is not None:
            raise ValueError(f"{ckpt_path}: a single-task checkpoint ({head.task}); --task {task} chooses one task "
                             "of a multi-task checkpoint: leave it out")
        return network, head, data
    if task is None or task not in network.tasks:
        given = "without --task" if task is None else f"has no task {task!r}"
        raise ValueError(f"{ckpt_path}: a multi-task checkpoint {given}; it exports one task at a time: add --task "
                         f"with one of {list(network.tasks)} (task= in Python)")
    return network.task(task), head.heads[task], task_info(data, task)


def output_file(output: str | os.PathLike, ckpt_path: str | os.PathLike, ckpt: dict[str, Any], fmt: str,
                overwrite: bool = False, task: str | None = None) -> Path:
    """The file to write: ``output``, or ``<output>/<task>_<backbone>_<checkpoint stem>.<fmt>`` when ``output`` is
    a folder (an existing one, or a path ending with a separator); ``<task>`` is the head's (``classification``)
    or, of a multi-task checkpoint, the ``task`` name (``seg``). Raises ``FileExistsError`` if that file exists
    and not ``overwrite``."""
    text = os.fspath(output)
    path = Path(text)
    if path.is_dir() or text.endswith(tuple(sep for sep in (os.sep, os.altsep) if sep)):
        task = task or as_head(ckpt["hyper_parameters"].get("head")).task
        backbone = ckpt["hyper_parameters"].get("backbone", "fishnet150")
        path = path / f"{task}_{backbone}_{Path(ckpt_path).stem}.{fmt}"
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: file exists; pass --overwrite to replace it (overwrite=True in Python), or "
                              "give another --output")
    return path


def export_checkpoint(ckpt_path: str | os.PathLike, fmt: str, output: str | os.PathLike,
                      input_size: tuple[int, int] | None = None, opset: int | None = None,
                      overwrite: bool = False, task: str | None = None) -> Path:
    """Export the checkpoint's network with its normalisation (``fmt`` "onnx" or "pt2"); of a multi-task
    checkpoint, the network of ``task``, as a single-task checkpoint of that task exports.

    ``output`` is a file, or a folder to write ``<task>_<backbone>_<checkpoint stem>.<fmt>`` in (``output_file``);
    an existing file raises ``FileExistsError`` before anything is exported, unless ``overwrite``. Returns the
    file written."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    ckpt = read_checkpoint(ckpt_path)
    spec = exportable(ckpt, input_size, task, ckpt_path)  # a wrong --task fails here, before the file is chosen
    output = output_file(output, ckpt_path, ckpt, fmt, overwrite, task)
    output.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "pt2" and spec.pt2_unsupported:
        raise NotImplementedError(spec.pt2_unsupported)
    opset = opset or spec.opset or DEFAULT_OPSET
    names = {"input_names": spec.input_names, "output_names": spec.output_names}
    if fmt == "pt2":
        with torch.no_grad():
            program = torch.export.export(spec.module, (spec.example,), dynamic_shapes=spec.dynamic_shapes,
                                          strict=False)
        torch.export.save(program, str(output))
        return output
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracer warnings
        if spec.dynamic_axes is not None:  # a network only the TorchScript-based exporter takes
            torch.onnx.export(spec.module, (spec.example,), str(output), dynamo=False, opset_version=opset,
                              dynamic_axes=spec.dynamic_axes, **names)
            return output
        program = torch.onnx.export(spec.module, (spec.example,), dynamo=True, opset_version=opset,
                                    dynamic_shapes=spec.dynamic_shapes, verbose=False, **names)
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
    parser.add_argument("--task", default=None,
                        help="of a multi-task checkpoint, the task to export (its name, e.g. seg), as a single-task "
                             "checkpoint of it exports; the file in an --output folder is then named after it")
    parser.add_argument("--input_size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="example input size: classification's fixed size (default: the evaluation crop the "
                             "checkpoint records of its training data, as predict uses it, else the backbone's "
                             "pretrained input size); for segmentation a multiple of the stride")
    parser.add_argument("--opset", type=int, default=None,
                        help=f"ONNX opset (default: the task's, {DEFAULT_OPSET} unless its head asks another, "
                             "e.g. detection's 17)")
    return parser


def export_main(args: list[str]) -> Path:
    """``fishnet-pl export ...`` (``args`` without the ``export`` word)."""
    ns = build_parser().parse_args(args)
    output = export_checkpoint(ns.ckpt_path, ns.format, ns.output,
                               tuple(ns.input_size) if ns.input_size else None, ns.opset, ns.overwrite, ns.task)
    print(f"wrote {output}")
    return output
