"""Callbacks the module adds to every run: the tasks' result files (predictions, COCO results) and
resumable random streams; and optional ones (images per second)."""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pycocotools.mask as mask_utils
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from torchvision.io import write_png
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from fishnet_pl.metrics import write_coco_results, xywh
from fishnet_pl.tasks import ClassificationHead, DetectionHead, SegmentationHead, TaskHead
from fishnet_pl.tasks.segmentation import default_palette

log = logging.getLogger(__name__)


class PredictionWriter(BasePredictionWriter):
    """Writes the files of each predict batch as it comes (one folder per process under DDP).

    ``output_dir`` defaults to ``<default_root_dir>/predictions``; a run's first batch replaces the files
    of an earlier run. Subclasses write one task's records (``TaskHead.predict_step``); ``for_head``
    picks the writer of a head.
    """

    def __init__(self, output_dir: str | Path | None = None):
        super().__init__(write_interval="batch")
        self.output_dir = output_dir

    @staticmethod
    def for_head(head: TaskHead, output_dir: str | Path | None = None) -> PredictionWriter | None:
        for head_type, writer in ((ClassificationHead, ClassificationPredictionWriter),
                                  (SegmentationHead, SegmentationPredictionWriter),
                                  (DetectionHead, DetectionPredictionWriter)):
            if isinstance(head, head_type):
                return writer(output_dir)
        return None  # another task: trainer.predict still returns its records

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        out = Path(self.output_dir or Path(trainer.default_root_dir) / "predictions")
        if trainer.world_size > 1:
            out = out / f"rank{trainer.global_rank}"
        out.mkdir(parents=True, exist_ok=True)
        self.write(prediction, out, trainer.datamodule, pl_module.head, first=batch_idx == 0)

    def write(self, records: list[dict[str, Any]], out_dir: Path, datamodule: Any, head: TaskHead,
              first: bool) -> None:
        raise NotImplementedError


class ClassificationPredictionWriter(PredictionWriter):
    """One JSON line per image in ``predictions.jsonl``: path, top-5 class indices, names, probabilities."""

    def write(self, records, out_dir, datamodule, head, first):
        names = head.class_names  # the datamodule's, passed on by the module's setup
        with open(out_dir / "predictions.jsonl", "w" if first else "a") as f:
            for r in records:
                if names is not None:
                    r = {**r, "names": [names[c] for c in r["classes"]]}
                f.write(json.dumps(r) + "\n")


class SegmentationPredictionWriter(PredictionWriter):
    """``<name>_mask.png``: a palette PNG whose pixel values are the class ids and whose colours are the
    datamodule's ``palette`` (Cityscapes' for Cityscapes); ``<name>_overlay.png``: that colour mask
    blended half-and-half over the image."""

    def write(self, records, out_dir, datamodule, head, first):
        palette = np.asarray(getattr(datamodule, "palette", None) or default_palette(head.num_classes), np.uint8)
        flat = np.zeros((256, 3), np.uint8)
        flat[: len(palette)] = palette[:256]
        for r in records:
            stem = Path(r["path"]).stem
            mask = Image.fromarray(r["labels"])  # mode L; putpalette makes it P with these colours
            mask.putpalette(flat.flatten().tolist())
            mask.save(out_dir / f"{stem}_mask.png")
            overlay = (0.5 * r["image"] + 0.5 * flat[r["labels"]]).round().astype(np.uint8)
            Image.fromarray(overlay).save(out_dir / f"{stem}_overlay.png")


class DetectionPredictionWriter(PredictionWriter):
    """Per image ``<name>.png`` with masks, boxes, class names and scores (those of at least the head's
    ``draw_score_thresh``) drawn, and one line of ``detections.jsonl`` with every detection: COCO
    category id, class name, score, ``bbox`` [x, y, width, height] and RLE ``segmentation``."""

    #: Distinct colours for drawn classes (label k gets PALETTE[k % len]).
    PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
               (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40))

    def write(self, records, out_dir, datamodule, head, first):
        names = head.class_names  # the datamodule's, passed on by the module's setup
        category_of = getattr(datamodule, "label_to_category_id", None) or {}
        with open(out_dir / "detections.jsonl", "w" if first else "a") as f:
            for r in records:
                labels = r["labels"].tolist()
                shown = [names[k - 1] if names and 0 < k <= len(names) else str(k) for k in labels]
                keep = (r["scores"] >= head.draw_score_thresh).nonzero().flatten().tolist()
                image = r["image"]
                colours = [self.PALETTE[labels[i] % len(self.PALETTE)] for i in keep]
                if keep and "masks" in r:
                    masks = torch.from_numpy(mask_utils.decode([r["masks"][i] for i in keep])).permute(2, 0, 1)
                    image = draw_segmentation_masks(image, masks.bool(), alpha=0.45, colors=colours)
                if keep:
                    image = draw_bounding_boxes(image, r["boxes"][keep], colors=colours, width=2,
                                                labels=[f"{shown[i]} {r['scores'][i]:.2f}" for i in keep])
                file = f"{Path(r['path']).stem}.png"
                write_png(image, str(out_dir / file))
                detections = [{"label": k, "category_id": category_of.get(k, k), "name": shown[i],
                               "score": round(float(r["scores"][i]), 5),
                               "bbox": [round(v, 2) for v in xywh(r["boxes"][i:i + 1])[0].tolist()]}
                              for i, k in enumerate(labels)]
                for detection, rle in zip(detections, r.get("masks", ())):
                    detection["segmentation"] = rle
                line = {"path": r["path"], "drawn": file, "detections": detections}
                if "image_id" in r:
                    line["image_id"] = r["image_id"]
                f.write(json.dumps(line) + "\n")


class CocoResultsWriter(L.Callback):
    """After each validation and test epoch of a detection run, writes the detections of every evaluated
    image as a COCO results file ``{stage}_detections.json`` in the run's log folder (category ids
    mapped back with the datamodule's ``label_to_category_id``), ready for ``COCO.loadRes`` or the
    evaluation server. Not during the sanity check."""

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "test")

    def _write(self, trainer, pl_module, stage: str) -> None:
        metric = pl_module.head.metrics[stage]
        if trainer.sanity_checking or not metric.update_called:
            return
        metric.compute()  # synchronised and cached: the module logs the same result after this hook
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: every rank asks
        if trainer.is_global_zero:
            path = log_dir / f"{stage}_detections.json"
            write_coco_results(metric.images, path, getattr(trainer.datamodule, "label_to_category_id", None))
            log.info("%s detections of %d images written to %s", stage, len(metric.images), path)


def task_callbacks(head: TaskHead) -> list[L.Callback]:
    """The result-file callbacks of a head's task: its prediction writer and, for detection, COCO results."""
    writer = PredictionWriter.for_head(head)
    return ([writer] if writer is not None else []) + ([CocoResultsWriter()] if isinstance(head, DetectionHead) else [])


class RNGStateCheckpoint(L.Callback):
    """Saves the torch, numpy and Python random states in every checkpoint and restores them on resume.

    Shuffling, the data workers' augmentation seeds and MixUp/CutMix all draw from these states,
    so a run resumed from a checkpoint continues with exactly the random streams it had.
    """

    def state_dict(self) -> dict[str, Any]:
        # Tensors and plain values only, so checkpoints still load with torch.load(weights_only=True).
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {"torch": torch.get_rng_state(), "python": random.getstate(),
                 "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        random.setstate(state_dict["python"])
        name, keys, pos, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class ImagesPerSecond(L.Callback):
    """Logs training images per second over all processes (``train/img_per_s``, shown in the progress bar).

    Measured from the end of one training batch to the end of the next, so data loading counts.
    """

    def __init__(self):
        self._last: float | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._last = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last is not None:
            images = len(batch.get("image", batch.get("images", ()))) * trainer.world_size
            pl_module.log("train/img_per_s", images / (now - self._last), prog_bar=True, on_step=True,
                          on_epoch=False, rank_zero_only=True)
        self._last = now


class LastCheckpoint(L.Callback):
    """Writes ``last.ckpt`` (beside the best checkpoints) after every epoch and, if asked, every N steps.

    ``--ckpt_path last`` resumes from it, so a killed run loses at most the steps since. A plain
    callback rather than a ``ModelCheckpoint``: Lightning 2.6 writes ``ModelCheckpoint``'s
    ``last.ckpt`` only when a best checkpoint is saved at the same step.
    """

    def __init__(self, every_n_train_steps: int = 0):
        self.every_n_train_steps = every_n_train_steps

    def _save(self, trainer) -> None:
        best = trainer.checkpoint_callback
        folder = Path(best.dirpath) if best is not None and best.dirpath else Path(trainer.default_root_dir)
        trainer.save_checkpoint(folder / "last.ckpt", weights_only=False)  # full state: resumable

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_train_steps and trainer.global_step % self.every_n_train_steps == 0:
            self._save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._save(trainer)
