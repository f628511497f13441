"""A multi-task training step against the sum of the single-task steps, time and memory: ``python -m bench.multitask``.

    python -m bench.multitask                 # FishNet-150, the recipe's heads, CPU-sized batches, 1 thread
    python -m bench.multitask --device cuda   # the recipe's batches per GPU: cls 32x224, det 2x800x1333, seg 1x512x1024

The multi-task module is the recipe's: the ``MultiTaskHead`` of ``--config`` (``configs/task/multitask.yaml``,
which ``configs/multitask/fishnet150_in1k_coco_cityscapes.yaml`` writes out) on ``--model``, with the config's
freezing (``frozen_stages``, ``freeze_bn``). The single-task modules are its sub-heads alone, each on a backbone of
its own. A step is what ``FishNetModule.training_step`` computes (the head's loss of the batch), then backward
and an SGD step. Every variant gets the same batches, in the formats the datamodules give: images in [0, 1],
ImageNet labels (1000 classes), Cityscapes masks (19 classes), COCO targets (80 classes; boxes, labels and masks
of ``OBJECTS`` objects an image); the detector's ``min_size`` / ``max_size`` are set to the detection images'
sides, so it trains at the size given instead of resizing to 800.

The multi-task step runs the backbone once per task batch, as the single-task steps do, so its time should be
close to their sum, not above it. Its step memory holds the three tasks' activations together until the one
backward, so it should be close to their sum too, while its weights and optimizer state are one backbone's, not
three.

Each round runs every variant in turn (the order reversed every other round, so a change of machine load hits all
alike): ``--warmup`` untimed steps, then ``--steps`` timed ones, the round's time per step their mean. A variant's
headline is its median round; ``x sum`` is the median over rounds of the multi-task step's time over the sum of
the single steps' times in the same round.

Peak memory is ``bench.backbones``' (``peak_memory_bytes``): bytes of tensors allocated during one step above
those live before it (activations, gradients, temporaries); on CUDA from ``torch.cuda.max_memory_allocated``, on
CPU summed from torch.profiler's allocation and free events. Tensors rather than the process's peak RSS, which
would also hold the allocator's caches and what earlier variants freed (so it would need a process per variant)
and oneDNN's scratch buffers: tensor bytes are what a GPU's allocator counts. "state" is the weights and the
optimizer's momentum, held between steps; state + step peak is the memory a training process needs for them.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from bench import RESULTS_DIR, comma_separated, machine_info, markdown_table, run_bench
from bench.backbones import _sync, check_model_name, peak_memory_bytes
from fishnet_pl.module import FishNetModule
from fishnet_pl.tasks import ClassificationHead, DetectionHead, MultiTaskHead, SegmentationHead
from fishnet_pl.tasks.base import as_head

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "task" / "multitask.yaml"
#: Classes of each kind of task: the recipe's datasets (ImageNet, Cityscapes' 19 train ids, COCO's 80).
CLASSES = {ClassificationHead: 1000, SegmentationHead: 19, DetectionHead: 80}
OBJECTS = 7  # instances per COCO train2017 image, on average (860k annotations over 117k images)
#: Per device and kind of task: (batch size, image height x width). CUDA's are the recipe's per GPU; the CPU's are
#: smaller (about 1/10 of the pixels) so that FishNet-150's steps take seconds, not minutes, on one thread.
DEFAULTS = {
    "cuda": {ClassificationHead: (32, (224, 224)), DetectionHead: (2, (800, 1333)), SegmentationHead: (1, (512, 1024))},
    "cpu": {ClassificationHead: (8, (128, 128)), DetectionHead: (1, (320, 512)), SegmentationHead: (1, (256, 512))},
}
#: The model options of a config that change what a step computes.
STEP_OPTIONS = ("frozen_stages", "freeze_bn", "channels_last", "grad_checkpointing")
MULTI = "multi-task"


# ------------------------------------------------------------------------------------------------------- batches
def classification_batch(size: int, shape: tuple[int, int], classes: int, generator: torch.Generator) -> dict:
    return {"image": torch.rand(size, 3, *shape, generator=generator),
            "label": torch.randint(0, classes, (size,), generator=generator)}


def segmentation_batch(size: int, shape: tuple[int, int], classes: int, generator: torch.Generator) -> dict:
    """Regions of 32x32 pixels of one class each, as many class boundaries as a street scene."""
    coarse = torch.randint(0, classes, (size, -(-shape[0] // 32), -(-shape[1] // 32)), generator=generator)
    mask = coarse.repeat_interleave(32, 1).repeat_interleave(32, 2)[:, :shape[0], :shape[1]]
    return {"image": torch.rand(size, 3, *shape, generator=generator), "mask": mask.contiguous()}


def detection_batch(size: int, shape: tuple[int, int], classes: int, generator: torch.Generator) -> dict:
    """``OBJECTS`` boxes an image, 5-50% of its sides, each with its label and a mask filling it."""
    height, width = shape
    images, targets = [], []
    for _ in range(size):
        sides = torch.rand(OBJECTS, 2, generator=generator) * 0.45 + 0.05
        corners = torch.rand(OBJECTS, 2, generator=generator) * (1 - sides)
        scale = torch.tensor([width, height], dtype=torch.float32)
        boxes = torch.cat([corners * scale, (corners + sides) * scale], 1).round()
        masks = torch.zeros(OBJECTS, height, width, dtype=torch.uint8)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
            mask[y0:y1, x0:x1] = 1
        images.append(torch.rand(3, height, width, generator=generator))
        targets.append({"boxes": boxes, "labels": torch.randint(1, classes + 1, (OBJECTS,), generator=generator),
                        "masks": masks})
    return {"image": images, "target": targets}


BATCHES: dict[type, Callable[..., dict]] = {ClassificationHead: classification_batch,
                                             SegmentationHead: segmentation_batch, DetectionHead: detection_batch}


def to_device(batch, device: torch.device):
    """``batch`` (tensors in dicts and lists) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, list):
        return [to_device(value, device) for value in batch]
    return batch


# ------------------------------------------------------------------------------------------------------- variants
def read_tasks(path: Path) -> tuple[dict[str, dict], dict, dict]:
    """The sub-head configs of ``path``'s ``model.head`` (a ``MultiTaskHead``), its other head arguments and its
    model options that change a step; a ``SystemExit`` naming the file unless it holds such a head."""
    try:
        model = (yaml.safe_load(Path(path).read_text()) or {}).get("model") or {}
    except (OSError, yaml.YAMLError) as err:
        raise SystemExit(f"python -m bench.multitask: cannot read --config {path}: {err}") from None
    head = model.get("head") or {}
    if not str(head.get("class_path", "")).endswith("MultiTaskHead") or not head.get("init_args", {}).get("tasks"):
        raise SystemExit(f"python -m bench.multitask: --config {path} has no model.head of class_path "
                         "fishnet_pl.tasks.MultiTaskHead with init_args.tasks (e.g. configs/task/multitask.yaml)")
    init_args = copy.deepcopy(head["init_args"])
    tasks = init_args.pop("tasks")
    return tasks, init_args, {key: model[key] for key in STEP_OPTIONS if key in model}


def kind_of(config: dict) -> type:
    """The head class of a sub-head config, one the bench makes batches for."""
    kind = type(as_head(config))
    if kind not in BATCHES:
        raise ValueError(f"the bench makes batches for {', '.join(k.__name__ for k in BATCHES)}; got {kind.__name__}")
    return kind


class Variant:
    """A module, its SGD and its batch: one training step at a time."""

    def __init__(self, module: FishNetModule, batch: dict, device: torch.device):
        self.module = module.to(device).train()
        self.batch = to_device(batch, device)
        # A small learning rate, as bench.backbones: random data must not drive the weights to inf/NaN.
        self.optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=1e-4, momentum=0.9,
                                         weight_decay=1e-4)

    def step(self) -> None:
        loss, _ = self.module.head.training_step(self.module.network, self.module.in_layout(self.batch))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def state_bytes(self) -> int:
        """Weights (and buffers) plus the optimizer's state: what the variant holds between steps."""
        tensors = [*self.module.parameters(), *self.module.buffers(),
                   *(t for state in self.optimizer.state.values() for t in state.values() if torch.is_tensor(t))]
        return sum(t.numel() * t.element_size() for t in tensors)


def build_variants(args: argparse.Namespace) -> dict[str, Variant]:
    """The multi-task module and each task's single-task module, on the same batches."""
    generator = torch.Generator().manual_seed(0)
    batches, classes = {}, {}
    for name, kind in args.kinds.items():
        classes[name] = CLASSES[kind]
        batches[name] = BATCHES[kind](args.batch_sizes[name], args.image_sizes[name], classes[name], generator)
    torch.manual_seed(0)
    head = MultiTaskHead(tasks=copy.deepcopy(args.tasks), **args.head_args)
    variants = {MULTI: Variant(FishNetModule(head, backbone=args.model, num_classes=dict(classes), **args.options),
                               batches, args.device)}
    for name, config in args.tasks.items():
        module = FishNetModule(as_head(copy.deepcopy(config)), backbone=args.model, num_classes=classes[name],
                               **args.options)
        variants[name] = Variant(module, batches[name], args.device)
    return variants


# ------------------------------------------------------------------------------------------------------- the run
def run(args: argparse.Namespace) -> dict:
    load_before = machine_info(args.device)["load_average_1min"]
    variants = build_variants(args)
    names = list(variants)
    rounds: dict[str, list[float]] = {name: [] for name in names}
    for number in range(args.rounds):
        for name in names if number % 2 == 0 else reversed(names):
            print(f"round {number + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
            variant = variants[name]
            for _ in range(args.warmup):
                variant.step()
            _sync(args.device)
            start = time.perf_counter()
            for _ in range(args.steps):
                variant.step()
            _sync(args.device)
            rounds[name].append((time.perf_counter() - start) / args.steps)
    results = {}
    for name, variant in variants.items():
        print(f"peak memory: {name} ...", file=sys.stderr, flush=True)
        # Last step's gradients dropped first, as bench.backbones does: "above those live before" alike on both
        # devices (on CPU the profiler cannot see frees of tensors allocated before it started).
        variant.optimizer.zero_grad(set_to_none=True)
        peak = peak_memory_bytes(variant.step, args.device) / 2**20
        state = variant.state_bytes() / 2**20
        results[name] = {"step_ms": 1000 * statistics.median(rounds[name]), "step_ms_best": 1000 * min(rounds[name]),
                         "peak_memory_mb": peak, "state_mb": state, "total_mb": state + peak,
                         "params_m": sum(p.numel() for p in variant.module.parameters()) / 1e6,
                         "per_round_ms": [1000 * t for t in rounds[name]]}
    singles = [name for name in names if name != MULTI]
    results["sum"] = {key: sum(results[name][key] for name in singles)
                      for key in ("step_ms", "step_ms_best", "peak_memory_mb", "state_mb", "total_mb", "params_m")}
    results["sum"]["per_round_ms"] = [sum(per_round) for per_round in
                                      zip(*(results[name]["per_round_ms"] for name in singles))]
    multi, total = results[MULTI], results["sum"]
    ratios = {"time": statistics.median(m / s for m, s in zip(multi["per_round_ms"], total["per_round_ms"])),
              **{key: multi[f"{key}_mb"] / total[f"{key}_mb"] for key in ("peak_memory", "state", "total")}}
    machine = machine_info(args.device)
    machine["load_average_1min"] = [load_before, machine["load_average_1min"]]  # at start and end
    return {
        "machine": machine,
        "settings": {"model": args.model, "config": shown_path(args.config), "options": args.options,
                     "tasks": {name: {"head": args.kinds[name].__name__, "batch_size": args.batch_sizes[name],
                                      "image_size": list(args.image_sizes[name]), "classes": CLASSES[args.kinds[name]]}
                               for name in args.tasks},
                     "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
                     "threads": torch.get_num_threads(),
                     "step": "FishNetModule.training_step's loss, backward, SGD(momentum=0.9) step",
                     "peak_memory": "peak bytes of tensors allocated during one step above those live before it "
                                    "(bench.backbones.peak_memory_bytes); state: weights, buffers, SGD momentum"},
        "results": results,
        "ratios": ratios,
    }


def report(payload: dict) -> str:
    s, m, r = payload["settings"], payload["machine"], payload["results"]
    tasks = s["tasks"]
    shapes = ", ".join(f"{name} {t['batch_size']} x {t['image_size'][0]}x{t['image_size'][1]}"
                       for name, t in tasks.items())
    labels = {MULTI: f"multi-task ({' + '.join(tasks)})", "sum": "sum of the single tasks",
              **{name: f"{name} alone ({tasks[name]['head']})" for name in tasks}}
    header = ["step", "ms/step (median)", "best round", "step peak MB", "state MB", "state + peak MB", "params (M)",
              "x sum"]
    ratios = payload["ratios"]
    rows = []
    for name in [MULTI, *tasks, "sum"]:
        row = r[name]
        rows.append([labels[name], f"{row['step_ms']:.1f}", f"{row['step_ms_best']:.1f}",
                     f"{row['peak_memory_mb']:.0f}", f"{row['state_mb']:.0f}", f"{row['total_mb']:.0f}",
                     f"{row['params_m']:.2f}",
                     f"time {ratios['time']:.2f}, peak {ratios['peak_memory']:.2f}" if name == MULTI else None])
    loads = m["load_average_1min"]
    device = m.get("gpu", m["cpu"])
    return "\n".join([
        f"## Multi-task step: {s['model']} ({shapes}), {m['device']} ({device})",
        "",
        f"{m['cores']} cores, {s['threads']} torch thread(s), load average {loads[0]:.1f} -> {loads[1]:.1f}; "
        f"torch {m['torch']}, torchvision {m['torchvision']}. Heads of {s['config']}. {s['rounds']} round(s) of "
        f"{s['warmup']} warm-up + {s['steps']} timed steps per row, the rows taking turns; `x sum`: the multi-task "
        "step over the sum of the single-task steps (time: median over rounds of the ratio in each round). "
        f"Peak memory: {s['peak_memory']}.",
        "",
        markdown_table(header, rows),
    ])


# ------------------------------------------------------------------------------------------------------- options
def shown_path(path: Path) -> str:
    """``path`` relative to the repository when inside it (``configs/task/multitask.yaml``), else as given."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def per_task(text: str, parse: Callable[[str], object]) -> dict[str, object]:
    """``cls=8,det=2`` as ``{"cls": 8, "det": 2}``, each value through ``parse``."""
    pairs = {}
    for item in comma_separated(text):
        name, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"{item!r}: give task=value, e.g. cls=8")
        pairs[name.strip()] = parse(value.strip())
    return pairs


def image_size(text: str) -> tuple[int, int]:
    """``224`` (square) or ``512x1024`` (height x width)."""
    sides = text.lower().split("x")
    if len(sides) not in (1, 2) or not all(s.isdigit() and int(s) > 0 for s in sides):
        raise argparse.ArgumentTypeError(f"{text!r}: give a side or HEIGHTxWIDTH, e.g. 224 or 512x1024")
    return (int(sides[0]), int(sides[-1]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.multitask", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="fishnet150", help="timm backbone (default: fishnet150, the recipe's)")
    parser.add_argument("--config", type=Path, default=CONFIG,
                        help="a YAML whose model.head is a MultiTaskHead: the heads to time and the model's "
                             "freezing (default: configs/task/multitask.yaml)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda[:N] (default: cuda when there is one)")
    parser.add_argument("--batch-sizes", type=lambda s: per_task(s, int), default={},
                        help="images per step by task, e.g. cls=32,det=2,seg=1 (default: the recipe's per GPU on "
                             "CUDA; on CPU cls=8,det=1,seg=1)")
    parser.add_argument("--image-sizes", type=lambda s: per_task(s, image_size), default={},
                        help="image side or HEIGHTxWIDTH by task, e.g. cls=224,det=800x1333,seg=512x1024 (default: "
                             "those on CUDA; on CPU cls=128,det=320x512,seg=256x512)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per row and round (default: 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them (default: 1)")
    parser.add_argument("--rounds", type=int, default=3, help="turns of every row (default: 3)")
    parser.add_argument("--threads", type=int,
                        help="torch intra-op threads (default: 1 on CPU, steady on a shared machine, as "
                             "bench.backbones; 0 = torch's choice, as on CUDA)")
    parser.add_argument("--json", default=str(RESULTS_DIR / "multitask.json"),
                        help="where to write the results (default: bench/results/multitask.json)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--steps and --rounds must be at least 1, --warmup at least 0")
    try:
        check_model_name(args.model)
    except ValueError as err:
        parser.error(str(err))
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    args.tasks, args.head_args, args.options = read_tasks(args.config)
    try:
        args.kinds = {name: kind_of(config) for name, config in args.tasks.items()}
    except (ValueError, TypeError) as err:
        parser.error(f"--config {args.config}: {err}")
    unknown = sorted((set(args.batch_sizes) | set(args.image_sizes)) - set(args.tasks))
    if unknown:
        parser.error(f"--batch-sizes / --image-sizes name the tasks of {args.config}, {', '.join(args.tasks)}; "
                     f"got {', '.join(unknown)}")
    defaults = DEFAULTS["cuda" if args.device.type == "cuda" else "cpu"]
    args.batch_sizes = {name: args.batch_sizes.get(name, defaults[kind][0]) for name, kind in args.kinds.items()}
    args.image_sizes = {name: args.image_sizes.get(name, defaults[kind][1]) for name, kind in args.kinds.items()}
    if min(args.batch_sizes.values()) < 1:
        parser.error(f"--batch-sizes must be at least 1; got {args.batch_sizes}")
    for name, kind in args.kinds.items():  # the detector trains at the images' size instead of resizing them
        if kind is DetectionHead:
            args.tasks[name].setdefault("init_args", {}).update(min_size=min(args.image_sizes[name]),
                                                                max_size=max(args.image_sizes[name]))
    if args.threads is None:
        args.threads = 1 if args.device.type == "cpu" else 0
    return args


def main(argv: list[str] | None = None) -> dict:
    return run_bench(parse_args(argv), run, report)


if __name__ == "__main__":
    main()
