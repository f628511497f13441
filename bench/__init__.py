"""Benchmarks: ``python -m bench.backbones`` (models), ``python -m bench.ops`` (FishNet's resampling ops),
``python -m bench.data`` (input pipelines), and end to end ``python -m bench.fit`` (``fishnet-pl fit`` against a
plain PyTorch training loop), ``python -m bench.predict`` (``fishnet-pl predict`` against ``load_network``
in a plain loop) and ``python -m bench.multitask`` (a multi-task step against the single-task steps).

They print Markdown tables; all but ops also write JSON under ``bench/results/`` (gitignored) with
the machine and versions, since absolute numbers only mean something next to the machine that produced them.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | None = None) -> dict:
    """CPU, cores, threads, library versions and (for CUDA) the GPU: what a reader needs to compare runs."""
    import timm
    import torchvision

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "timm": timm.__version__,  # builds every model of bench.backbones
        "torchvision": torchvision.__version__,
        "device": str(device) if device is not None else "cpu",
        # Runnable processes averaged over 1 minute: above the core count, other work shared the cores.
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured Markdown table; ``None`` cells print as ``-``."""
    cells = [[("-" if c is None else str(c)) for c in row] for row in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in cells)])


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def write_jpegs(folder: str | os.PathLike, count: int, size: int, seed: int = 0) -> list[Path]:
    """``count`` ``size`` x ``size`` JPEGs (quality 90) in ``folder``: smooth colour fields with noise, which
    compress and decode like photographs rather than flat or pure-noise images. Deterministic."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        pixels = np.clip(np.asarray(coarse, np.float32) + rng.normal(0, 12, (size, size, 3)), 0, 255)
        paths.append(folder / f"img_{i:05d}.JPEG")
        Image.fromarray(pixels.astype(np.uint8)).save(paths[-1], quality=90)
    return paths


class StepTimes(L.Callback):
    """``time.perf_counter()`` at the start and end of every training or prediction batch, through Lightning's
    public hooks: what ``stretch_rate`` turns into images/s and the share of time spent waiting for data.

    Lightning fetches a batch between one batch's end hook and the next one's start hook, so that gap is the
    loop's wait for data (plus its own bookkeeping there: logging, the LR scheduler's step)."""

    def __init__(self):
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.torch_threads: int | None = None

    def _start(self) -> None:
        self.torch_threads = torch.get_num_threads()  # as the loop runs: Lightning must not have changed it
        self.starts.append(time.perf_counter())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._start()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.ends.append(time.perf_counter())


def stretch_rate(starts: list[float], ends: list[float], warmup: int, batch_size: int,
                 waits: list[float] | None = None) -> dict:
    """Images/s and data-wait share of the steps after the first ``warmup`` (at least 1), each of ``batch_size``
    images: over the time from the end of the last warm-up step to the end of the last step.

    ``starts`` and ``ends`` are when each step began and ended; ``waits`` the time each step waited for its batch
    (default: from the previous step's end to its start, as ``StepTimes`` sees Lightning's loop)."""
    if warmup < 1 or len(ends) <= warmup or len(starts) != len(ends):
        raise ValueError(f"need more than warmup={warmup} (>= 1) steps with start and end times, got "
                         f"{len(starts)} starts and {len(ends)} ends")
    if waits is None:
        waits = [0.0] + [start - end for start, end in zip(starts[1:], ends[:-1])]
    seconds = ends[-1] - ends[warmup - 1]
    steps = len(ends) - warmup
    return {"images_per_s": steps * batch_size / seconds, "steps": steps, "seconds": seconds,
            "data_wait_share": sum(waits[warmup:]) / seconds}


def summarize(rounds: list[dict]) -> dict:
    """The median round of a side (its headline, robust to a round another process slowed), the best, and the
    median data-wait share."""
    rates = [r["images_per_s"] for r in rounds]
    return {"images_per_s": statistics.median(rates), "images_per_s_best": max(rates),
            "data_wait_share": statistics.median(r["data_wait_share"] for r in rounds), "rounds": len(rounds)}


@contextlib.contextmanager
def command_line_of_its_own():
    """Run ``fishnet_pl.cli.build_cli(args)`` inside a bench without LightningCLI seeing the bench's own options in
    ``sys.argv`` (it warns when it gets both)."""
    argv = sys.argv
    sys.argv = argv[:1]
    try:
        yield
    finally:
        sys.argv = argv


def comma_separated(text: str) -> list[str]:
    """An option's comma-separated values (``--workers 1,2``), blanks dropped."""
    return [x.strip() for x in text.split(",") if x.strip()]


def run_bench(args, run, report) -> dict:
    """A bench's ``main``: ``run(args)`` with ``--threads`` torch threads for the run only and freed memory kept as
    ``fishnet-pl`` keeps it (process-wide: a plain loop gets it too; ``bench.backbones --malloc default`` leaves the C
    library's default, noted in ``args.malloc_kept``), then its table printed and its JSON written."""
    import fishnet_pl

    threads = torch.get_num_threads()
    args.malloc_kept = getattr(args, "malloc", "keep") == "keep" and fishnet_pl.keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        payload = run(args)
    finally:  # main() also runs inside other processes (the tests)
        torch.set_num_threads(threads)
    print(report(payload))
    print(f"\nwrote {write_json(args.json, payload)}", file=sys.stderr)
    return payload


def check_turns(parser, args, unit: str, model: bool = True) -> None:
    """The options every end-to-end bench shares, or a parser error saying what to give: ``--warmup``,
    ``--steps``, ``--rounds`` (each at least 1; ``unit`` names a step, "step" or "batch"), ``--workers`` and, with
    ``model``, ``--model``."""
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        parser.error(f"--warmup, --steps and --rounds must be at least 1 (the first timed {unit} needs the end of "
                     "the one before it)")
    if not args.workers or min(args.workers) < 0:
        parser.error(f"--workers takes counts >= 0, e.g. 1,2; got {args.workers}")
    if model:
        from bench.backbones import check_model_name

        try:
            check_model_name(args.model)
        except ValueError as err:
            parser.error(str(err))
