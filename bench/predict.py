"""Images/s of ``fishnet-pl predict`` against ``load_network`` in a plain loop: ``python -m bench.predict``.

    python -m bench.predict                               # fishnet150, batch 8, 224x224, workers 1 and 2
    python -m bench.predict --ckpt runs/imagenet/last.ckpt --root photos/

The Lightning side is ``fishnet-pl predict --ckpt_path CKPT --data.predict_root DIR`` as users run it
(``fishnet_pl.cli.build_cli``): ``PredictFolderDataModule`` filled in from the checkpoint, the module's
``predict_step``, the prediction writer's ``predictions.jsonl``, progress bar off. The plain side is what a
PyTorch program does with ``fishnet_pl.load_network(ckpt, fuse=True)``: the same images read and prepared by the
same evaluation transform (``datamodules.predict.ImageFolderDataset`` with the checkpoint's recorded
``eval_transform``) in a torch ``DataLoader`` with the same batch size and workers, normalised with
``net.preprocessing``'s mean and std, the fused network's softmax and top-5 under ``torch.inference_mode``.

Each round runs both once over the folder (a fresh ``predict``; a fresh loader iterator for the plain loop),
the first ``--warmup`` batches untimed, the sides taking turns (their order reversed every other round);
each side's median round is its headline, and the ratio is Lightning's images/s over the plain loop's.
A last batch smaller than the others is left out of both timings.

Without ``--ckpt``, a checkpoint of ``--model`` is made by a one-step ``fishnet-pl fit`` on JPEGs written into
a temporary folder (no download); without ``--root``, the folder to predict holds ``(warmup + steps) x
batch-size`` 224x224 JPEGs written there too.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from bench import (
    RESULTS_DIR,
    StepTimes,
    check_turns,
    comma_separated,
    command_line_of_its_own,
    machine_info,
    markdown_table,
    run_bench,
    stretch_rate,
    summarize,
    write_jpegs,
)
from bench.fit import SOURCE_SIZE, fit_args, run_fit, write_dataset
from datamodules.common import find_images
from datamodules.predict import ImageFolderDataset, import_object
from fishnet_pl.checkpoint import read_checkpoint, recorded_dataset_info
from fishnet_pl.cli import build_cli
from fishnet_pl.inference import load_network

SIDES = {"plain": "plain loop, load_network(ckpt, fuse=True)", "lightning": "fishnet-pl predict"}
AIM = 0.95  # issue 24: predict within 5% of the plain loop


def make_checkpoint(args: argparse.Namespace, folder: Path) -> Path:
    """A checkpoint of ``args.model`` as ``fishnet-pl fit`` writes it: one training step on a small written dataset."""
    root = write_dataset(folder / "imagenet", args.batch_size)
    run_dir = folder / "run"
    fit = SimpleNamespace(model=args.model, batch_size=args.batch_size, image_size=args.image_size, warmup=0, steps=1)
    run_fit(fit_args(fit, root, run_dir, workers=0, mode="fp32"))
    return run_dir / "last.ckpt"  # the link to the run's last checkpoint


def full_batches(count: int, batch_size: int) -> int:
    """Batches of ``batch_size`` among ``count`` images: the timed ones and their warm-up."""
    return count // batch_size


# ---------------------------------------------------------------------------------------------- the Lightning side
def lightning_round(args: argparse.Namespace, ckpt: Path, root: Path, out: Path, workers: int, batches: int) -> dict:
    """One ``fishnet-pl predict`` over ``root``: its timed stretch."""
    command = ["predict", "--ckpt_path", str(ckpt), "--data.predict_root", str(root),
               "--data.batch_size", str(args.batch_size), "--data.num_workers", str(workers),
               "--predict_dir", str(out), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
               "--trainer.enable_progress_bar", "false",
               "--trainer.callbacks", json.dumps([{"class_path": "bench.StepTimes"}])]
    with command_line_of_its_own():
        cli = build_cli(command)
    (times,) = [c for c in cli.trainer.callbacks if isinstance(c, StepTimes)]
    return {**stretch_rate(times.starts[:batches], times.ends[:batches], args.warmup, args.batch_size),
            "torch_threads": times.torch_threads}


# -------------------------------------------------------------------------------------------- the plain PyTorch side
class PlainLoop:
    """``load_network(ckpt, fuse=True)`` over the folder's images, prepared as the checkpoint records."""

    def __init__(self, args: argparse.Namespace, ckpt: Path, root: Path):
        self.network = load_network(ckpt, fuse=True)
        # The evaluation transform fishnet-pl predict applies: the one the checkpoint records of its training data.
        predict = recorded_dataset_info(read_checkpoint(ckpt)).predict
        transform = import_object(predict["transform"])(**predict.get("transform_kwargs", {}))
        self.dataset = ImageFolderDataset(find_images(root), transform)
        self.mean = torch.tensor(self.network.preprocessing["mean"]).view(1, -1, 1, 1)
        self.std = torch.tensor(self.network.preprocessing["std"]).view(1, -1, 1, 1)
        self.batch_size, self.warmup = args.batch_size, args.warmup

    def run(self, workers: int, batches: int) -> dict:
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, num_workers=workers)
        starts, ends, waits = [], [], []
        predictions = []
        stream = iter(loader)
        for _ in range(batches):
            asked = time.perf_counter()
            batch = next(stream)
            starts.append(time.perf_counter())
            waits.append(starts[-1] - asked)
            with torch.inference_mode():
                probs = self.network((batch["image"] - self.mean) / self.std).softmax(dim=1)
                scores, classes = probs.topk(min(5, probs.shape[1]), dim=1)
            predictions += zip(batch["path"], classes.tolist(), scores.tolist())
            ends.append(time.perf_counter())
        del stream
        return {**stretch_rate(starts, ends, self.warmup, self.batch_size, waits),
                "torch_threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------------------- the run
def run(args: argparse.Namespace) -> dict:
    load_before = machine_info()["load_average_1min"]
    with tempfile.TemporaryDirectory(prefix="fishnet-bench-predict-") as tmp:
        tmp = Path(tmp)
        ckpt = Path(args.ckpt) if args.ckpt else make_checkpoint(args, tmp / "checkpoint")
        root = Path(args.root) if args.root else tmp / "images"
        if not args.root:
            write_jpegs(root, (args.warmup + args.steps) * args.batch_size, SOURCE_SIZE, seed=2000)
        count = len(find_images(root))
        batches = full_batches(count, args.batch_size)
        if batches <= args.warmup:
            raise SystemExit(f"python -m bench.predict: {root} holds {count} images, {batches} full batch(es) of "
                             f"{args.batch_size}: need more than --warmup {args.warmup}")
        plain = PlainLoop(args, ckpt, root)
        sides = list(SIDES)
        rounds: dict[str, dict[str, list[dict]]] = {str(w): {side: [] for side in sides} for w in args.workers}
        for workers in args.workers:
            for number in range(args.rounds):
                for side in sides if number % 2 == 0 else reversed(sides):
                    print(f"workers {workers}, round {number + 1}/{args.rounds}: {side} ...", file=sys.stderr,
                          flush=True)
                    if side == "plain":
                        result = plain.run(workers, batches)
                    else:
                        out = tmp / "predictions" / f"w{workers}_r{number}"
                        result = lightning_round(args, ckpt, root, out, workers, batches)
                    rounds[str(workers)][side].append(result)
    machine = machine_info()
    machine["load_average_1min"] = [load_before, machine["load_average_1min"]]  # at start and end
    results = []
    for workers, by_side in rounds.items():
        reference = summarize(by_side["plain"])
        for side, side_rounds in by_side.items():
            summary = summarize(side_rounds)
            results.append({"workers": int(workers), "side": side, "run": SIDES[side], **summary,
                            "vs_plain": summary["images_per_s"] / reference["images_per_s"],
                            "aim": AIM if side == "lightning" else None,
                            "torch_threads": side_rounds[0]["torch_threads"], "per_round": side_rounds})
    return {
        "machine": machine,
        "settings": {"model": args.model if not args.ckpt else None, "ckpt": args.ckpt,
                     "batch_size": args.batch_size, "image_size": args.image_size if not args.ckpt else None,
                     "images": count, "timed_batches": batches - args.warmup, "warmup": args.warmup,
                     "rounds": args.rounds, "workers": args.workers, "threads": torch.get_num_threads(),
                     "data": args.root or f"{SOURCE_SIZE}x{SOURCE_SIZE} JPEGs written to a temporary folder"},
        "results": results,
    }


def report(payload: dict) -> str:
    s, m = payload["settings"], payload["machine"]
    header = ["workers", "run", "images/s (median)", "best round", "data wait", "x plain", "aim"]
    rows = [[r["workers"], r["run"], f"{r['images_per_s']:.2f}", f"{r['images_per_s_best']:.2f}",
             f"{100 * r['data_wait_share']:.0f}%", f"{r['vs_plain']:.2f}",
             f">= {r['aim']:g}" if r["aim"] else None] for r in payload["results"]]
    model = s["ckpt"] or f"{s['model']} (a one-step checkpoint), {s['image_size']}x{s['image_size']}"
    loads = m["load_average_1min"]
    return "\n".join([
        f"## End to end: predicting with {model}, batch {s['batch_size']}, {s['threads']} thread(s)",
        "",
        f"{m['cpu']}, {m['cores']} cores, load average {loads[0]:.1f} -> {loads[1]:.1f}; torch {m['torch']}. "
        f"{s['rounds']} round(s) of {s['warmup']} warm-up + {s['timed_batches']} timed batches per side, the "
        f"sides taking turns; data: {s['data']}. `data wait`: the share of the batch period spent waiting for the "
        "next batch (Lightning: between one batch's end hook and the next one's start hook).",
        "",
        markdown_table(header, rows),
    ])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="fishnet150",
                        help="timm model name of the checkpoint made without --ckpt (default: fishnet150)")
    parser.add_argument("--ckpt", help="a fishnet-pl classification checkpoint; default: one made by a one-step fit")
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch (default: 8)")
    parser.add_argument("--image-size", type=int, default=224,
                        help="evaluation crop side of the checkpoint made without --ckpt (default: 224)")
    parser.add_argument("--steps", type=int, default=5,
                        help="timed batches per side and round, without --root (default: 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches before them, at least 1 (default: 2)")
    parser.add_argument("--rounds", type=int, default=3, help="turns of each side (default: 3)")
    parser.add_argument("--workers", type=lambda s: [int(x) for x in comma_separated(s)], default=[1, 2],
                        help="comma-separated data-loading worker counts, each measured (default: 1,2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the predicting process (default: torch's, one per core)")
    parser.add_argument("--root", help="folder of images to predict (searched recursively; every full batch is "
                                       "timed after the warm-up); default: JPEGs written into a temporary folder")
    parser.add_argument("--json", default=str(RESULTS_DIR / "predict.json"),
                        help="where to write the results (default: bench/results/predict.json)")
    args = parser.parse_args(argv)
    check_turns(parser, args, "batch", model=not args.ckpt)
    if args.ckpt and not Path(args.ckpt).is_file():
        parser.error(f"--ckpt {args.ckpt}: no such file (a checkpoint of fishnet-pl fit, e.g. runs/.../last.ckpt)")
    if args.root and not Path(args.root).is_dir():
        parser.error(f"--root {args.root}: no such folder (a folder of images to predict)")
    return args


def main(argv: list[str] | None = None) -> dict:
    return run_bench(parse_args(argv), run, report)


if __name__ == "__main__":
    main()
