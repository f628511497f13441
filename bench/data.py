"""Images/s of each datamodule's training pipeline (decode + augment) in one worker: ``python -m bench.data``.

A DataLoader worker calls the dataset's ``__getitem__`` in a loop, so this does exactly that in one
process, single-threaded as a worker is, for a few seconds per datamodule. Dividing a model's
training images/s by these numbers gives the workers it needs to never wait for data. Decoding
alone is timed too, to split the cost between the JPEG/PNG decoder and the augmentations.

Without ``--root`` it uses each datamodule's quickstart data, written to a temporary folder:
real files in the real layouts, but small images, so real datasets (larger JPEGs) decode slower.

``--source shards`` (or ``folder,shards``) times ImageNet read from LitData shards instead
(``datamodules.streaming``: the same decoding and augmentation, the images read from a few large
files rather than one file each): ``--shards`` names converted ones (needed with ``--root``), else the
quickstart data is converted into a temporary folder.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from bench import RESULTS_DIR, machine_info, markdown_table, write_json

# name: (module, class, the training dataset's image files). Each datamodule's own
# ``setup("fit")`` builds its training dataset in ``datasets["train"]``.
DATAMODULES: dict[str, tuple[str, str, Callable]] = {
    "imagenet": ("datamodules.imagenet", "ImageNetDataModule", lambda ds: [path for path, _ in ds.samples]),
    "coco": ("datamodules.coco", "COCODataModule", lambda ds: [record.path for record in ds.images]),
    "cityscapes": ("datamodules.cityscapes", "CityscapesDataModule", lambda ds: [path for path, _ in ds.samples]),
}


# name: the function writing its quickstart data (the datamodules write it only into their own folder under the
# working directory; the bench writes it into its temporary one).
QUICKSTART_WRITERS = {"imagenet": "datamodules.quickstart.write_classification",
                      "coco": "datamodules.quickstart_detection.write_detection",
                      "cityscapes": "datamodules.quickstart_segmentation.write_cityscapes"}


def load_datamodule_class(name: str) -> type:
    """The datamodule class; ImportError/AttributeError if its module is not (yet) there."""
    module, cls, _ = DATAMODULES[name]
    return getattr(importlib.import_module(module), cls)


def train_dataset(name: str, root: Path, quickstart: bool):
    """The datamodule's training dataset, as its loaders would see it (quickstart data written first)."""
    if quickstart:
        module, function = QUICKSTART_WRITERS[name].rsplit(".", 1)
        getattr(importlib.import_module(module), function)(root)
    cls = load_datamodule_class(name)
    kwargs = {"root": str(root), "num_workers": 0}
    accepted = inspect.signature(cls).parameters
    datamodule = cls(**{k: v for k, v in kwargs.items() if k in accepted})
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule.datasets["train"]


def _rate(call: Callable[[int], object], count: int, seconds: float) -> tuple[float, int]:
    """Items/s of ``call(i)``, i cycling over ``count`` items, for ``seconds`` (after one untimed call)."""
    call(0)
    done, began = 0, time.perf_counter()
    while done == 0 or time.perf_counter() - began < seconds:
        call(done % count)
        done += 1
    return done / (time.perf_counter() - began), done


def measure(name: str, root: Path, quickstart: bool, seconds: float) -> dict:
    """Training ``__getitem__`` and decode-only images/s of one datamodule, with the image sizes involved."""
    from datamodules.common import read_rgb

    dataset = train_dataset(name, root, quickstart)
    paths = DATAMODULES[name][2](dataset)
    sizes = []
    for path in paths:
        with Image.open(path) as image:  # reads the header only
            sizes.append(image.size)
    item_rate, items = _rate(lambda i: dataset[i], len(dataset), seconds)
    decode_rate, _ = _rate(lambda i: read_rgb(paths[i]), len(paths), seconds)
    output = tuple(dataset[0]["image"].shape)
    return {
        "images_per_s": item_rate,
        "items_timed": items,
        "decode_images_per_s": decode_rate,
        "decode_share": item_rate / decode_rate,  # fraction of __getitem__ time spent decoding
        "train_images": len(dataset),
        "source_megapixels_median": statistics.median(w * h for w, h in sizes) / 1e6,
        "source_size_example": f"{sizes[0][0]}x{sizes[0][1]}",
        "output_shape": "x".join(map(str, output)),
    }


def measure_shards(shards: str | None, seconds: float, tmp: Path) -> dict:
    """``measure``'s numbers for ImageNet streamed from LitData shards (default: the quickstart data converted)."""
    import io

    from litdata import StreamingDataset

    from datamodules.common import read_rgb
    from datamodules.quickstart import write_classification
    from datamodules.streaming import StreamingImageNetDataModule
    from datamodules.streaming_convert import convert_imagenet

    if shards is None:
        shards = str(tmp / "imagenet-shards")
        convert_imagenet(str(write_classification(tmp / "imagenet")), shards, num_workers=1)
    datamodule = StreamingImageNetDataModule(shards, num_workers=0)
    datamodule.setup("fit")
    dataset, raw = datamodule.datasets["train"], StreamingDataset(f"{shards.rstrip('/')}/train")
    sizes = []
    for _, record in zip(range(200), raw):
        with Image.open(io.BytesIO(record["image"])) as image:  # reads the header only
            sizes.append(image.size)
    # One worker's loop: the dataset's own iteration (shard reads, decode, augment), restarted at its end.
    streams = {"item": iter(dataset), "decode": iter(raw)}

    def take(kind: str):
        try:
            return next(streams[kind])
        except StopIteration:
            streams[kind] = iter(dataset if kind == "item" else raw)
            return next(streams[kind])

    item_rate, items = _rate(lambda i: take("item"), len(dataset), seconds)
    decode_rate, _ = _rate(lambda i: read_rgb(io.BytesIO(take("decode")["image"])), len(raw), seconds)
    return {
        "images_per_s": item_rate,
        "items_timed": items,
        "decode_images_per_s": decode_rate,
        "decode_share": item_rate / decode_rate,
        "train_images": len(dataset),
        "source_megapixels_median": statistics.median(w * h for w, h in sizes) / 1e6,
        "source_size_example": f"{sizes[0][0]}x{sizes[0][1]}",
        "output_shape": "x".join(map(str, take("item")["image"].shape)),
        "shards": shards,
    }


def report(payload: dict) -> str:
    m, s = payload["machine"], payload["settings"]
    header = ["datamodule", "train images/s per worker", "decode only images/s", "decode share",
              "source image (WxH, median MP)", "output tensor", "train images"]
    rows = []
    for name, entry in payload["results"].items():
        if "error" in entry or "skipped" in entry:
            rows.append([name, entry.get("error") or f"skipped: {entry['skipped']}", None, None, None, None, None])
            continue
        rows.append([name, f"{entry['images_per_s']:.1f}", f"{entry['decode_images_per_s']:.1f}",
                     f"{100 * entry['decode_share']:.0f}%",
                     f"{entry['source_size_example']}, {entry['source_megapixels_median']:.3f}",
                     entry["output_shape"], entry["train_images"]])
    return "\n".join([
        f"## Data pipelines: one worker, {s['threads']} thread(s), {s['seconds']:g} s each ({s['data']})",
        "",
        f"{m['cpu']}, {m['cores']} cores; torch {m['torch']}, torchvision {m['torchvision']}. "
        "`train images/s` is the training dataset's `__getitem__` (decode, augment, to tensor) in one process; "
        "`decode share` is the part of it spent decoding the image file (from shards: reading the record and "
        "decoding it).",
        "",
        markdown_table(header, rows),
        *(["", "Quickstart images are small (see the source column); real ImageNet JPEGs (~0.1-0.2 MP) and "
            "Cityscapes PNGs (2 MP) decode several times slower, so pass `--root` for numbers to plan workers by."]
          if s["data"] == "quickstart data" else []),
    ])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--datamodules", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                        default=list(DATAMODULES),
                        help=f"comma-separated, from {', '.join(DATAMODULES)} (default: all)")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="timing per datamodule, and again for decoding (default: 3)")
    parser.add_argument("--root", help="folder with one dataset per datamodule name (<root>/imagenet, ...); "
                                       "default: quickstart data in a temporary folder")
    parser.add_argument("--source", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                        default=["folder"], help="folder (one file per image, the default), shards (ImageNet "
                                                 "from LitData shards, datamodules.streaming), or folder,shards")
    parser.add_argument("--shards", help="converted ImageNet shards (a folder or s3:// URL) for --source shards; "
                                         "default: the quickstart data, converted into a temporary folder")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and OpenCV threads; 1 (the default) is what a DataLoader worker gives torch")
    parser.add_argument("--json", default=str(RESULTS_DIR / "data.json"),
                        help="where to write the results (default: bench/results/data.json)")
    args = parser.parse_args(argv)
    if not args.source or set(args.source) - {"folder", "shards"}:
        parser.error(f"--source takes folder, shards or folder,shards; got {','.join(args.source)}")
    if "shards" in args.source and args.root and not args.shards:
        parser.error("--source shards with --root needs --shards: convert once with "
                     "python -m datamodules.streaming convert --data imagenet --root ... --output ...")
    unknown = [d for d in args.datamodules if d not in DATAMODULES]
    if unknown:
        parser.error(f"unknown datamodule(s) {', '.join(unknown)}; choose from {', '.join(DATAMODULES)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import cv2  # albumentations' backend; its own thread pool would make one "worker" use every core

    threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    try:
        results = _measure_all(args)
    finally:  # main() also runs inside other processes (the tests)
        torch.set_num_threads(threads[0])
        cv2.setNumThreads(threads[1])
    payload = {"machine": machine_info(),
               "settings": {"datamodules": args.datamodules, "source": args.source, "seconds": args.seconds,
                            "threads": args.threads,
                            "data": args.root or "quickstart data"},
               "results": results}
    print(report(payload))
    print(f"\nwrote {write_json(args.json, payload)}", file=sys.stderr)
    return payload


def _measure_all(args: argparse.Namespace) -> dict:
    results = {}
    with tempfile.TemporaryDirectory(prefix="fishnet-bench-data-") as tmp:
        base = Path(args.root) if args.root else Path(tmp)
        for name in args.datamodules:
            try:
                load_datamodule_class(name)
            except (ImportError, AttributeError) as err:
                print(f"note: skipping {name}: {err}", file=sys.stderr)
                results[name] = {"skipped": f"not importable ({err})"}
                continue
            if "folder" in args.source:
                print(f"{name} ...", file=sys.stderr, flush=True)
                try:
                    results[name] = measure(name, base / name, quickstart=not args.root, seconds=args.seconds)
                except Exception as err:  # one datamodule failing must not end the run
                    results[name] = {"error": f"failed: {type(err).__name__}: {err}"[:160]}
            if "shards" in args.source and name == "imagenet":
                print(f"{name} from shards ...", file=sys.stderr, flush=True)
                try:
                    results[f"{name} (shards)"] = measure_shards(args.shards, args.seconds, Path(tmp))
                except Exception as err:
                    results[f"{name} (shards)"] = {"error": f"failed: {type(err).__name__}: {err}"[:160]}
    return results


if __name__ == "__main__":
    main()
