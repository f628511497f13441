"""Evaluation metrics of the three tasks: torchmetrics ``Metric``s that synchronise themselves over processes
and count every evaluated image once.

Under DDP, Lightning's ``DistributedSampler`` repeats a few images so that every process gets as many
batches; averaging per-process results would count those twice. So these metrics keep one small record per
image, keyed by its dataset index (``index`` in classification and segmentation batches, ``image_id`` in
detection targets): after synchronisation, an image seen more than once counts once, and sorted by key,
the records reduce in the same order on 1 or N processes. Without keys every record counts.

``compute()`` returns a dict of scalar tensors named without the stage (``acc1``, ``miou``, ``bbox_ap``...).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

log = logging.getLogger(__name__)

# COCOeval.stats[0:6], in its order.
COCO_METRICS = ("ap", "ap50", "ap75", "aps", "apm", "apl")


class _PerImageMetric(Metric):
    """Rows of per-image values with their image keys; ``distinct_rows()`` gives each key's first row, by key."""

    full_state_update = False

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.add_state("keys", default=[], dist_reduce_fx="cat")
        self.add_state("rows", default=[], dist_reduce_fx="cat")

    def _append(self, rows: torch.Tensor, keys: torch.Tensor | Sequence[int] | None) -> None:
        if keys is None:
            keys = torch.full((len(rows),), -1)  # unknown: counted, never merged
        keys = torch.as_tensor(keys, device=self.device).long().reshape(-1)
        if len(keys) != len(rows):
            raise ValueError(f"{type(self).__name__}: {len(keys)} image keys for {len(rows)} images")
        self.keys.append(keys)
        self.rows.append(rows)

    def distinct_rows(self) -> torch.Tensor:
        keys, rows = dim_zero_cat(self.keys), dim_zero_cat(self.rows)
        order = torch.argsort(keys, stable=True)
        keys, rows = keys[order], rows[order]
        repeated = torch.zeros_like(keys, dtype=torch.bool)
        repeated[1:] = (keys[1:] == keys[:-1]) & (keys[1:] >= 0)
        return rows[~repeated]


class ClassificationMetrics(_PerImageMetric):
    """Cross-entropy ``loss``, ``acc1`` and ``acc<top_k>`` (``acc5``), averaged over distinct images; top-k only
    when there are more than k classes (with k or fewer it is always 1)."""

    def __init__(self, num_classes: int, top_k: int = 5, **kwargs: Any):
        super().__init__(**kwargs)
        self.num_classes, self.top_k = num_classes, top_k if top_k < num_classes else 1

    def update(self, logits: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor | None = None) -> None:
        loss = F.cross_entropy(logits.float(), labels, reduction="none")
        ranked = logits.topk(self.top_k, dim=1).indices == labels[:, None]
        rows = torch.stack([loss.double(), ranked[:, 0].double(), ranked.any(dim=1).double()], dim=1)
        self._append(rows, keys)

    def compute(self) -> dict[str, torch.Tensor]:
        loss, acc1, acck = self.distinct_rows().mean(dim=0).float()
        return {"loss": loss, "acc1": acc1, **({f"acc{self.top_k}": acck} if self.top_k > 1 else {})}


class SegmentationIoU(_PerImageMetric):
    """Intersection over union per class from every distinct image's pixel counts: ``miou`` (mean over the
    classes present in the ground truth or the predictions) and ``iou_<class name>`` for each such class.

    ``class_names`` (default "0", "1", ...) may be set after construction, e.g. from the datamodule.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: Sequence[str] | None = None,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.class_names = list(class_names) if class_names is not None else None

    def update(self, preds: torch.Tensor, target: torch.Tensor, keys: torch.Tensor | None = None) -> None:
        """``preds`` and ``target``: class ids [B, H, W]."""
        k, batch = self.num_classes, len(target)
        valid = target != self.ignore_index
        if (target[valid] >= k).any() or (target[valid] < 0).any():
            raise ValueError(f"segmentation target holds class ids outside 0..{k - 1} (and ignore_index "
                             f"{self.ignore_index}): {sorted(set(target[valid].unique().tolist()) - set(range(k)))}")
        image = torch.arange(batch, device=target.device)[:, None, None].expand_as(target)
        cells = (image * k + target) * k + preds  # (image, true class, predicted class)
        confusion = torch.bincount(cells[valid], minlength=batch * k * k).reshape(batch, k, k)
        intersection = confusion.diagonal(dim1=1, dim2=2)
        rows = torch.cat([intersection, confusion.sum(dim=1), confusion.sum(dim=2)], dim=1)  # [B, 3K]
        self._append(rows, keys)

    def compute(self) -> dict[str, torch.Tensor]:
        intersection, predicted, labelled = self.distinct_rows().sum(dim=0).double().chunk(3)
        union = predicted + labelled - intersection
        iou = torch.where(union > 0, intersection / union.clamp(min=1), torch.nan)
        present = ~iou.isnan()
        names = self.class_names or [str(c) for c in range(self.num_classes)]
        logs = {"miou": iou[present].mean().float() if present.any() else iou.new_tensor(0.0).float()}
        logs.update({f"iou_{names[c]}": iou[c].float() for c in present.nonzero().flatten().tolist()})
        return logs


class CocoEvaluation(Metric):
    """pycocotools' COCOeval (AP, AP50, AP75, APs/m/l: ``bbox_ap``, ... and ``segm_*`` with masks) over every
    distinct image (by ``image_id``).

    Keeps one compact record per image (boxes as arrays, masks as RLE), so COCO's 5,000 val images fit in
    memory; after ``compute()``, ``images`` holds the distinct records of every process, sorted by
    ``image_id``, for ``write_coco_results``. ``num_classes`` is K; labels 1..K serve as category ids.
    """

    full_state_update = False

    def __init__(self, num_classes: int, with_masks: bool, mask_threshold: float = 0.5, **kwargs: Any):
        super().__init__(**kwargs)
        self.num_classes, self.with_masks, self.mask_threshold = num_classes, with_masks, mask_threshold
        self.add_state("records", default=[], dist_reduce_fx=None)
        self.images: list[dict[str, Any]] = []

    def update(self, image_sizes: Sequence[Sequence[int]], targets: Sequence[dict], outputs: Sequence[dict]) -> None:
        """One image per (size (H, W), torchvision target, torchvision detector output)."""
        for size, target, output in zip(image_sizes, targets, outputs):
            self.records.append(self._record(size, target, output))

    def _record(self, size: Sequence[int], target: dict, output: dict) -> dict[str, Any]:
        boxes = target["boxes"].detach().float().cpu().reshape(-1, 4)
        record = {
            "image_id": int(target["image_id"]), "results_id": target.get("results_id", int(target["image_id"])),
            "height": int(size[0]), "width": int(size[1]),
            "gt_boxes": xywh(boxes), "gt_labels": target["labels"].cpu().numpy().astype(np.int64),
            "gt_iscrowd": (target["iscrowd"].cpu().numpy() if "iscrowd" in target
                           else np.zeros(len(boxes), np.int64)),
            "gt_area": (target["area"].cpu().numpy() if "area" in target
                        else ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).numpy()),
            "boxes": xywh(output["boxes"].detach().float().cpu()), "scores": output["scores"].cpu().numpy(),
            "labels": output["labels"].cpu().numpy().astype(np.int64),
        }
        if self.with_masks:
            record["gt_rles"] = encode_masks(target["masks"] > 0) if "masks" in target else None
            record["rles"] = encode_masks(output["masks"][:, 0] > self.mask_threshold)
        return record

    def _apply(self, fn, exclude_state: Sequence[str] = ("records",)):
        return super()._apply(fn, exclude_state)  # records hold numpy arrays and RLEs, no tensors

    def _sync_dist(self, dist_sync_fn=None, process_group=None) -> None:
        # Python objects, as torchmetrics' own MeanAveragePrecision gathers its RLE masks.
        group = process_group or self.process_group
        gathered: list[Any] = [None] * torch.distributed.get_world_size(group)
        torch.distributed.all_gather_object(gathered, self.records, group=group)
        self.records = [r for part in gathered for r in part]

    def distinct_records(self) -> list[dict[str, Any]]:
        """Each image's first record, sorted by ``image_id``."""
        return sorted({r["image_id"]: r for r in reversed(self.records)}.values(), key=lambda r: r["image_id"])

    def compute(self) -> dict[str, torch.Tensor]:
        self.images = self.distinct_records()
        with_masks = self.with_masks and all(r.get("gt_rles") is not None for r in self.images)
        logs = {}
        for iou_type in ("bbox", "segm") if with_masks else ("bbox",):
            stats = coco_evaluate(self.images, iou_type, self.num_classes)
            logs.update({f"{iou_type}_{name}": torch.tensor(value) for name, value in zip(COCO_METRICS, stats)})
        return logs

    def reset(self) -> None:
        super().reset()
        self.images = []


# ---------------------------------------------------------------------- COCO helpers
def xywh(boxes: torch.Tensor) -> np.ndarray:
    """xyxy boxes [N, 4] -> COCO's [x, y, width, height] (float64)."""
    boxes = boxes.reshape(-1, 4).numpy().astype(np.float64)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def encode_masks(masks: torch.Tensor) -> list[dict]:
    """Binary masks [N, H, W] -> N compressed RLEs (``counts`` bytes), as pycocotools stores them."""
    masks = masks.detach().cpu().numpy().astype(np.uint8)
    if not len(masks):
        return []
    return mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))


def rle_json(rle: dict) -> dict:
    """A pycocotools RLE with its ``counts`` as text (what COCO json files hold)."""
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _ground_truth(images: list[dict], iou_type: str, num_classes: int) -> COCO:
    annotations = []
    for r in images:
        rles = r.get("gt_rles") if iou_type == "segm" else None
        for j, label in enumerate(r["gt_labels"]):
            ann = {"id": len(annotations) + 1, "image_id": r["image_id"], "category_id": int(label),
                   "bbox": r["gt_boxes"][j].tolist(), "area": float(r["gt_area"][j]),
                   "iscrowd": int(r["gt_iscrowd"][j])}
            if rles is not None:
                ann["segmentation"] = rle_json(rles[j])
            annotations.append(ann)
    coco = COCO()
    coco.dataset = {"images": [{"id": r["image_id"], "height": r["height"], "width": r["width"]} for r in images],
                    "annotations": annotations, "categories": [{"id": k} for k in range(1, num_classes + 1)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_evaluate(images: list[dict], iou_type: str, num_classes: int) -> list[float]:
    """COCOeval's AP, AP50, AP75, APs, APm, APl ("bbox" or "segm") over the records of distinct images.

    Labels 1..K serve as category ids. For "segm" the detections carry no box, so pycocotools takes
    their area (for the small / medium / large ranges) from the mask, as Detectron2 does.
    """
    detections = []
    for r in images:
        for j, label in enumerate(r["labels"]):
            det = {"image_id": r["image_id"], "category_id": int(label), "score": float(r["scores"][j])}
            if iou_type == "segm":
                det["segmentation"] = r["rles"][j]
            else:
                det["bbox"] = r["boxes"][j].tolist()
            detections.append(det)
    if not detections:
        return [0.0] * len(COCO_METRICS)  # nothing detected: no precision at any recall
    gt = _ground_truth(images, iou_type, num_classes)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        evaluator = COCOeval(gt, gt.loadRes(detections), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    log.debug("COCO %s evaluation of %d images:\n%s", iou_type, len(images), out.getvalue())
    return [float(v) for v in evaluator.stats[: len(COCO_METRICS)]]


def write_coco_results(images: list[dict], path: Path, label_to_category_id: dict[int, int] | None) -> None:
    """The detections as a COCO results file (what ``COCO.loadRes`` and the evaluation server read):
    ``image_id``, ``category_id`` (labels mapped back to COCO's ids), ``bbox`` [x, y, width, height],
    ``score`` and, with masks, an RLE ``segmentation``. Values are written unrounded (JSON floats round-trip
    exactly), so pycocotools on this file gives the very numbers ``CocoEvaluation`` logged: rounding would tie
    scores (which reorders detections) and move boxes across IoU thresholds."""
    category_of = label_to_category_id or {}
    results = []
    for r in images:
        for j, label in enumerate(r["labels"]):
            det = {"image_id": r["image_id"], "category_id": int(category_of.get(int(label), label)),
                   "bbox": r["boxes"][j].tolist(), "score": float(r["scores"][j])}
            if "rles" in r:
                det["segmentation"] = rle_json(r["rles"][j])
            results.append(det)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results))


def write_cityscapes_instances(images: list[dict], folder: Path, label_to_category_id: dict[int, int] | None) -> None:
    """The detections' masks in cityscapesScripts' instance results format, what its
    ``evalInstanceLevelSemanticLabeling`` reads with ``CITYSCAPES_RESULTS=folder``.

    Per image ``<results_id>_pred.txt``, found by the evaluator's pattern ``<city>_<sequence>_<frame>*.txt`` (the
    records' ``results_id``), one line per detection: ``masks/<results_id>_<j>.png <label id> <score>``, the mask a
    binary PNG at the image's size, the label mapped to its Cityscapes label id by ``label_to_category_id``, the
    score unrounded (rounding would tie scores and reorder detections). An image without detections gets an empty
    file: the evaluator wants one per ground-truth image. ``folder`` is replaced, since the evaluator would read
    the masks of an earlier epoch as predictions.
    """
    if not label_to_category_id:
        raise ValueError("Cityscapes instance results need the dataset's label_to_category_id (detection label -> "
                         "Cityscapes label id, e.g. 1 -> 24 for person): the datamodule's dataset_info has none")
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "masks").mkdir(parents=True)
    for r in images:
        name = r.get("results_id")
        if not isinstance(name, str) or "rles" not in r:
            raise ValueError(f"image {r['image_id']}: Cityscapes instance results need masks and the image's name "
                             f"<city>_<sequence>_<frame> as its target's results_id, got results_id {name!r}"
                             + ("" if "rles" in r else " and no masks (use detector maskrcnn)"))
        lines = []
        for j, (label, score, rle) in enumerate(zip(r["labels"], r["scores"], r["rles"])):
            category_id = label_to_category_id.get(int(label))
            if category_id is None:
                raise ValueError(f"label {int(label)} has no Cityscapes label id in label_to_category_id "
                                 f"{label_to_category_id}")
            png = f"masks/{name}_{j}.png"
            Image.fromarray(mask_utils.decode(rle).astype(bool)).save(folder / png)  # 1-bit: small and fast
            lines.append(f"{png} {category_id} {float(score)!r}\n")
        (folder / f"{name}_pred.txt").write_text("".join(lines))
