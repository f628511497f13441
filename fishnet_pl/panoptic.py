"""Panoptic segmentation: the Panoptic FPN merge of instances and stuff, panoptic quality, and results files.

- ``PanopticQuality`` counts true / false positives, false negatives and matched IoU per category exactly as
  panopticapi's ``pq_compute`` (COCO) and cityscapesScripts' ``evalPanopticSemanticLabeling`` (the same
  algorithm) do, so its PQ / SQ / RQ equal theirs on the files ``write_panoptic`` writes; each image counts
  once under DDP.
- ``merge_panoptic`` is the inference merge of Panoptic FPN (Detectron2's ``combine_semantic_and_instance_outputs``).
- ``write_panoptic`` writes the COCO panoptic results format both evaluators read unchanged.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fishnet_pl.metrics import CocoEvaluation, _PerImageMetric

# Segment ids in a PNG are R + 256 G + 256² B, so they stay below 256³; 0 is void (unlabelled).
MAX_SEGMENT_ID = 256**3 - 1
GROUPS = (("", None), ("_things", True), ("_stuff", False))


class PanopticCounts:
    """The evaluators' arithmetic: one image's per-category counts ``[tp, fp, fn, iou_sum]`` (``image_row``) and
    PQ, SQ, RQ from the rows of every image (``logs``).

    Per image, a ground-truth and a predicted segment of one category match when their IoU exceeds 0.5, the union
    leaving out the prediction's void pixels; crowd ground truth never matches, and an unmatched prediction lying
    more than half on void and on the crowd region of its category is no false positive. Categories with no tp,
    fp or fn are left out of the averages (the evaluators' ``n``).

    Args:
        categories: COCO panoptic categories ``[{"id", "name", "isthing"}]``; their ids label the segments.
    """

    def __init__(self, categories: Sequence[dict]):
        self.categories = [{"id": int(c["id"]), "name": str(c["name"]), "isthing": bool(c["isthing"])}
                           for c in categories]
        ids = [c["id"] for c in self.categories]
        if not ids or len(set(ids)) != len(ids):
            raise ValueError(f"PanopticQuality needs categories with distinct ids, got ids {ids}")
        clashing = {c["name"] for c in self.categories} & {"things", "stuff"}
        if clashing:
            raise ValueError(f"category names {sorted(clashing)} would clash with pq_things / pq_stuff: rename them")
        self.index_of = {c: i for i, c in enumerate(ids)}

    def _categories_of(self, segments: Sequence[dict], what: str, image: int) -> torch.Tensor:
        unknown = sorted({s["category_id"] for s in segments} - set(self.index_of))
        if unknown:
            raise ValueError(f"{what} segments of image {image} in the batch have category ids {unknown} that are "
                             f"not among the categories {sorted(self.index_of)}")
        return torch.tensor([self.index_of[s["category_id"]] for s in segments], dtype=torch.long)

    def image_row(self, pred_ids: torch.Tensor, pred_segments: Sequence[dict], gt_ids: torch.Tensor,
                  gt_segments: Sequence[dict], image: int = 0) -> torch.Tensor:
        """The counts of one image, float64 ``[4 * categories]``: id maps [H, W] (0 = void) and their segment lists
        (``category_id``; ground truth also ``iscrowd``); ``image`` names it in errors."""
        gt_ids = torch.as_tensor(gt_ids).long()
        pred_ids = torch.as_tensor(pred_ids, device=gt_ids.device).long()
        if pred_ids.shape != gt_ids.shape:
            raise ValueError(f"image {image} in the batch: predicted ids {tuple(pred_ids.shape)} and ground-truth "
                             f"ids {tuple(gt_ids.shape)} differ in size")
        device, k = gt_ids.device, len(self.categories)
        gt_values, gt_inverse = torch.unique(gt_ids, return_inverse=True)
        pred_values, pred_inverse = torch.unique(pred_ids, return_inverse=True)
        counts = torch.bincount((gt_inverse * len(pred_values) + pred_inverse).flatten(),
                                minlength=len(gt_values) * len(pred_values)).reshape(len(gt_values), -1)

        # The evaluators refuse a prediction whose PNG and segment list disagree; so do we.
        listed = [int(s["id"]) for s in pred_segments]
        in_map = set(pred_values.tolist()) - {0}
        if len(set(listed)) != len(listed) or set(listed) != in_map or 0 in listed:
            raise ValueError(f"image {image} in the batch: the predicted segments list ids {sorted(listed)} but the "
                             f"id map holds {sorted(in_map)} (besides void 0); each non-void id once, no other")
        pred_column = torch.searchsorted(pred_values, torch.tensor(listed, dtype=torch.long, device=device))
        pred_area = counts.sum(dim=0)[pred_column]
        void_row = gt_values == 0
        pred_void = counts[void_row].sum(dim=0)[pred_column]  # the prediction's pixels on void ground truth

        gt_listed = torch.tensor([int(s["id"]) for s in gt_segments], dtype=torch.long, device=device)
        gt_row = torch.searchsorted(gt_values, gt_listed).clamp(max=len(gt_values) - 1)
        in_gt_map = gt_values[gt_row] == gt_listed  # a listed segment absent from the map has no pixels
        inter = counts[gt_row][:, pred_column] * in_gt_map[:, None]
        gt_area = counts.sum(dim=1)[gt_row] * in_gt_map

        gt_category = self._categories_of(gt_segments, "ground-truth", image).to(device)
        pred_category = self._categories_of(pred_segments, "predicted", image).to(device)
        crowd = torch.tensor([bool(s.get("iscrowd", 0)) for s in gt_segments], dtype=torch.bool, device=device)

        union = pred_area[None] + gt_area[:, None] - inter - pred_void[None]
        iou = inter.double() / union.clamp(min=1).double()
        match = (inter > 0) & (gt_category[:, None] == pred_category[None]) & ~crowd[:, None] & (iou > 0.5)
        g, p = match.nonzero(as_tuple=True)
        tp = torch.bincount(gt_category[g], minlength=k).double()
        iou_sum = torch.bincount(gt_category[g], weights=iou[g, p], minlength=k).double()
        fn = torch.bincount(gt_category[~match.any(dim=1) & ~crowd], minlength=k).double()

        # As the evaluators do, a category's crowd region is its last crowd segment in the list.
        crowd_of = torch.full((k,), -1, dtype=torch.long, device=device)
        for i in crowd.nonzero().flatten().tolist():
            crowd_of[gt_category[i]] = i
        pred_crowd = crowd_of[pred_category]
        on_crowd, has_crowd = torch.zeros_like(pred_area), pred_crowd >= 0
        on_crowd[has_crowd] = inter[pred_crowd[has_crowd], has_crowd.nonzero().flatten()]
        ignored = (pred_void + on_crowd).double() / pred_area.double() > 0.5
        fp = torch.bincount(pred_category[~match.any(dim=0) & ~ignored], minlength=k).double()
        return torch.cat([tp, fp, fn, iou_sum])

    def logs(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """``pq``, ``sq``, ``rq``, the same for ``_things`` and ``_stuff``, and ``pq_<class name>`` for each category
        with a segment, from the rows of every image once, as fractions in float64 (the evaluators' doubles, to the
        last digits). A group with no such category scores 0 (where the evaluators divide by zero)."""
        tp, fp, fn, iou = rows.double().sum(dim=0).reshape(4, -1)
        present = tp + fp + fn > 0
        denominator = (tp + 0.5 * fp + 0.5 * fn).clamp(min=0.5)
        per_class = {"pq": iou / denominator, "sq": iou / tp.clamp(min=1), "rq": tp / denominator}
        isthing = torch.tensor([c["isthing"] for c in self.categories], device=tp.device)
        logs = {}
        for suffix, things in GROUPS:
            chosen = present if things is None else present & (isthing == things)
            for name, values in per_class.items():
                logs[f"{name}{suffix}"] = values[chosen].mean() if chosen.any() else tp.new_tensor(0.0)
        logs.update({f"pq_{self.categories[c]['name']}": per_class["pq"][c]
                     for c in present.nonzero().flatten().tolist()})
        return logs


class PanopticQuality(_PerImageMetric):
    """Panoptic quality (PQ), segmentation quality (SQ) and recognition quality (RQ), as the COCO and Cityscapes
    panoptic evaluators compute them (``PanopticCounts``). Each image keeps one row of per-category counts keyed
    by its image key, so an image DDP's sampler repeats counts once.

    Args:
        categories: COCO panoptic categories ``[{"id", "name", "isthing"}]``; their ids label the segments.
    """

    def __init__(self, categories: Sequence[dict], **kwargs: Any):
        super().__init__(**kwargs)
        self.counts = PanopticCounts(categories)

    def update(self, pred_ids: Sequence[torch.Tensor], pred_segments: Sequence[Sequence[dict]],
               gt_ids: Sequence[torch.Tensor], gt_segments: Sequence[Sequence[dict]],
               keys: torch.Tensor | Sequence[int] | None = None) -> None:
        """One image per item: ``pred_ids`` and ``gt_ids`` are segment id maps [H, W] (0 = void), the segment
        lists give each id's ``category_id`` (ground truth also ``iscrowd``); ``keys`` are image keys."""
        rows = [self.counts.image_row(torch.as_tensor(p, device=self.device), ps,
                                      torch.as_tensor(g, device=self.device), gs, i)
                for i, (p, ps, g, gs) in enumerate(zip(pred_ids, pred_segments, gt_ids, gt_segments, strict=True))]
        self._append(torch.stack(rows) if rows else torch.zeros(0, 4 * len(self.counts.categories),
                                                                 dtype=torch.float64, device=self.device), keys)

    def compute(self) -> dict[str, torch.Tensor]:
        """``PanopticCounts.logs`` over every distinct image."""
        return self.counts.logs(self.distinct_rows())


def merge_panoptic(masks: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, semantic: torch.Tensor,
                   stuff_category_ids: Sequence[int], *, overlap_thresh: float = 0.5, stuff_area_thresh: int = 4096,
                   instance_score_thresh: float = 0.5) -> tuple[torch.Tensor, list[dict]]:
    """Panoptic FPN's merge of one image's instances and semantic segmentation into a panoptic id map.

    Instances are pasted by decreasing score, from ``instance_score_thresh`` up; one whose mask is more than
    ``overlap_thresh`` covered by those already pasted is dropped, else only its free part is pasted (the first
    detection keeps contested pixels). The pixels left take the semantic map's stuff class, where that class's
    free region has at least ``stuff_area_thresh`` pixels (small stuff blobs are mostly noise); the rest is void.

    Args:
        masks: instance masks, bool [N, H, W].
        scores: instance scores [N].
        labels: the instances' thing category ids [N].
        semantic: semantic labels [H, W]: 0 for "things", 1..S for the stuff classes (Detectron2's
            panoptic-separated convention).
        stuff_category_ids: the category ids of the stuff classes 1..S.
        overlap_thresh: largest fraction of an instance that may already be taken.
        stuff_area_thresh: smallest stuff segment, in pixels.
        instance_score_thresh: lowest instance score kept.

    Returns:
        The id map, int64 [H, W] (0 = void, segments 1, 2, ...), and its segments ``{"id", "category_id",
        "isthing", "area"}`` (things also ``"score"``).
    """
    if masks.dim() != 3 or masks.shape[1:] != semantic.shape or not len(scores) == len(masks) == len(labels):
        raise ValueError(f"merge_panoptic needs masks [N, H, W], scores [N], labels [N] and semantic [H, W]; got "
                         f"{tuple(masks.shape)}, {tuple(scores.shape)}, {tuple(labels.shape)}, "
                         f"{tuple(semantic.shape)}")
    if len(semantic.unique()) and not 0 <= int(semantic.min()) <= int(semantic.max()) <= len(stuff_category_ids):
        raise ValueError(f"semantic labels {semantic.unique().tolist()} outside 0..{len(stuff_category_ids)} "
                         f"(0 = things, 1..S = the {len(stuff_category_ids)} stuff_category_ids)")
    panoptic = torch.zeros(semantic.shape, dtype=torch.long, device=semantic.device)
    segments: list[dict] = []
    for i in torch.sort(scores, descending=True, stable=True).indices.tolist():
        score = float(scores[i])
        if score < instance_score_thresh:
            break
        mask = masks[i].bool()
        area = int(mask.sum())
        if area == 0 or int((mask & (panoptic > 0)).sum()) / area > overlap_thresh:
            continue
        mask &= panoptic == 0
        panoptic[mask] = len(segments) + 1
        segments.append({"id": len(segments) + 1, "category_id": int(labels[i]), "isthing": True, "score": score,
                         "area": int(mask.sum())})
    for stuff in semantic.unique().tolist():
        if stuff == 0:
            continue
        mask = (semantic == stuff) & (panoptic == 0)
        area = int(mask.sum())
        if area < stuff_area_thresh:
            continue
        panoptic[mask] = len(segments) + 1
        segments.append({"id": len(segments) + 1, "category_id": int(stuff_category_ids[stuff - 1]),
                         "isthing": False, "area": area})
    return panoptic, segments


def ids_to_rgb(ids: np.ndarray) -> np.ndarray:
    """Segment ids [H, W] -> the COCO panoptic PNG colours [H, W, 3] uint8 (id = R + 256 G + 256² B)."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 256**2], axis=-1).astype(np.uint8)


def write_panoptic(records: Iterable[dict], folder: str | Path, json_name: str, categories: Sequence[dict],
                   overwrite: bool = False) -> Path:
    """Panoptic results in the COCO panoptic format that panopticapi's ``pq_compute`` and cityscapesScripts'
    ``evalPanopticSemanticLabeling`` read unchanged: ``<folder>/<json_name>`` and one PNG per image in
    ``<folder>/<json stem>/``.

    Args:
        records: per image ``{"image_id", "panoptic_seg": id map [H, W] (0 = void), "segments_info": [{"id",
            "category_id", ...}]}``, optionally ``"file_name"`` (default ``<image_id>.png``).
        folder: where the json and the PNG folder go.
        json_name: e.g. ``panoptic_val.json``.
        categories: the COCO panoptic categories, copied into the json.
        overwrite: replace an existing json and write into an existing PNG folder (else FileExistsError).

    Returns:
        The json's path.
    """
    json_path = Path(folder) / json_name
    png_folder = json_path.with_suffix("")
    for path in (json_path, png_folder):
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists: choose another folder or json name, or pass "
                                  f"overwrite=True")
    png_folder.mkdir(parents=True, exist_ok=True)
    annotations = []
    for record in records:
        ids = torch.as_tensor(record["panoptic_seg"]).cpu().long().numpy()
        image_id = record["image_id"]
        values, areas = np.unique(ids, return_counts=True)
        area_of = dict(zip(values.tolist(), areas.tolist()))
        listed = [int(s["id"]) for s in record["segments_info"]]
        if len(set(listed)) != len(listed) or set(listed) != set(area_of) - {0} or 0 in listed:
            raise ValueError(f"image {image_id}: segments_info lists ids {sorted(listed)} but panoptic_seg holds "
                             f"{sorted(set(area_of) - {0})} (besides void 0); the evaluators need each once")
        if ids.min(initial=0) < 0 or ids.max(initial=0) > MAX_SEGMENT_ID:
            raise ValueError(f"image {image_id}: segment ids must lie in 0..{MAX_SEGMENT_ID} to fit a PNG's colours")
        segments_info = []
        for segment in record["segments_info"]:
            rows, cols = np.nonzero(ids == int(segment["id"]))
            x, y = int(cols.min()), int(rows.min())
            segments_info.append({"id": int(segment["id"]), "category_id": int(segment["category_id"]),
                                  "area": int(area_of[int(segment["id"])]),
                                  "bbox": [x, y, int(cols.max()) - x + 1, int(rows.max()) - y + 1], "iscrowd": 0})
        file_name = record.get("file_name", f"{image_id}.png")
        Image.fromarray(ids_to_rgb(ids)).save(png_folder / file_name)
        annotations.append({"image_id": image_id, "file_name": file_name, "segments_info": segments_info})
    json_path.write_text(json.dumps({"annotations": annotations, "categories": list(categories)}))
    return json_path


class PanopticEvaluation(CocoEvaluation):
    """What a panoptic head is scored by: PQ, SQ, RQ (``PanopticCounts``) and the instance branch's box and mask AP
    (``CocoEvaluation``), over every distinct image, from one record per image.

    Each record also keeps the predicted panoptic map (a PNG in memory, ``panoptic_png``, and ``segments_info``), so
    that after ``compute()`` ``images`` holds what ``write_panoptic`` writes. The categories are the dataset's,
    set after construction (``set_categories``), as the datamodule declares them at set-up.

    Args:
        num_things: K thing classes (labels 1..K of the instance branch).
        mask_threshold: an instance mask pixel belongs to the object when its probability exceeds this.
    """

    def __init__(self, num_things: int, mask_threshold: float = 0.5, **kwargs: Any):
        super().__init__(num_things, with_masks=True, mask_threshold=mask_threshold, **kwargs)
        self.counts: PanopticCounts | None = None

    def set_categories(self, categories: Sequence[dict]) -> None:
        self.counts = PanopticCounts(categories)

    def update(self, image_sizes: Sequence[Sequence[int]], targets: Sequence[dict], outputs: Sequence[dict],
               panoptic: Sequence[tuple[torch.Tensor, list[dict]]] = ()) -> None:
        """Per image: its size (H, W), the target (detection keys plus ``panoptic`` ids [H, W] and ``segments``),
        the network's output and the merged prediction (id map [H, W], segments)."""
        if self.counts is None:
            raise RuntimeError("PanopticEvaluation needs the dataset's categories (set_categories) before update")
        for i, (size, target, output, (ids, segments)) in enumerate(zip(image_sizes, targets, outputs, panoptic,
                                                                          strict=True)):
            record = self._record(size, target, output)
            record["pq_row"] = self.counts.image_row(ids, segments, target["panoptic"], target["segments"], i).cpu()
            png = io.BytesIO()
            Image.fromarray(ids_to_rgb(ids.cpu().numpy())).save(png, format="PNG")
            record["panoptic_png"], record["segments_info"] = png.getvalue(), list(segments)
            self.records.append(record)

    def compute(self) -> dict[str, torch.Tensor]:
        return {**self.counts.logs(torch.stack([r["pq_row"] for r in self.distinct_records()])),
                **super().compute()}


def read_panoptic_png(data: bytes) -> np.ndarray:
    """A COCO panoptic PNG (bytes) -> segment ids [H, W] int64 (id = R + 256 G + 256² B)."""
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]
