"""Semantic segmentation: any segmentation-models-pytorch decoder on the FishNet backbone.

The decoder is smp's own model built around the module's backbone (``bound_encoder_name``), so
smp's decoders, heads and initialisation are used as they are and the backbone's weights live
once, under ``backbone.``. Images of any size are padded to a multiple of 32 for the network and
the prediction cropped back, in training, validation, test and predict alike.
"""

from __future__ import annotations

import inspect
import logging
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from PIL import Image
from segmentation_models_pytorch.base import SegmentationModel
from torchmetrics.classification import MulticlassJaccardIndex

from datamodules.common import IMAGENET_MEAN, IMAGENET_STD
from fishnet_pl.models import FishNet
from fishnet_pl.models.smp_encoder import bound_encoder_name
from fishnet_pl.tasks.base import TaskHead

log = logging.getLogger(__name__)

# Inputs are padded to a multiple of this: FishNet's tail always halves the input five times.
PAD_MULTIPLE = 32


def smp_architectures() -> dict[str, type[SegmentationModel]]:
    """smp's architectures by lower-case name (the names ``smp.create_model`` accepts)."""
    return {cls.__name__.lower(): cls for cls in vars(smp).values()
            if isinstance(cls, type) and issubclass(cls, SegmentationModel) and cls is not SegmentationModel}


class SegmentationHead(TaskHead):
    """An smp decoder (FPN, Unet, DeepLabV3+, UPerNet, ...) on FishNet, trained with cross-entropy.

    Batches: ``image`` normalised float [B, 3, H, W] (any size), ``mask`` int64 [B, H, W] class ids
    with ``ignore_index`` for unlabelled pixels. Validation and test log ``{stage}/miou`` (mean IoU
    over the classes present in the ground truth or the predictions) and ``{stage}/iou_<class>``
    for each such class, from torchmetrics' Jaccard index over all processes.
    Predict writes ``<name>_mask.png`` (the datamodule's palette, e.g. Cityscapes') and
    ``<name>_overlay.png`` (the mask blended over the image) for every input.

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
            raise ValueError("smp's DPT takes only timm transformer encoders, not a convolutional FishNet")
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

    def backbone_kwargs(self, num_classes: int) -> dict[str, Any]:
        stride = self.output_stride
        if stride is None:  # smp's default for this decoder
            param = inspect.signature(self._arch).parameters.get("encoder_output_stride")
            stride = param.default if param is not None else 32
        return {"features_only": True, "output_stride": stride}

    def build(self, backbone: FishNet, num_classes: int) -> None:
        self.num_classes = num_classes
        kwargs = dict(encoder_weights=None, encoder_depth=self.encoder_depth, in_channels=backbone.in_channels,
                      classes=num_classes, **self.decoder_kwargs)
        if self._accepts_stride:
            kwargs["encoder_output_stride"] = backbone.output_stride
        with bound_encoder_name(backbone) as name:
            self.model = self._arch(encoder_name=name, **kwargs)
        self.dice = smp.losses.DiceLoss("multiclass", ignore_index=self.ignore_index) if self.dice_weight else None
        self.lovasz = (smp.losses.LovaszLoss("multiclass", ignore_index=self.ignore_index)
                       if self.lovasz_weight else None)
        # zero_division=nan: a class in neither ground truth nor prediction has no IoU (left out of the mean).
        iou = MulticlassJaccardIndex(num_classes, average="none", ignore_index=self.ignore_index,
                                     zero_division=float("nan"))
        self.iou = torch.nn.ModuleDict({"val": iou, "test": iou.clone()})

    # ------------------------------------------------------------------ inference
    def forward(self, backbone: FishNet, images: torch.Tensor) -> torch.Tensor:
        """Class logits [B, K, H, W] at the input's size (whole image, no test-time augmentation)."""
        return self._logits(images)

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        ph, pw = math.ceil(h / PAD_MULTIPLE) * PAD_MULTIPLE, math.ceil(w / PAD_MULTIPLE) * PAD_MULTIPLE
        if (ph, pw) != (h, w):
            images = F.pad(images, (0, pw - w, 0, ph - h))  # zeros: the mean colour after normalisation
        return self.model(images)[..., :h, :w]

    def _slide_logits(self, images: torch.Tensor) -> torch.Tensor:
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
                total[..., top:top + wh, left:left + ww] += self._logits(images[..., top:top + wh, left:left + ww])
                count[..., top:top + wh, left:left + ww] += 1
        return total / count

    def predict_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities [B, K, H, W] with the configured evaluation: whole or sliding window,
        averaged over ``eval_scales`` and, with ``eval_flip``, the mirrored image."""
        h, w = images.shape[-2:]
        infer = self._slide_logits if self.eval_mode == "slide" else self._logits
        probs = 0
        for scale in self.eval_scales:
            scaled = images if scale == 1 else F.interpolate(images, scale_factor=scale, mode="bilinear",
                                                             align_corners=False)
            for flip in (False, True) if self.eval_flip else (False,):
                logits = infer(scaled.flip(-1) if flip else scaled)
                logits = logits.flip(-1) if flip else logits
                if logits.shape[-2:] != (h, w):
                    logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
                probs = probs + logits.softmax(dim=1)
        return probs / (len(self.eval_scales) * (2 if self.eval_flip else 1))

    # ------------------------------------------------------------------ steps
    def training_step(self, backbone: FishNet, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, mask = self._logits(batch["image"]), batch["mask"]
        logs = {"ce": F.cross_entropy(logits, mask, ignore_index=self.ignore_index)}
        if self.dice is not None:
            logs["dice"] = self.dice(logits, mask)
        if self.lovasz is not None:
            logs["lovasz"] = self.lovasz(logits, mask)
        loss = logs["ce"] + self.dice_weight * logs.get("dice", 0) + self.lovasz_weight * logs.get("lovasz", 0)
        return loss, {"loss": loss, **logs}

    def evaluation_step(self, backbone: FishNet, batch: dict, stage: str) -> dict[str, Any]:
        self.iou[stage].update(self.predict_probabilities(batch["image"]).argmax(dim=1), batch["mask"])
        return {}

    def evaluation_epoch_end(self, stage: str, trainer: Any) -> dict[str, torch.Tensor]:
        metric = self.iou[stage]
        if not metric.update_called:
            return {}
        iou = metric.compute()  # synchronised over processes
        metric.reset()
        names = getattr(trainer.datamodule, "class_names", None) or [str(k) for k in range(self.num_classes)]
        present = ~iou.isnan()
        logs = {f"{stage}/miou": iou[present].mean() if present.any() else iou.new_tensor(0.0)}
        logs.update({f"{stage}/iou_{names[k]}": iou[k] for k in present.nonzero().flatten().tolist()})
        log.info("%s IoU per class: %s", stage, ", ".join(f"{names[k]} {iou[k]:.3f}" for k in range(len(iou))
                                                         if present[k]))
        return logs

    # ------------------------------------------------------------------ predict
    def predict_step(self, backbone: FishNet, batch: dict) -> list[dict[str, Any]]:
        labels = self.predict_probabilities(batch["image"]).argmax(dim=1).to(torch.uint8).cpu().numpy()
        mean, std = (batch["image"].new_tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
        pixels = ((batch["image"] * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
        pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()
        return [{"path": path, "labels": m, "image": p} for path, m, p in zip(batch["path"], labels, pixels)]

    def write_predictions(self, records: list[dict[str, Any]], out_dir: Path, datamodule: Any, first: bool) -> None:
        """``<name>_mask.png``: a palette PNG whose pixel values are the class ids and whose colours are
        the datamodule's ``palette`` (Cityscapes' for Cityscapes); ``<name>_overlay.png``: that colour
        mask blended half-and-half over the image."""
        palette = np.asarray(getattr(datamodule, "palette", None) or default_palette(self.num_classes), np.uint8)
        flat = np.zeros((256, 3), np.uint8)
        flat[: len(palette)] = palette[:256]
        for r in records:
            stem = Path(r["path"]).stem
            mask = Image.fromarray(r["labels"])  # mode L; putpalette makes it P with these colours
            mask.putpalette(flat.flatten().tolist())
            mask.save(out_dir / f"{stem}_mask.png")
            overlay = (0.5 * r["image"] + 0.5 * flat[r["labels"]]).round().astype(np.uint8)
            Image.fromarray(overlay).save(out_dir / f"{stem}_overlay.png")


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
