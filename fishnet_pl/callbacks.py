"""Callbacks the module adds to every run: the tasks' result files (predictions, COCO results) and
resumable random streams; and optional ones (images per second)."""

from __future__ import annotations

import itertools
import json
import logging
import os
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
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import draw_segmentation_masks

from fishnet_pl.metrics import write_coco_results, xywh
from fishnet_pl.tasks import ClassificationHead, DetectionHead, SegmentationHead, TaskHead
from fishnet_pl.tasks.segmentation import default_palette

log = logging.getLogger(__name__)


class PredictionWriter(BasePredictionWriter):
    """Writes the files of each predict batch as it comes (one folder ``rank<N>`` per process under DDP).

    Outputs mirror the inputs: the image ``<root>/a/img.jpg`` gives ``a/img.jpg.<kind>.png`` (or ``a/img.jpg.png``)
    under the output folder, ``<root>`` being the datamodule's ``predict_root``, else its dataset ``root``
    (``prediction_path``). The full file name stays, so same-named images in two folders, or ``x.jpg`` beside
    ``x.png``, never share an output; the JSON lines carry that relative ``path`` and the ``file`` as read.

    A run never replaces another's files: ``output_dir``, when given, must be new or empty unless ``overwrite``;
    without it each run takes the first free (missing or empty) of ``<default_root_dir>/predictions``,
    ``predictions_1``, ``predictions_2``, ... Subclasses write one task's records (``TaskHead.predict_step``);
    ``for_head`` picks the writer of a head. Files a batch lists as ``unreadable`` (``datamodules.predict`` skips
    them) go to ``unreadable.txt``, one path per line. The run ends with one line: the folder, the images
    predicted and those skipped.
    """

    def __init__(self, output_dir: str | Path | None = None, overwrite: bool = False):
        super().__init__(write_interval="batch")
        self.output_dir, self.overwrite = output_dir, overwrite
        self.folder: Path | None = None  # this run's (setup)
        self.predicted = 0
        self.unreadable: list[str] = []

    @staticmethod
    def for_head(head: TaskHead, output_dir: str | Path | None = None,
                 overwrite: bool = False) -> PredictionWriter | None:
        for head_type, writer in ((ClassificationHead, ClassificationPredictionWriter),
                                  (SegmentationHead, SegmentationPredictionWriter),
                                  (DetectionHead, DetectionPredictionWriter)):
            if isinstance(head, head_type):
                return writer(output_dir, overwrite)
        return None  # another task: trainer.predict still returns its records

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "predict":
            return
        # Every process takes rank 0's folder (and its error): none writes before setup ends (Lightning's barrier).
        folder, error = trainer.strategy.broadcast(self._free_folder(trainer), src=0)
        if error:
            raise FileExistsError(error)
        self.folder, self.predicted, self.unreadable = Path(folder), 0, []

    def _free_folder(self, trainer) -> tuple[str, str | None]:
        if self.output_dir is not None:
            folder = Path(self.output_dir)
            if not self.overwrite and folder.is_dir() and any(folder.iterdir()):
                return str(folder), (f"{folder}: holds files of an earlier run; to write into it anyway pass "
                                     "--overwrite true, or give another --predict_dir")
            return str(folder), None
        base = Path(trainer.default_root_dir) / "predictions"
        for n in itertools.count():
            folder = base.with_name(f"{base.name}_{n}") if n else base
            if not folder.is_dir() or not any(folder.iterdir()):
                return str(folder), None

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        out = self.folder / f"rank{trainer.global_rank}" if trainer.world_size > 1 else self.folder
        out.mkdir(parents=True, exist_ok=True)
        self.write(prediction, out, trainer.datamodule, pl_module.head, first=batch_idx == 0)
        self.predicted += len(prediction)
        if batch_idx == 0:
            (out / "unreadable.txt").unlink(missing_ok=True)
        skipped = batch.get("unreadable") if isinstance(batch, dict) else None
        if skipped:
            self.unreadable += skipped
            with open(out / "unreadable.txt", "a") as f:
                f.writelines(f"{path}\n" for path in skipped)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        super().on_predict_epoch_end(trainer, pl_module)
        counts = torch.tensor([self.predicted, len(self.unreadable)], device=pl_module.device)
        predicted, skipped = trainer.strategy.reduce(counts, reduce_op="sum").tolist()
        listed = f" (listed in unreadable.txt, e.g. {self.unreadable[0]})" if self.unreadable else ""
        rank_zero_info(f"predict: {int(predicted)} images predicted, {int(skipped)} skipped as unreadable{listed}; "
                       f"files written to {self.folder}")

    def write(self, records: list[dict[str, Any]], out_dir: Path, datamodule: Any, head: TaskHead,
              first: bool) -> None:
        raise NotImplementedError


def prediction_path(path: str | os.PathLike, datamodule: Any) -> str:
    """Where the outputs of the image ``path`` go inside the output folder (``a/img.jpg``, POSIX): ``path``
    relative to the datamodule's ``predict_root``, else to its ``root``; a path under neither keeps its own
    relative form (streamed samples), or loses only its anchor when absolute or climbing out with ``..``."""
    full = Path(os.path.abspath(path))
    for root in (getattr(datamodule, "predict_root", None), getattr(datamodule, "root", None)):
        if root is not None and "://" not in str(root) and full.is_relative_to(os.path.abspath(root)):
            return full.relative_to(os.path.abspath(root)).as_posix()
    given = Path(path)
    if given.is_absolute() or ".." in given.parts:
        return full.relative_to(full.anchor).as_posix()
    return given.as_posix()


def text_font(height: int, width: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in font (no font file needed) at a size that reads on an image of this size:
    1/40 of its short side, at least 10 pixels."""
    return ImageFont.load_default(size=max(10, min(height, width) // 40))


def text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light colours, white on dark ones."""
    return (0, 0, 0) if 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2] > 128 else (255,) * 3


class ClassificationPredictionWriter(PredictionWriter):
    """One JSON line per image in ``predictions.jsonl``: ``path`` (relative, see ``PredictionWriter``), ``file``
    (as read), top-5 class indices, names, probabilities."""

    def write(self, records, out_dir, datamodule, head, first):
        names = head.class_names  # the datamodule's, passed on by the module's setup
        with open(out_dir / "predictions.jsonl", "w" if first else "a") as f:
            for r in records:
                r = {"path": prediction_path(r["path"], datamodule), "file": r["path"],
                     **{k: v for k, v in r.items() if k != "path"}}
                if names is not None:
                    r["names"] = [names[c] for c in r["classes"]]
                f.write(json.dumps(r) + "\n")


class SegmentationPredictionWriter(PredictionWriter):
    """Per image ``a/img.jpg`` (relative, see ``PredictionWriter``): ``a/img.jpg.mask.png``, a palette PNG of the
    image's size whose pixel values are the class ids and whose colours are the datamodule's ``palette``
    (Cityscapes' for Cityscapes); ``a/img.jpg.overlay.png``, that colour mask blended half-and-half over the
    image, above a legend strip: a colour swatch and the name (``head.class_names``) of each class present."""

    def write(self, records, out_dir, datamodule, head, first):
        palette = np.asarray(getattr(datamodule, "palette", None) or default_palette(head.num_classes), np.uint8)
        flat = np.zeros((256, 3), np.uint8)
        flat[: len(palette)] = palette[:256]
        for r in records:
            name = out_dir / prediction_path(r["path"], datamodule)
            name.parent.mkdir(parents=True, exist_ok=True)
            mask = Image.fromarray(r["labels"])  # mode L; putpalette makes it P with these colours
            mask.putpalette(flat.flatten().tolist())
            mask.save(f"{name}.mask.png")
            overlay = (0.5 * r["image"] + 0.5 * flat[r["labels"]]).round().astype(np.uint8)
            present = np.unique(r["labels"]).tolist()
            names = head.class_names
            entries = [(names[k] if names and k < len(names) else f"class {k}", tuple(flat[k].tolist()))
                       for k in present]
            legend = legend_strip(entries, overlay.shape[1], text_font(*overlay.shape[:2]))
            Image.fromarray(np.concatenate([overlay, legend])).save(f"{name}.overlay.png")


def legend_strip(entries: list[tuple[str, tuple[int, int, int]]], width: int, font) -> np.ndarray:
    """An ``N x width x 3`` uint8 strip on dark grey: for each (name, colour), a swatch and the name, in as many
    rows as the width needs."""
    line = sum(font.getmetrics())  # ascent + descent: every name on one baseline
    pad, draw = max(2, line // 3), ImageDraw.Draw(Image.new("RGB", (1, 1)))
    places, x, y = [], pad, pad
    for name, _ in entries:
        size = line + pad + draw.textlength(name, font=font)
        if x > pad and x + size > width - pad:  # wrap: the next row
            x, y = pad, y + line + pad
        places.append((x, y))
        x += size + 2 * pad
    strip = Image.new("RGB", (width, y + line + pad), (40, 40, 40))
    draw = ImageDraw.Draw(strip)
    for (name, colour), (x, y) in zip(entries, places):
        draw.rectangle((x, y, x + line - 1, y + line - 1), fill=colour)
        draw.text((x + line + pad, y), name, fill=(255, 255, 255), font=font, anchor="la")
    return np.asarray(strip)


class DetectionPredictionWriter(PredictionWriter):
    """Per image ``a/img.jpg`` (relative, see ``PredictionWriter``): ``a/img.jpg.png``, the image with its
    detections (those scoring at least the head's ``predict_score_thresh``) drawn: masks, boxes, class names
    and scores, lines and text scaled to the image; and one line of ``detections.jsonl``: ``path``, ``file``
    (as read), ``drawn`` and the same detections with COCO category id, class name, score, ``bbox``
    [x, y, width, height] and RLE ``segmentation``."""

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
                colours = [self.PALETTE[k % len(self.PALETTE)] for k in labels]
                image = r["image"]
                if labels and "masks" in r:
                    masks = torch.from_numpy(mask_utils.decode(r["masks"])).permute(2, 0, 1)
                    image = draw_segmentation_masks(image, masks.bool(), alpha=0.45, colors=colours)
                drawn = draw_boxes(image, r["boxes"], [f"{s} {p:.2f}" for s, p in zip(shown, r["scores"])], colours)
                relative = prediction_path(r["path"], datamodule)
                (out_dir / relative).parent.mkdir(parents=True, exist_ok=True)
                drawn.save(out_dir / f"{relative}.png")
                detections = [{"label": k, "category_id": category_of.get(k, k), "name": shown[i],
                               "score": round(float(r["scores"][i]), 5),
                               "bbox": [round(v, 2) for v in xywh(r["boxes"][i:i + 1])[0].tolist()]}
                              for i, k in enumerate(labels)]
                for detection, rle in zip(detections, r.get("masks", ())):
                    detection["segmentation"] = rle
                line = {"path": relative, "file": r["path"], "drawn": f"{relative}.png", "detections": detections}
                if "image_id" in r:
                    line["image_id"] = r["image_id"]
                f.write(json.dumps(line) + "\n")


def draw_boxes(image: torch.Tensor, boxes: torch.Tensor, labels: list[str],
               colours: list[tuple[int, int, int]]) -> Image.Image:
    """``image`` (uint8 [3, H, W]) with each box (xyxy pixels) outlined and its label on a box-coloured tag above
    it (inside it at the image's top edge); line width and text scale with the image.

    Not torchvision's ``draw_bounding_boxes``: its text scales only with a TrueType font file, which not every
    machine has; Pillow's built-in font does (``text_font``)."""
    height, width = image.shape[-2:]
    drawn = Image.fromarray(image.permute(1, 2, 0).numpy())
    draw, font, line = ImageDraw.Draw(drawn), text_font(height, width), max(2, min(height, width) // 300)
    for (x0, y0, x1, y1), label, colour in zip(boxes.tolist(), labels, colours):
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=line)
        text_h = sum(font.getmetrics())  # ascent + descent
        pad = max(1, text_h // 6)
        tag_w, tag_h = round(draw.textlength(label, font=font)) + 2 * pad, text_h + 2 * pad
        x, y = max(0, min(x0, width - tag_w)), y0 - tag_h if y0 >= tag_h else y0
        draw.rectangle((x, y, x + tag_w - 1, y + tag_h - 1), fill=colour)
        draw.text((x + pad, y + pad), label, fill=text_colour(colour), font=font, anchor="la")
    return drawn


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
        if trainer.is_global_zero:
            link_latest(folder / "last.ckpt", Path(trainer.default_root_dir) / "last.ckpt")
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


def link_latest(target: Path, link: Path) -> None:
    """Point the symbolic link ``link`` at ``target`` (relative, so the run folder can move), replacing the link
    atomically; a file that is not a link is never replaced. Each run writes in its own version folder, so this
    is the stable path to the newest run's checkpoint (``runs/quickstart/classification/last.ckpt``)."""
    if link.resolve() == target.resolve() or (link.exists() and not link.is_symlink()):
        return
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(os.path.relpath(target, link.parent))
        os.replace(tmp, link)
    except OSError as err:  # e.g. a filesystem without symbolic links: the checkpoint itself is saved
        tmp.unlink(missing_ok=True)
        log.warning("could not link %s to %s (%s)", link, target, err)


def _last_checkpoint(trainer) -> str:
    """The latest checkpoint this run wrote (or resumed from), for messages."""
    saved = [cb.last_saved for cb in trainer.callbacks if isinstance(cb, LastCheckpoint) and cb.last_saved]
    if saved:
        path, step = max(saved, key=lambda s: s[1])
        return f"{path} (step {step})"
    if trainer.ckpt_path:
        return f"{trainer.ckpt_path} (resumed from)"
    return "none written yet in this run"
