"""Panoptic segmentation: our PQ equals panopticapi's and cityscapesScripts' on the files we write, each image
counts once, and the Panoptic FPN merge follows each of its rules."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from panopticapi.evaluation import pq_compute
from panopticapi.utils import id2rgb, rgb2id
from PIL import Image

from fishnet_pl.panoptic import PanopticQuality, merge_panoptic, write_panoptic

H, W = 64, 96
COCO_CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1}, {"id": 3, "name": "car", "isthing": 1},
    {"id": 9, "name": "boat", "isthing": 1},  # in no image: left out of the averages
    {"id": 100, "name": "road", "isthing": 0}, {"id": 119, "name": "sky", "isthing": 0},
    {"id": 125, "name": "grass", "isthing": 0}, {"id": 130, "name": "wall", "isthing": 0},
]


def synthetic_scene(rng: np.random.Generator, stuff: list[int], things: list[int]):
    """Ground truth as segment indices [H, W] (-1 = void) and segments: three stuff bands, thing rectangles
    (a quarter crowd), then void rectangles on top."""
    index = np.full((H, W), -1)
    bounds = [0, *sorted(rng.choice(np.arange(12, H - 12), 2, replace=False)), H]
    segments = []
    for k, category in enumerate(rng.choice(stuff, 3, replace=False)):
        index[bounds[k]:bounds[k + 1]] = len(segments)
        segments.append({"category_id": int(category), "iscrowd": 0, "rect": None})
    for _ in range(rng.integers(4, 8)):
        h, w = int(rng.integers(6, 20)), int(rng.integers(6, 24))
        y, x = int(rng.integers(0, H - h)), int(rng.integers(0, W - w))
        index[y:y + h, x:x + w] = len(segments)
        segments.append({"category_id": int(rng.choice(things)), "iscrowd": int(rng.random() < 0.25),
                         "rect": (y, x, h, w)})
    voids = []
    for _ in range(2):
        h, w = int(rng.integers(5, 14)), int(rng.integers(5, 20))
        y, x = int(rng.integers(0, H - h)), int(rng.integers(0, W - w))
        index[y:y + h, x:x + w] = -1
        voids.append((y, x, h, w))
    return index, segments, bounds, voids


def synthetic_prediction(rng, index, segments, bounds, voids, stuff: list[int], things: list[int]):
    """A prediction near the scene, merged by ``merge_panoptic``: stuff bands moved by a few rows (sometimes
    the wrong class), instances moved by about a third of their width (IoU around 0.5), a few missed or of the
    wrong class, and false positives, one on void."""
    stuff_of = {c: s + 1 for s, c in enumerate(stuff)}
    semantic = np.zeros((H, W), np.int64)
    moved = [0] + [int(np.clip(b + rng.integers(-5, 6), 1, H - 1)) for b in bounds[1:-1]] + [H]
    for k in range(3):
        category = segments[k]["category_id"] if rng.random() < 0.8 else int(rng.choice(stuff))
        semantic[moved[k]:moved[k + 1]] = stuff_of[category]
    rects, labels = [], []
    for segment in segments[3:]:
        if rng.random() < 0.15:
            continue
        y, x, h, w = segment["rect"]
        dx = int(rng.choice([0, 1, w // 3 - 1, w // 3, w // 3 + 1, w // 2])) * int(rng.choice([-1, 1]))
        rects.append((y + int(rng.integers(-1, 2)), x + dx, h, w))
        labels.append(segment["category_id"] if rng.random() < 0.9 else int(rng.choice(things)))
    rects.append(voids[0])
    labels.append(int(rng.choice(things)))
    for _ in range(2):
        rects.append((int(rng.integers(0, H - 8)), int(rng.integers(0, W - 8)), 8, 10))
        labels.append(int(rng.choice(things)))
    masks = np.zeros((len(rects), H, W), bool)
    for i, (y, x, h, w) in enumerate(rects):
        masks[i, max(y, 0):max(y + h, 0), max(x, 0):max(x + w, 0)] = True
        semantic[masks[i]] = 0
    scores = rng.uniform(0.3, 1.0, len(rects))
    return merge_panoptic(torch.from_numpy(masks), torch.from_numpy(scores), torch.tensor(labels),
                          torch.from_numpy(semantic), stuff, stuff_area_thresh=20)


def coco_ground_truth(rng, index, segments):
    """The scene as a COCO panoptic id map with large random segment ids (all three PNG channels used)."""
    ids = rng.choice(np.arange(1, 256**3), len(segments), replace=False)
    id_map = np.where(index >= 0, ids[index.clip(min=0)], 0)
    listed = [{"id": int(ids[i]), "category_id": s["category_id"], "iscrowd": s["iscrowd"]}
              for i, s in enumerate(segments) if (index == i).any()]
    return id_map, listed


def write_ground_truth(folder: Path, images: list[tuple], categories: list[dict]) -> tuple[Path, Path]:
    """COCO panoptic ground truth as the COCO dataset ships it: PNGs (``id2rgb``) and a json with areas."""
    png_folder = folder / "gt"
    png_folder.mkdir()
    annotations = []
    for image_id, id_map, listed in images:
        Image.fromarray(id2rgb(id_map)).save(png_folder / f"{image_id}.png")
        infos = []
        for s in listed:
            rows, cols = np.nonzero(id_map == s["id"])
            infos.append({**s, "area": len(rows), "bbox": [int(cols.min()), int(rows.min()),
                                                          int(np.ptp(cols)) + 1, int(np.ptp(rows)) + 1]})
        annotations.append({"image_id": image_id, "file_name": f"{image_id}.png", "segments_info": infos})
    gt_json = folder / "gt.json"
    gt_json.write_text(json.dumps({"images": [{"id": i, "height": H, "width": W, "file_name": f"{i}.jpg"}
                                              for i, _, _ in images],
                                   "annotations": annotations, "categories": categories}))
    return gt_json, png_folder


def assert_same_results(ours: dict, official: dict, categories: list[dict]) -> None:
    for group, suffix in (("All", ""), ("Things", "_things"), ("Stuff", "_stuff")):
        for name in ("pq", "sq", "rq"):
            assert ours[f"{name}{suffix}"].item() == pytest.approx(official[group][name], abs=1e-9), (group, name)
    for category in categories:
        expected = official["per_class"][category["id"]]["pq"]
        assert ours.get(f"pq_{category['name']}", torch.tensor(0.0)).item() == pytest.approx(expected, abs=1e-9)


def quietly(function, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return function(*args)


def test_panoptic_quality_equals_panopticapi_on_the_files_we_write(tmp_path):
    rng = np.random.default_rng(0)
    stuff = [c["id"] for c in COCO_CATEGORIES if not c["isthing"]]
    things = [1, 3]
    metric = PanopticQuality(COCO_CATEGORIES)
    ground_truth, predictions = [], []
    for image_id in range(6):
        index, segments, bounds, voids = synthetic_scene(rng, stuff, things)
        gt_ids, gt_segments = coco_ground_truth(rng, index, segments)
        pred_ids, pred_segments = synthetic_prediction(rng, index, segments, bounds, voids, stuff, things)
        metric.update([pred_ids], [pred_segments], [torch.from_numpy(gt_ids)], [gt_segments], [image_id])
        ground_truth.append((image_id, gt_ids, gt_segments))
        predictions.append({"image_id": image_id, "panoptic_seg": pred_ids, "segments_info": pred_segments})
    # IoU exactly 0.5 (a 4x6 car 2 columns off: 16 / 32) is no match.
    gt_ids, pred_ids = torch.full((H, W), 4), torch.full((H, W), 4)
    gt_ids[10:14, 10:16], pred_ids[10:14, 12:18] = 9, 9
    gt_segments = [{"id": 4, "category_id": 100, "iscrowd": 0}, {"id": 9, "category_id": 3, "iscrowd": 0}]
    pred_segments = [{"id": 4, "category_id": 100}, {"id": 9, "category_id": 3}]
    metric.update([pred_ids], [pred_segments], [gt_ids], [gt_segments], [6])
    ground_truth.append((6, gt_ids.numpy(), gt_segments))
    predictions.append({"image_id": 6, "panoptic_seg": pred_ids, "segments_info": pred_segments})
    gt_json, gt_folder = write_ground_truth(tmp_path, ground_truth, COCO_CATEGORIES)
    pred_json = write_panoptic(predictions, tmp_path, "pred.json", COCO_CATEGORIES)
    official = quietly(pq_compute, str(gt_json), str(pred_json), str(gt_folder), str(tmp_path / "pred"))

    ours = metric.compute()
    assert_same_results(ours, official, COCO_CATEGORIES)
    assert 0 < official["Things"]["pq"] < 1 and 0 < official["Stuff"]["pq"] < 1  # matches and misses of both
    assert "pq_boat" not in ours and official["All"]["n"] == len(COCO_CATEGORIES) - 1


def write_cityscapes_ground_truth(folder: Path, scenes: dict[str, tuple]) -> tuple[Path, Path]:
    """Cityscapes ``*_gtFine_instanceIds.png`` files (label id * 1000 + instance for things; label id alone for
    stuff and crowd; 'unlabeled' 0 and 'static' 4 are void), turned into COCO panoptic ground truth by
    cityscapesScripts' own ``createPanopticImgs``."""
    from cityscapesscripts.preparation.createPanopticImgs import convert2panoptic

    city = folder / "gtFine" / "val" / "aachen"
    city.mkdir(parents=True)
    for name, (index, segments, _, voids) in scenes.items():
        instance_ids = np.zeros((H, W), np.uint16)
        for i, s in enumerate(segments):
            alone = s["iscrowd"] or s["rect"] is None
            instance_ids[index == i] = s["category_id"] if alone else s["category_id"] * 1000 + i
        y, x, h, w = voids[0]
        instance_ids[y:y + h, x:x + w] = 4
        Image.fromarray(instance_ids).save(city / f"{name}_gtFine_instanceIds.png")
    quietly(convert2panoptic, str(folder / "gtFine"), str(folder), False, ["val"])
    return folder / "cityscapes_panoptic_val.json", folder / "cityscapes_panoptic_val"


def test_panoptic_quality_equals_cityscapes_scripts_on_the_files_we_write(tmp_path):
    from cityscapesscripts.evaluation.evalPanopticSemanticLabeling import evaluatePanoptic
    from cityscapesscripts.helpers.labels import labels

    rng = np.random.default_rng(1)
    categories = [{"id": label.id, "name": label.name, "isthing": int(label.hasInstances)}
                  for label in labels if not label.ignoreInEval]
    stuff = [c["id"] for c in categories if not c["isthing"]]
    things = [24, 26]  # person, car
    scenes = {f"aachen_{i:06d}_000019": synthetic_scene(rng, stuff, things) for i in range(4)}
    gt_json, gt_folder = write_cityscapes_ground_truth(tmp_path, scenes)
    gt = {a["image_id"]: a for a in json.loads(gt_json.read_text())["annotations"]}
    metric = PanopticQuality(categories)
    predictions = []
    for key, (name, scene) in enumerate(scenes.items()):
        gt_ids = rgb2id(np.array(Image.open(gt_folder / gt[name]["file_name"]), np.uint32)).astype(np.int64)
        pred_ids, pred_segments = synthetic_prediction(rng, *scene, stuff, things)
        metric.update([pred_ids], [pred_segments], [torch.from_numpy(gt_ids)], [gt[name]["segments_info"]], [key])
        predictions.append({"image_id": name, "file_name": f"{name}_panoptic.png", "panoptic_seg": pred_ids,
                            "segments_info": pred_segments})
    pred_json = write_panoptic(predictions, tmp_path / "results", "cityscapes_panoptic_val.json", categories)
    official = quietly(evaluatePanoptic, str(gt_json), str(gt_folder), str(pred_json),
                       str(pred_json.with_suffix("")), str(tmp_path / "resultPanopticSemanticLabeling.json"))
    assert_same_results(metric.compute(), official, categories)
    assert 0 < official["Things"]["pq"] < 1 and 0 < official["Stuff"]["pq"] < 1


def two_images():
    """Two images: a car predicted exactly, and one column off (IoU 20/24: its column on void is no error)."""
    categories = [{"id": 1, "name": "car", "isthing": 1}]
    gt = torch.zeros(2, 6, 8, dtype=torch.long)
    gt[:, 1:5, 1:7] = 5
    pred = torch.zeros_like(gt)
    pred[0, 1:5, 1:7] = 3
    pred[1, 1:5, 2:8] = 3
    segments = [{"id": 5, "category_id": 1, "iscrowd": 0}], [{"id": 3, "category_id": 1}]
    return categories, pred, gt, segments


def test_an_image_seen_twice_counts_once_in_any_order_and_across_merged_metrics():
    categories, pred, gt, (gt_segments, pred_segments) = two_images()
    first, second = PanopticQuality(categories), PanopticQuality(categories)
    first.update(pred, [pred_segments] * 2, gt, [gt_segments] * 2, [0, 1])
    second.update(pred[1:], [pred_segments], gt[1:], [gt_segments], [1])  # DDP's sampler repeats image 1
    first.merge_state(second)
    reversed_order = PanopticQuality(categories)
    reversed_order.update(pred[1:], [pred_segments], gt[1:], [gt_segments], [1])
    reversed_order.update(pred, [pred_segments] * 2, gt, [gt_segments] * 2, [0, 1])
    expected = (1 + 20 / 24) / 2  # two true positives
    assert first.compute()["pq"].item() == pytest.approx(expected, abs=1e-12)
    assert {k: v.item() for k, v in reversed_order.compute().items()} == {k: v.item() for k, v in
                                                                          first.compute().items()}
    unkeyed = PanopticQuality(categories)
    unkeyed.update(pred, [pred_segments] * 2, gt, [gt_segments] * 2)
    unkeyed.update(pred[1:], [pred_segments], gt[1:], [gt_segments])
    assert unkeyed.compute()["pq"].item() != pytest.approx(expected)  # without keys the repeat would count


def test_panoptic_quality_names_a_category_it_does_not_know():
    categories, pred, gt, (gt_segments, _) = two_images()
    metric = PanopticQuality(categories)
    with pytest.raises(ValueError, match=r"predicted segments of image 0.*category ids \[7\]"):
        metric.update(pred[:1], [[{"id": 3, "category_id": 7}]], gt[:1], [gt_segments])


def boxes(n: int, *rects) -> torch.Tensor:
    masks = torch.zeros(n, 10, 10, dtype=torch.bool)
    for i, (y0, y1, x0, x1) in enumerate(rects):
        masks[i, y0:y1, x0:x1] = True
    return masks


def test_merge_pastes_instances_by_score_above_the_threshold():
    masks = boxes(3, (0, 4, 0, 4), (0, 4, 5, 9), (6, 9, 0, 3))
    panoptic, segments = merge_panoptic(masks, torch.tensor([0.5, 0.9, 0.49], dtype=torch.float64),
                                        torch.tensor([1, 2, 3]),
                                        torch.zeros(10, 10, dtype=torch.long), [])
    assert [(s["category_id"], s["score"], s["area"]) for s in segments] == [(2, 0.9, 16), (1, 0.5, 16)]
    assert (panoptic[0:4, 5:9] == 1).all() and (panoptic[0:4, 0:4] == 2).all()
    assert (panoptic[6:9, 0:3] == 0).all()  # score 0.49: dropped; semantic 0 ("things") stays void


def test_merge_skips_a_mostly_covered_instance_and_pastes_only_the_free_part_of_others():
    # second: 8 of its 16 pixels taken (0.5, not more): its free half is pasted; third: 12 of 16 taken: skipped.
    masks = boxes(3, (0, 4, 0, 4), (0, 4, 2, 6), (0, 4, 1, 5))
    panoptic, segments = merge_panoptic(masks, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([1, 1, 1]),
                                        torch.zeros(10, 10, dtype=torch.long), [])
    assert [s["area"] for s in segments] == [16, 8]
    assert (panoptic[0:4, 0:4] == 1).all() and (panoptic[0:4, 4:6] == 2).all()


def test_merge_fills_free_pixels_with_stuff_of_at_least_the_area_threshold():
    semantic = torch.zeros(10, 10, dtype=torch.long)
    semantic[:5] = 1  # 50 pixels, 16 of them under an instance: 34 free
    semantic[5:8] = 2  # 30 pixels: under the threshold of 34
    masks = boxes(1, (0, 4, 0, 4))
    panoptic, segments = merge_panoptic(masks, torch.tensor([0.9]), torch.tensor([1]), semantic, [40, 50],
                                        stuff_area_thresh=34)
    assert segments[1] == {"id": 2, "category_id": 40, "isthing": False, "area": 34}
    assert len(segments) == 2 and (panoptic[5:] == 0).all() and (panoptic[0:4, 0:4] == 1).all()
    with pytest.raises(ValueError, match=r"outside 0..1"):
        merge_panoptic(masks, torch.tensor([0.9]), torch.tensor([1]), semantic, [40])


def test_write_panoptic_refuses_to_overwrite_results(tmp_path):
    ids = torch.zeros(4, 4, dtype=torch.long)
    ids[1:3, 1:4] = 7
    records = [{"image_id": 3, "panoptic_seg": ids, "segments_info": [{"id": 7, "category_id": 1}]}]
    categories = [{"id": 1, "name": "car", "isthing": 1}]
    path = write_panoptic(records, tmp_path, "panoptic.json", categories)
    written = json.loads(path.read_text())["annotations"][0]
    assert written["segments_info"] == [{"id": 7, "category_id": 1, "area": 6, "bbox": [1, 1, 3, 2], "iscrowd": 0}]
    assert (rgb2id(np.array(Image.open(tmp_path / "panoptic" / "3.png"), np.uint32)) == ids.numpy()).all()
    with pytest.raises(FileExistsError, match="panoptic.json"):
        write_panoptic(records, tmp_path, "panoptic.json", categories)
    path.unlink()
    with pytest.raises(FileExistsError, match=r"panoptic already exists"):
        write_panoptic(records, tmp_path, "panoptic.json", categories)
    write_panoptic(records, tmp_path, "panoptic.json", categories, overwrite=True)
    with pytest.raises(ValueError, match=r"lists ids \[8\] but panoptic_seg holds \[7\]"):
        write_panoptic([{**records[0], "segments_info": [{"id": 8, "category_id": 1}]}], tmp_path / "other",
                       "panoptic.json", categories)
