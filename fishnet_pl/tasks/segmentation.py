"""Semantic segmentation: any segmentation-models-pytorch decoder on any timm backbone.

The network is smp's own model with smp's timm-universal encoder (``encoder_name="tu-fishnet150"``,
``"tu-resnet50"``, ...), which owns the timm ``features_only`` backbone as ``encoder.model``. Images of
any size are padded to a multiple of the backbone's stride and the prediction cropped back, in
training, validation, test and predict alike.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from PIL import Image
from segmentation_models_pytorch.base import SegmentationModel
from torch import nn

from datamodules.dataset_info import DatasetInfo
from fishnet_pl.drawing import legend_strip, text_font
from fishnet_pl.metrics import SegmentationIoU
from fishnet_pl.tasks.base import ExportSpec, NormalizedNetwork, TaskHead


def input_multiple(backbone: nn.Module) -> int:
    """What input sides must be a multiple of: the backbone's own rule (a FishNet's ``input_size_multiple``: its
    tail always runs down to its output stride, even when the decoder reads only finer maps), else the coarsest
    stride the decoder reads."""
    inner = getattr(backbone, "model", backbone)
    return getattr(inner, "input_size_multiple", None) or max(backbone.feature_info.reduction())


def smp_architectures() -> dict[str, type[SegmentationModel]]:
    """smp's architectures by lower-case name (the names ``smp.create_model`` accepts)."""
    return {cls.__name__.lower(): cls for cls in vars(smp).values()
            if isinstance(cls, type) and issubclass(cls, SegmentationModel) and cls is not SegmentationModel}


class SegmentationHead(TaskHead):
    """An smp decoder (FPN, Unet, DeepLabV3+, UPerNet, ...) on any timm backbone, trained with cross-entropy.

    Batches: ``image`` float [B, C, H, W] in [0, 1] (any size; normalised here with the backbone's
    mean and std), ``mask`` int64 [B, H, W] class ids
    with ``ignore_index`` for unlabelled pixels, and for evaluation ``index`` (dataset indices, so that under
    DDP every image counts once) and ``size`` int64 [B, 2] (each image's height and width, when the batch pads
    images of different sizes to its largest: ``datamodules.common.collate_padded``; each is predicted at its
    own size). Validation and test log ``{stage}/miou`` (mean IoU over the classes present
    in the ground truth or the predictions) and ``{stage}/iou_<class>`` for each such class, over all
    processes (``fishnet_pl.metrics.SegmentationIoU``). Predict gives each image's class ids, which
    ``write_predictions`` saves as ``a/img.jpg.mask.png`` (the datamodule's palette, e.g. Cityscapes') and
    ``a/img.jpg.overlay.png`` (the mask blended over the image, with a legend).

    Args:
        decoder: smp architecture name: Unet, UnetPlusPlus, FPN, PSPNet, DeepLabV3, DeepLabV3Plus,
            Linknet, MAnet, PAN, UPerNet or Segformer.
        decoder_kwargs: further arguments of that smp class (e.g. ``decoder_channels``).
        encoder_depth: how many backbone maps the decoder reads (3-5: down to stride 8, 16 or 32).
        output_stride: backbone output stride for decoders that take one (DeepLabV3, DeepLabV3Plus,
            PAN); None keeps smp's default for the decoder (8, 16, 16). Others need 32.
        dice_weight: add smp's multi-class Dice loss with this weight (0 = off).
        lovasz_weight: add smp's Lovasz-softmax loss with this weight (0 = off).
        ignore_index: mask value of unlabelled pixels (excluded from loss and metrics).
        eval_mode: "whole" (the full image at once) or "slide" (overlapping windows, averaged).
        window: (height, width) of the sliding window.
        window_overlap: fraction of a window shared with its neighbour.
        eval_flip: also predict the horizontally flipped image and average (test-time augmentation).
        eval_scales: predict at each of these image scales and average the probabilities.
    """

    monitor = "val/miou"
    monitor_mode = "max"
    progress_bar = ("loss", "miou")
    backbone_path = "encoder.model"  # smp's TimmUniversalEncoder holds the timm model as .model

    def __init__(
        self,
        decoder: str = "FPN",
        decoder_kwargs: dict[str, Any] | None = None,
        encoder_depth: int = 5,
        output_stride: int | None = None,
        dice_weight: float = 0.0,
        lovasz_weight: float = 0.0,
        ignore_index: int = 255,
        eval_mode: Literal["whole", "slide"] = "whole",
        window: tuple[int, int] = (512, 1024),
        window_overlap: float = 1 / 3,
        eval_flip: bool = False,
        eval_scales: tuple[float, ...] = (1.0,),
    ):
        super().__init__()
        archs = smp_architectures()
        if decoder.lower() not in archs:
            names = sorted(c.__name__ for c in archs.values())
            raise ValueError(f"unknown smp decoder {decoder!r}; choose from {names}")
        if decoder.lower() == "dpt":
            raise ValueError("smp's DPT takes only timm transformer encoders, not a convolutional backbone")
        accepts_stride = "encoder_output_stride" in inspect.signature(archs[decoder.lower()]).parameters
        if output_stride is not None and output_stride != 32 and not accepts_stride:
            raise ValueError(f"{decoder} works at output stride 32; output_stride={output_stride} is for "
                             "DeepLabV3, DeepLabV3Plus or PAN")
        if eval_mode not in ("whole", "slide"):
            raise ValueError(f"eval_mode must be 'whole' or 'slide', got {eval_mode!r}")
        if not 0.0 <= window_overlap < 1.0:
            raise ValueError(f"window_overlap must be in [0, 1), got {window_overlap}")
        if not eval_scales or min(eval_scales) <= 0:
            raise ValueError(f"eval_scales must be positive, got {eval_scales}")
        self.decoder, self.decoder_kwargs, self.encoder_depth = decoder, dict(decoder_kwargs or {}), encoder_depth
        self.output_stride = output_stride
        self.dice_weight, self.lovasz_weight, self.ignore_index = dice_weight, lovasz_weight, ignore_index
        self.eval_mode, self.window, self.window_overlap = eval_mode, tuple(window), window_overlap
        self.eval_flip, self.eval_scales = eval_flip, tuple(eval_scales)
        self._arch, self._accepts_stride = archs[decoder.lower()], accepts_stride

    def build(self, backbone: str, num_classes: int, in_chans: int) -> nn.Module:
        self.num_classes = num_classes
        kwargs = dict(encoder_weights=None, encoder_depth=self.encoder_depth, in_channels=in_chans,
                      classes=num_classes, **self.decoder_kwargs)
        if self._accepts_stride:
            kwargs["encoder_output_stride"] = self.output_stride or inspect.signature(
                self._arch).parameters["encoder_output_stride"].default
        # smp's FPN and PSPNet up-sample their output by a constant tuned to their default depth: scale it
        # to this depth, so the logits come out at the input's size.
        if self._arch is smp.FPN and "upsampling" not in self.decoder_kwargs:
            kwargs["upsampling"] = 2 ** (self.encoder_depth - 3)
        if self._arch is smp.PSPNet and "upsampling" not in self.decoder_kwargs:
            kwargs["upsampling"] = 2**self.encoder_depth
        network = self._arch(encoder_name=f"tu-{backbone}", **kwargs)
        self.set_normalization(network.encoder.model, in_chans)
        self.pad_multiple = input_multiple(network.encoder.model)
        self.dice = smp.losses.DiceLoss("multiclass", ignore_index=self.ignore_index) if self.dice_weight else None
        self.lovasz = (smp.losses.LovaszLoss("multiclass", ignore_index=self.ignore_index)
                       if self.lovasz_weight else None)
        self.metrics = nn.ModuleDict({stage: SegmentationIoU(num_classes, self.ignore_index, self.class_names)
                                      for stage in ("val", "test")})
        return network

    def set_dataset_info(self, info: DatasetInfo) -> None:
        """Per-class metric names; the data's unlabelled value must be the one the loss and metrics ignore."""
        if info.ignore_index is not None and info.ignore_index != self.ignore_index:
            raise ValueError(f"the data marks unlabelled pixels {info.ignore_index}, the segmentation head ignores "
                             f"{self.ignore_index}: set --model.head.init_args.ignore_index {info.ignore_index}")
        super().set_dataset_info(info)
        for metric in getattr(self, "metrics", {}).values():
            metric.class_names = info.class_names

    # ------------------------------------------------------------------ inference
    def forward(self, network: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Class logits [B, K, H, W] at the input's size (whole image, no test-time augmentation)."""
        return self._logits(network, images)

    def _logits(self, network: nn.Module, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        m = self.pad_multiple
        ph, pw = math.ceil(h / m) * m, math.ceil(w / m) * m
        images = self.normalize(images)
        if (ph, pw) != (h, w):
            images = F.pad(images, (0, pw - w, 0, ph - h))  # zeros: the mean colour after normalisation
        logits = network(images)
        if logits.shape[-2:] != (ph, pw):
            raise ValueError(f"{self.decoder} at encoder depth {self.encoder_depth} gives logits of size "
                             f"{tuple(logits.shape[-2:])} for a {ph}x{pw} input; set its upsampling in decoder_kwargs")
        return logits[..., :h, :w]

    def _slide_logits(self, network: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Average the logits of overlapping windows covering the image (windows shrink to small images)."""
        h, w = images.shape[-2:]
        wh, ww = min(self.window[0], h), min(self.window[1], w)
        sh, sw = max(1, round(wh * (1 - self.window_overlap))), max(1, round(ww * (1 - self.window_overlap)))
        tops = list(range(0, h - wh + 1, sh))
        lefts = list(range(0, w - ww + 1, sw))
        tops += [h - wh] if tops[-1] != h - wh else []
        lefts += [w - ww] if lefts[-1] != w - ww else []
        total = images.new_zeros(images.shape[0], self.num_classes, h, w)
        count = images.new_zeros(1, 1, h, w)
        for top in tops:
            for left in lefts:
                total[..., top:top + wh, left:left + ww] += self._logits(
                    network, images[..., top:top + wh, left:left + ww])
                count[..., top:top + wh, left:left + ww] += 1
        return total / count

    def predict_probabilities(self, network: nn.Module, images: torch.Tensor,
                              sizes: torch.Tensor | None = None) -> torch.Tensor:
        """Class probabilities [B, K, H, W] with the configured evaluation: whole or sliding window,
        averaged over ``eval_scales`` and, with ``eval_flip``, the mirrored image.

        ``sizes`` [B, 2]: each image's own (height, width) in a batch padded to its largest. The images of
        each size run together, cropped to it, so an image gets the prediction it gets alone (more padding
        would change it: the network's context, global pooling and scaled or mirrored edges); the padding's
        probabilities are 0.
        """
        if sizes is not None and (sizes != sizes.new_tensor(images.shape[-2:])).any():
            probs = images.new_zeros(len(images), self.num_classes, *images.shape[-2:])
            for h, w in sizes.unique(dim=0).tolist():
                same = (sizes == sizes.new_tensor([h, w])).all(dim=1)
                probs[same, :, :h, :w] = self.predict_probabilities(network, images[same, :, :h, :w])
            return probs
        h, w = images.shape[-2:]
        infer = self._slide_logits if self.eval_mode == "slide" else self._logits
        probs = 0
        for scale in self.eval_scales:
            scaled = images if scale == 1 else F.interpolate(images, scale_factor=scale, mode="bilinear",
                                                             align_corners=False)
            for flip in (False, True) if self.eval_flip else (False,):
                logits = infer(network, scaled.flip(-1) if flip else scaled)
                logits = logits.flip(-1) if flip else logits
                if logits.shape[-2:] != (h, w):
                    logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
                probs = probs + logits.softmax(dim=1)
        return probs / (len(self.eval_scales) * (2 if self.eval_flip else 1))

    # ------------------------------------------------------------------ steps
    def training_step(self, network: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, mask = self._logits(network, batch["image"]), batch["mask"]
        logs = {"ce": F.cross_entropy(logits, mask, ignore_index=self.ignore_index)}
        if self.dice is not None:
            logs["dice"] = self.dice(logits, mask)
        if self.lovasz is not None:
            logs["lovasz"] = self.lovasz(logits, mask)
        loss = logs["ce"] + self.dice_weight * logs.get("dice", 0) + self.lovasz_weight * logs.get("lovasz", 0)
        return loss, {"loss": loss, **logs}

    def evaluation_step(self, network: nn.Module, batch: dict, stage: str) -> None:
        predictions = self.predict_probabilities(network, batch["image"], batch.get("size")).argmax(dim=1)
        self.metrics[stage].update(predictions, batch["mask"], batch.get("index"))  # padding: ignore_index

    # ------------------------------------------------------------------ predict
    def predict_step(self, network: nn.Module, batch: dict) -> list[dict[str, Any]]:
        images, sizes = batch["image"], batch.get("size")
        labels = self.predict_probabilities(network, images, sizes).argmax(dim=1).to(torch.uint8).cpu().numpy()
        pixels = (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        sizes = sizes.tolist() if sizes is not None else [images.shape[-2:]] * len(images)
        return [{"path": path, "labels": m[:h, :w], "image": p[:h, :w]}  # each at its image's own size
                for path, m, p, (h, w) in zip(batch["path"], labels, pixels, sizes)]

    def write_predictions(self, records: list[dict[str, Any]], paths: list[str], folder: Path, first: bool) -> None:
        """Per image ``a/img.jpg``: ``a/img.jpg.mask.png``, a palette PNG of the image's size whose pixel values
        are the class ids and whose colours are the dataset's ``palette`` (Cityscapes' for Cityscapes, else
        ``default_palette``); ``a/img.jpg.overlay.png``, that colour mask blended half-and-half over the image,
        above a legend strip: a colour swatch and the name (``class_names``) of each class present."""
        palette = np.asarray(self.dataset_info.palette or default_palette(self.num_classes), np.uint8)
        flat = np.zeros((256, 3), np.uint8)
        flat[: len(palette)] = palette[:256]
        for r, relative in zip(records, paths):
            name = folder / relative
            name.parent.mkdir(parents=True, exist_ok=True)
            mask = Image.fromarray(r["labels"])  # mode L; putpalette makes it P with these colours
            mask.putpalette(flat.flatten().tolist())
            mask.save(f"{name}.mask.png")
            overlay = (0.5 * r["image"] + 0.5 * flat[r["labels"]]).round().astype(np.uint8)
            present = np.unique(r["labels"]).tolist()
            names = self.class_names
            entries = [(names[k] if names and k < len(names) else f"class {k}", tuple(flat[k].tolist()))
                       for k in present]
            legend = legend_strip(entries, overlay.shape[1], text_font(*overlay.shape[:2]))
            Image.fromarray(np.concatenate([overlay, legend])).save(f"{name}.overlay.png")

    # ------------------------------------------------------------------ deployment
    def preprocessing(self) -> dict[str, Any]:
        """Adds ``pad_multiple``: input sides must be multiples of the backbone's stride."""
        return {**super().preprocessing(), "pad_multiple": int(self.pad_multiple)}

    def export_wrapper(self, network: nn.Module, preprocessing: dict[str, Any], in_channels: int,
                       input_size: tuple[int, int] | None = None) -> ExportSpec:
        """``images`` float [B, C, H, W] in [0, 1] -> ``logits`` [B, K, H, W], normalised inside the graph; batch,
        height and width are dynamic, but H and W must be multiples of the backbone's stride
        (``preprocessing["pad_multiple"]``, 32 for FishNet): pad other images (e.g. with the mean colour) and crop
        the logits. ``input_size`` (default two strides square) must be such a multiple."""
        from torch.export import Dim

        m = preprocessing["pad_multiple"]
        h, w = input_size or (2 * m, 2 * m)
        if h % m or w % m:
            raise ValueError(f"segmentation export size must be a multiple of {m} (the backbone's stride), got {h}x{w}")
        # Sides are multiples of the stride: H = m * rows, W = m * cols (derived dims).
        batch = Dim("batch", min=1, max=1024)
        rows, cols = Dim("rows", min=1, max=8192 // m), Dim("cols", min=1, max=8192 // m)
        return ExportSpec(NormalizedNetwork(network, preprocessing["mean"], preprocessing["std"]).eval(),
                          torch.rand(2, in_channels, h, w), ["images"], ["logits"],
                          dynamic_shapes={"images": {0: batch, 2: m * rows, 3: m * cols}})


def default_palette(num_classes: int) -> list[tuple[int, int, int]]:
    """Distinct colours for datamodules without a palette of their own (the PASCAL VOC bit pattern)."""
    colours = []
    for k in range(num_classes):
        r = g = b = 0
        for bit in range(8):
            r |= ((k >> 0) & 1) << (7 - bit)
            g |= ((k >> 1) & 1) << (7 - bit)
            b |= ((k >> 2) & 1) << (7 - bit)
            k >>= 3
        colours.append((r, g, b))
    return colours
