"""Training images/s of ``fishnet-pl fit`` against a plain PyTorch loop, taking turns: ``python -m bench.fit``.

    python -m bench.fit                                   # fishnet150, batch 8, 224x224, workers 1 and 2
    python -m bench.fit --root /data/imagenet --workers 4 --threads 4

The Lightning side is ``fishnet-pl fit`` as users run it (``fishnet_pl.cli.build_cli``): ``ImageNetDataModule`` with
its augmentation and loader, CSV logging, the learning-rate monitor and images/s callbacks, the module's own
checkpointing (each run's checkpoints are written after its last timed step), progress bar off. The plain side
is a loop in the style of the FishNet authors' ``main.py``: the same timm model from ``timm.create_model``, the
same dataset class and augmentation (``datamodules.imagenet``'s ``ImageDataset`` and ``train_transform``) in a
torch ``DataLoader`` with the same batch size and workers, the same SGD (learning rate, momentum, weight decay),
fp32 in NCHW, no Lightning.

Each round runs every side once: a fresh ``fit`` (and a fresh loader iterator for the plain loop, a new epoch
as in ``main.py``) of ``--warmup`` + ``--steps`` steps, the warm-up untimed; the sides take turns (their order
reversed every other round), so a change of machine load hits them alike, and each side's median round is
its headline. Two ratios to plain fp32: Lightning fp32 (the loop's overhead) and Lightning with the recommended
settings (``--trainer.precision bf16-mixed --model.channels_last true``). The data-wait share is the part of the
step period spent waiting for the next batch: for Lightning from one batch's end hook to the next one's start
hook (which also holds its logging and scheduler step), for the plain loop the time blocked in
``next(iterator)``.

Without ``--root`` the data is an ImageNet-layout folder of 224x224 JPEGs written into a temporary folder
(8 classes, as many images as one round's steps take): real ImageNet JPEGs (~0.1-0.2 MP) decode slower, so
pass ``--root`` to plan workers by.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

import timm
import torch
from torch import nn

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
from datamodules.imagenet import ImageDataset, list_images, train_transform
from fishnet_pl.cli import build_cli
from fishnet_pl.module import FishNetModule

CLASSES = 8
SOURCE_SIZE = 224  # side of the written JPEGs
MODES = {"fp32": "fishnet-pl fit, fp32",
         "recommended": "fishnet-pl fit, bf16-mixed + channels_last"}
PLAIN = "plain PyTorch loop, fp32"
AIMS = {"fp32": 0.95, "recommended": 1.8}  # issue 24: the loop's overhead; the recommended settings' speed-up
MOMENTUM, WEIGHT_DECAY = 0.9, 1e-4
#: Datamodules whose data wait ``--datamodules`` also measures (Lightning only, no plain twin): their quickstart
#: recipe with ``--model``, on their quickstart data written into the temporary folder.
OTHER_DATAMODULES = {"cityscapes": ("segmentation.yaml", "datamodules.quickstart_segmentation", "write_cityscapes"),
                     "coco": ("detection.yaml", "datamodules.quickstart_detection", "write_detection")}
QUICKSTARTS = Path(__file__).resolve().parents[1] / "configs" / "quickstart"


def learning_rate(batch_size: int) -> float:
    """The authors' rule, 0.1 per 256 images (``FishNetModule``'s default for SGD), given to both sides."""
    return 0.1 * batch_size / 256


def channels_last_supported() -> bool:
    """Whether ``FishNetModule`` takes ``channels_last`` (the recommended mode passes it only then)."""
    return "channels_last" in inspect.signature(FishNetModule).parameters


def write_dataset(root: Path, images: int) -> Path:
    """An ImageNet-layout folder: ``CLASSES`` class folders holding ``images`` training JPEGs in all, one
    validation JPEG per class (``ImageNetDataModule`` needs the split)."""
    per_class = math.ceil(images / CLASSES)
    for label in range(CLASSES):
        wnid = f"n{label:08d}"
        write_jpegs(root / "train" / wnid, per_class, SOURCE_SIZE, seed=label)
        write_jpegs(root / "val" / wnid, 1, SOURCE_SIZE, seed=1000 + label)
    return root


# ---------------------------------------------------------------------------------------------- the Lightning side
def fit_args(args: argparse.Namespace, root: Path, run_dir: Path, workers: int, mode: str) -> list[str]:
    """The ``fishnet-pl fit`` command line of one round (without the leading ``fishnet-pl``)."""
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir), "name": ""}}
    callbacks = [{"class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
                  "init_args": {"logging_interval": "step"}},  # as configs/trainer/default.yaml has them
                 {"class_path": "fishnet_pl.callbacks.ImagesPerSecond"},
                 {"class_path": "bench.StepTimes"}]
    command = [
        "fit", "--seed_everything", "42",
        "--model.backbone", args.model, "--model.head", "fishnet_pl.tasks.ClassificationHead",
        "--model.lr", str(learning_rate(args.batch_size)), "--model.momentum", str(MOMENTUM),
        "--model.weight_decay", str(WEIGHT_DECAY),
        "--data", "datamodules.imagenet.ImageNetDataModule", "--data.root", str(root),
        "--data.batch_size", str(args.batch_size), "--data.num_workers", str(workers),
        "--data.image_size", str(args.image_size),
        "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.max_steps", str(args.warmup + args.steps),
        "--trainer.num_sanity_val_steps", "0",  # before the timed steps anyway: spares the bench's time
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.logger", json.dumps(logger), "--trainer.callbacks", json.dumps(callbacks),
    ]
    if mode == "recommended":
        command += ["--trainer.precision", "bf16-mixed"]
        if channels_last_supported():
            command += ["--model.channels_last", "true"]
    return command


def run_fit(command: list[str]):
    """``build_cli(command)`` without the notes a bench's short fit makes Lightning print; returns the CLI."""
    with command_line_of_its_own(), warnings.catch_warnings():
        # An epoch of a few steps logs nothing at the default log_every_n_steps (50), which is kept: a real epoch
        # logs every 50 steps, a cost too small to time in a few. And max_steps ends the fit before validation, so
        # the epoch-end checkpoint has no val/acc1 to rank by.
        warnings.filterwarnings("ignore", message="The number of training batches")
        warnings.filterwarnings("ignore", message=r"`ModelCheckpoint\(monitor=.*could not find the monitored key")
        return build_cli(command)


def lightning_round(args: argparse.Namespace, root: Path, run_dir: Path, workers: int, mode: str) -> dict:
    """One ``fishnet-pl fit`` of ``warmup + steps`` steps: its timed stretch."""
    cli = run_fit(fit_args(args, root, run_dir, workers, mode))
    (times,) = [c for c in cli.trainer.callbacks if isinstance(c, StepTimes)]
    return {**stretch_rate(times.starts, times.ends, args.warmup, args.batch_size),
            "torch_threads": times.torch_threads}


def datamodule_round(args: argparse.Namespace, name: str, root: Path, run_dir: Path, workers: int) -> dict:
    """One ``fishnet-pl fit`` of another datamodule's quickstart recipe (its batch, sizes and precision) with
    ``--model`` from scratch, ``warmup + steps`` steps without validation: its timed stretch."""
    recipe = OTHER_DATAMODULES[name][0]
    cli = run_fit(["fit", "--config", str(QUICKSTARTS / recipe), "--model.backbone", args.model,
                   "--model.backbone_weights", "null", "--data.init_args.root", str(root),
                   "--data.init_args.quickstart", "false", "--data.init_args.num_workers", str(workers),
                   "--trainer.max_steps", str(args.warmup + args.steps), "--trainer.limit_val_batches", "0",
                   "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
                   "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(run_dir),
                   "--trainer.callbacks+=bench.StepTimes"])
    (times,) = [c for c in cli.trainer.callbacks if isinstance(c, StepTimes)]
    return stretch_rate(times.starts, times.ends, args.warmup, cli.datamodule.batch_size)


# -------------------------------------------------------------------------------------------- the plain PyTorch side
class PlainLoop:
    """The authors' ``main.py`` loop on our data: model, criterion and SGD built once; every round is a new epoch
    of the ``DataLoader`` (fresh workers, as theirs), its steps timed as ``train`` there times them."""

    def __init__(self, args: argparse.Namespace, root: Path):
        train = root / "train"
        classes = sorted(p.name for p in train.iterdir() if p.is_dir())
        samples = [(path, label) for label, wnid in enumerate(classes) for path in list_images(train / wnid)]
        self.dataset = ImageDataset(samples, train_transform(args.image_size))
        if len(samples) // args.batch_size < args.warmup + args.steps:  # each round stays inside one epoch
            raise SystemExit(f"python -m bench.fit: {train} holds {len(samples)} images, fewer than --warmup + "
                             f"--steps = {args.warmup + args.steps} batches of {args.batch_size}: lower them")
        self.model = timm.create_model(args.model, num_classes=len(classes))
        # Their Normalize ran in the transform; our dataset gives [0, 1] images, normalised here as the module does.
        cfg = self.model.pretrained_cfg
        self.mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1)
        self.std = torch.tensor(cfg["std"]).view(1, -1, 1, 1)
        self.criterion = nn.CrossEntropyLoss()
        self.optimizer = torch.optim.SGD(self.model.parameters(), learning_rate(args.batch_size), momentum=MOMENTUM,
                                         weight_decay=WEIGHT_DECAY)
        self.batch_size, self.warmup, self.steps = args.batch_size, args.warmup, args.steps
        self.topk = (1, min(5, len(classes)))

    def run(self, workers: int) -> dict:
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True,
                                             num_workers=workers, pin_memory=torch.cuda.is_available(),
                                             drop_last=True)
        self.model.train()
        starts, ends, waits = [], [], []
        batches = iter(loader)
        for _ in range(self.warmup + self.steps):
            asked = time.perf_counter()
            batch = next(batches)
            starts.append(time.perf_counter())
            waits.append(starts[-1] - asked)
            input, target = (batch["image"] - self.mean) / self.std, batch["label"]
            output = self.model(input)
            loss = self.criterion(output, target)
            accuracy(output.detach(), target, self.topk)  # their loop computes top-1/top-5 every step
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            ends.append(time.perf_counter())
        del batches  # ends the epoch: its workers stop
        return {**stretch_rate(starts, ends, self.warmup, self.batch_size, waits),
                "torch_threads": torch.get_num_threads()}


def accuracy(output: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...]) -> list[float]:
    """Top-k accuracy in percent, for each k."""
    pred = output.topk(max(topk), dim=1).indices
    correct = pred.eq(target.view(-1, 1))
    return [100.0 * correct[:, :k].any(dim=1).float().mean().item() for k in topk]


# ------------------------------------------------------------------------------------------------------- the run
def run(args: argparse.Namespace) -> dict:
    load_before = machine_info()["load_average_1min"]
    with tempfile.TemporaryDirectory(prefix="fishnet-bench-fit-") as tmp:
        tmp = Path(tmp)
        root = Path(args.root) if args.root else write_dataset(tmp / "imagenet", (args.warmup + args.steps)
                                                                * args.batch_size)
        plain = PlainLoop(args, root)
        sides = ["plain", *args.modes]
        rounds: dict[str, dict[str, list[dict]]] = {str(w): {side: [] for side in sides} for w in args.workers}
        for workers in args.workers:
            for number in range(args.rounds):
                for side in sides if number % 2 == 0 else reversed(sides):
                    print(f"workers {workers}, round {number + 1}/{args.rounds}: {side} ...", file=sys.stderr,
                          flush=True)
                    if side == "plain":
                        result = plain.run(workers)
                    else:
                        run_dir = tmp / "runs" / f"{side}_w{workers}_r{number}"
                        result = lightning_round(args, root, run_dir, workers, side)
                    rounds[str(workers)][side].append(result)
        others = []
        for name in args.datamodules:
            module, function = OTHER_DATAMODULES[name][1:]
            data = getattr(importlib.import_module(module), function)(tmp / name)
            for workers in args.workers:
                measured = [datamodule_round(args, name, data, tmp / "runs" / f"{name}_w{workers}_r{number}", workers)
                            for number in range(args.rounds)]
                others.append({"datamodule": name, "workers": workers, "recipe": OTHER_DATAMODULES[name][0],
                               **summarize(measured), "per_round": measured})
    machine = machine_info()
    machine["load_average_1min"] = [load_before, machine["load_average_1min"]]  # at start and end
    results = []
    for workers, by_side in rounds.items():
        reference = summarize(by_side["plain"])
        for side, side_rounds in by_side.items():
            summary = summarize(side_rounds)
            row = {"workers": int(workers), "side": side, "run": PLAIN if side == "plain" else MODES[side],
                   **summary, "vs_plain_fp32": summary["images_per_s"] / reference["images_per_s"],
                   "aim": AIMS.get(side), "torch_threads": side_rounds[0]["torch_threads"], "per_round": side_rounds}
            results.append(row)
    recommended = "bf16-mixed" + (" + channels_last" if channels_last_supported() else
                                  " only (FishNetModule has no channels_last argument yet)")
    return {
        "machine": machine,
        "settings": {"model": args.model, "batch_size": args.batch_size, "image_size": args.image_size,
                     "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "workers": args.workers,
                     "threads": torch.get_num_threads(), "modes": args.modes, "recommended": recommended,
                     "learning_rate": learning_rate(args.batch_size), "data": args.root or
                     f"{CLASSES} classes of {SOURCE_SIZE}x{SOURCE_SIZE} JPEGs written to a temporary folder"},
        "results": results,
        "datamodules": others,
    }


def report(payload: dict) -> str:
    s, m = payload["settings"], payload["machine"]
    header = ["workers", "run", "images/s (median)", "best round", "data wait", "x plain fp32", "aim"]
    rows = [[r["workers"], r["run"], f"{r['images_per_s']:.2f}", f"{r['images_per_s_best']:.2f}",
             f"{100 * r['data_wait_share']:.0f}%", f"{r['vs_plain_fp32']:.2f}",
             f">= {r['aim']:g}" if r["aim"] else None] for r in payload["results"]]
    loads = m["load_average_1min"]
    return "\n".join([
        f"## End to end: training {s['model']}, batch {s['batch_size']}, {s['image_size']}x{s['image_size']}, "
        f"{s['threads']} thread(s)",
        "",
        f"{m['cpu']}, {m['cores']} cores, load average {loads[0]:.1f} -> {loads[1]:.1f}; torch {m['torch']}. "
        f"{s['rounds']} round(s) of {s['warmup']} warm-up + {s['steps']} timed steps per side, the sides taking "
        f"turns; data: {s['data']}. Recommended: {s['recommended']}. `data wait`: the share of the step period "
        "spent waiting for the next batch (Lightning: between one batch's end hook and the next one's start hook).",
        "",
        markdown_table(header, rows),
        *([] if not payload["datamodules"] else [
            "",
            f"Other datamodules, `fishnet-pl fit` of their quickstart recipe with {s['model']} on their quickstart "
            "data (its batch, image sizes and precision):",
            "",
            markdown_table(["datamodule", "recipe", "workers", "images/s (median)", "data wait"],
                           [[d["datamodule"], f"configs/quickstart/{d['recipe']}", d["workers"],
                             f"{d['images_per_s']:.2f}", f"{100 * d['data_wait_share']:.0f}%"]
                            for d in payload["datamodules"]])]),
    ])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.fit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="fishnet150", help="timm model name (default: fishnet150)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step (default: 8)")
    parser.add_argument("--image-size", type=int, default=224, help="training crop side (default: 224)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side and round (default: 5)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps before them, at least 1: workers starting, first allocations (default: 2)")
    parser.add_argument("--rounds", type=int, default=3, help="turns of every side (default: 3)")
    parser.add_argument("--workers", type=lambda s: [int(x) for x in comma_separated(s)], default=[1, 2],
                        help="comma-separated data-loading worker counts, each measured (default: 1,2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the training process (default: torch's, one per core)")
    parser.add_argument("--modes", type=comma_separated, default=list(MODES),
                        help=f"Lightning runs to time against the plain fp32 loop: {', '.join(MODES)} (default: both)")
    parser.add_argument("--root", help="an ImageNet-layout folder (train/<class>/*.JPEG, val/<class>/...) to read; "
                                       "default: JPEGs written into a temporary folder")
    parser.add_argument("--datamodules", type=comma_separated, default=[],
                        help="also the data wait of these datamodules' quickstart recipes: "
                             f"{', '.join(OTHER_DATAMODULES)} (default: none)")
    parser.add_argument("--json", default=str(RESULTS_DIR / "fit.json"),
                        help="where to write the results (default: bench/results/fit.json)")
    args = parser.parse_args(argv)
    unknown = [mode for mode in args.modes if mode not in MODES]
    if unknown or not args.modes:
        parser.error(f"--modes takes {', '.join(MODES)}; got {','.join(args.modes) or 'nothing'}")
    if set(args.datamodules) - set(OTHER_DATAMODULES):
        parser.error(f"--datamodules takes {', '.join(OTHER_DATAMODULES)}; got {','.join(args.datamodules)}")
    check_turns(parser, args, "step")
    if args.root and not (Path(args.root) / "train").is_dir():
        parser.error(f"--root {args.root}: no train/ folder in it (expected train/<class>/*.JPEG, ImageNet's layout)")
    return args


def main(argv: list[str] | None = None) -> dict:
    return run_bench(parse_args(argv), run, report)


if __name__ == "__main__":
    main()
