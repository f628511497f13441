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
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
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
    picks the writer of a head. Files a batch lists as ``unreadable`` (``datamodules.predict`` skips
    them) go to ``unreadable.txt``, one path per line, and are counted at the end.
    """

    def __init__(self, output_dir: str | Path | None = None):
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.unreadable: list[str] = []

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
        if batch_idx == 0:
            self.unreadable = []
            (out / "unreadable.txt").unlink(missing_ok=True)
        skipped = batch.get("unreadable") if isinstance(batch, dict) else None
        if skipped:
            self.unreadable += skipped
            with open(out / "unreadable.txt", "a") as f:
                f.writelines(f"{path}\n" for path in skipped)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        super().on_predict_epoch_end(trainer, pl_module)
        if self.unreadable:
            log.warning("skipped %d unreadable images (listed in unreadable.txt), e.g. %s", len(self.unreadable),
                        self.unreadable[0])

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

    It also puts the training iterator of a resumed run where the interrupted run had it. Lightning
    saves the train loader's ``state_dict`` (torchdata's ``StatefulDataLoader``: position, seeds,
    workers' augmentation streams) with the loops, but 2.6 builds the iterator before it restores
    the checkpoint when ``configure_optimizers`` asks for ``trainer.estimated_stepping_batches``, as
    ``FishNetModule`` does, and then never loads that state (Lightning issue #20550). ``on_train_start``
    loads it, sets the sampler's epoch (a ``DistributedSampler`` draws its order when the iterator is
    built) and rebuilds the iterator, from the random state the interrupted run had at that point.

    Under DDP, Lightning's checkpoint holds rank 0's states only, but each process has its own (its workers
    augment other images, its GPU has its own generator): every process's random and loader states are
    gathered into the checkpoint, and each process of a resumed run with as many processes takes its own.
    """

    def __init__(self):
        self._restored: dict[str, Any] | None = None
        self._loader_states: list | None = None  # this process's, under DDP
        self._trainer = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer  # state_dict and load_state_dict are called without it

    def state_dict(self) -> dict[str, Any]:
        state = _rng_states()
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1 and torch.distributed.is_initialized():
            # Called by every process while a checkpoint is written (trainer.save_checkpoint is collective).
            loader = trainer.fit_loop._combined_loader
            mine = {"random": state, "train_loaders": loader._state_dicts() if loader is not None else []}
            state["processes"] = [None] * trainer.world_size
            torch.distributed.all_gather_object(state["processes"], mine)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        processes, trainer = state_dict.get("processes"), self._trainer
        if processes is not None and trainer is not None and len(processes) == trainer.world_size:
            self._loader_states = processes[trainer.global_rank]["train_loaders"]
            state_dict = processes[trainer.global_rank]["random"]
        self._restored = state_dict  # again in on_train_start, after the train iterator is rebuilt
        _set_rng_states(state_dict)

    def on_train_start(self, trainer, pl_module) -> None:
        state, self._restored = self._restored, None
        loop = trainer.fit_loop
        if self._loader_states is not None and loop._combined_loader_states_to_load:
            loop._combined_loader_states_to_load = self._loader_states  # this process's, not rank 0's
        self._loader_states = None
        loaders = loop._combined_loader.flattened if loop._combined_loader is not None else []
        if state is None or loop._data_fetcher is None or not loaders:
            return
        epoch = loop.epoch_progress.current.processed
        pending = loop.restarting and bool(loop._combined_loader_states_to_load)
        samplers = [s for dl in loaders for s in (getattr(dl, "sampler", None),
                                                 getattr(getattr(dl, "batch_sampler", None), "sampler", None))]
        stale_epoch = any(getattr(sampler, "epoch", epoch) != epoch for sampler in samplers)
        if pending or stale_epoch:
            for dl in loaders:
                _set_sampler_epoch(dl, epoch)
            _set_rng_states(state)  # as when the interrupted run built its iterator (at an epoch's start)
            loop._load_combined_loader_states()
            iter(loop._data_fetcher)  # a new iterator, from the saved state if any
        if loop.restarted_mid_epoch:
            # The restored iterator took its seeds from the checkpoint: continue from the saved random state,
            # not from where building the iterators (here and in configure_optimizers) left it.
            _set_rng_states(state)


def _rng_states() -> dict[str, Any]:
    # Tensors and plain values only, so checkpoints still load with torch.load(weights_only=True).
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_states(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    """Writes ``last.ckpt`` (beside the best checkpoints) after every epoch, if asked every N steps, and
    when the run is stopped by SIGTERM.

    ``--ckpt_path last`` resumes from it, so a killed run loses at most the steps since. A plain
    callback rather than a ``ModelCheckpoint``: Lightning 2.6 writes ``ModelCheckpoint``'s
    ``last.ckpt`` only when a best checkpoint is saved at the same step.

    SIGTERM (a scheduler's notice before it kills a job, SLURM's at the time limit or on preemption):
    Lightning's signal handler notes it, the loop finishes the current batch (under DDP every process
    stops at the same batch) and raises ``SIGTERMException``; this callback then saves ``last.ckpt``,
    and the process exits with status 0.
    """

    def __init__(self, every_n_train_steps: int = 0):
        self.every_n_train_steps = every_n_train_steps
        self.last_saved: tuple[Path, int] | None = None  # (file, global step) of this run's latest save

    def _save(self, trainer) -> Path:
        best = trainer.checkpoint_callback
        folder = Path(best.dirpath) if best is not None and best.dirpath else Path(trainer.default_root_dir)
        trainer.save_checkpoint(folder / "last.ckpt", weights_only=False)  # full state: resumable
        self.last_saved = (folder / "last.ckpt", trainer.global_step)
        return folder / "last.ckpt"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_train_steps and trainer.global_step % self.every_n_train_steps == 0:
            self._save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._save(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Also in the middle of a validation, which a resumed run finishes first (its metrics then count
        # only the batches after the resume).
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit" and not trainer.sanity_checking:
            path = self._save(trainer)
            rank_zero_info(f"SIGTERM: saved {path} at step {trainer.global_step}; resume with --ckpt_path last")


class StopOnNonFiniteLoss(L.Callback):
    """Stops training at the first NaN or infinite loss, before its backward pass and optimizer step, with an
    error that names the step and the last checkpoint written (the weights to go back to; nothing is saved after).

    Every process takes the decision together (one all-reduce of a flag per step), so a DDP run stops as one.
    """

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        finite = bool(torch.isfinite(loss.detach()).all())
        if trainer.strategy.reduce_boolean_decision(finite, all=True):
            return
        where = (f"global step {trainer.global_step} (epoch {trainer.current_epoch}, "
                 f"batch {trainer.fit_loop.epoch_loop.batch_idx})")
        value = f"is {loss.detach().float().mean().item()}" if not finite else "is not finite on another process"
        raise FloatingPointError(f"the training loss at {where} {value}; stopped before its optimizer step. "
                                 f"Last good checkpoint: {_last_checkpoint(trainer)}. Resume from it with "
                                 "a lower learning rate, gradient clipping (--trainer.gradient_clip_val) or "
                                 "fp32 / bf16 instead of fp16, or look for a broken input in this batch.")


def _last_checkpoint(trainer) -> str:
    """The latest checkpoint this run wrote (or resumed from), for messages."""
    saved = [cb.last_saved for cb in trainer.callbacks if isinstance(cb, LastCheckpoint) and cb.last_saved]
    if saved:
        path, step = max(saved, key=lambda s: s[1])
        return f"{path} (step {step})"
    if trainer.ckpt_path:
        return f"{trainer.ckpt_path} (resumed from)"
    return "none written yet in this run"
