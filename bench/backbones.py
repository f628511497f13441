"""Speed, peak memory and multiply-adds of FishNet against reference CNNs, in one process and one run.

    python -m bench.backbones                                   # or: make bench
    python -m bench.backbones --models fishnet150,resnet50 --modes eager,bf16 --device cuda

For every model and mode it times a training step (forward, cross-entropy, backward, SGD step) and
an inference forward at one batch and input size, and measures one step's peak memory. Absolute
images/s drift on a shared machine; the headline is each model's ratio to the baseline (ResNet-50),
measured in the same process with the models taking turns step by step, so a change of load hits all
alike. ``--profile`` prints the ops that dominate one eager training step of each model.

Every model, FishNet and reference alike, is built by the same factory, ``fishnet_pl.create_backbone``
(= ``timm.create_model``), randomly initialised: the references are timm's ResNet-50/101, ResNeXt-50
(32x4d) and DenseNet-161, and any other timm model name works too.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import difflib
import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fishnet_pl
from bench import RESULTS_DIR, machine_info, markdown_table, run_bench

REFERENCE_MODELS = ("resnet50", "resnet101", "resnext50_32x4d", "densenet161")
DEFAULT_MODELS = ("fishnet99", "fishnet150", "fishnet201", *REFERENCE_MODELS)
MODES = ("eager", "channels_last", "bf16", "compile", "fused")
# Multiply-adds at 224x224 as quoted (as "FLOPs"): FishNet's by its paper (Sun et al. 2018), ResNets' as
# the FishNet paper and torchvision quote them (He et al.'s own Table 1 says 3.8 and 7.6, counting differently),
# ResNeXt-50's and DenseNet-161's as torchvision quotes them for the same architectures as timm's (the
# ResNeXt paper, Xie et al. 2017, Table 1: 4.2; the DenseNet paper gives no number for DenseNet-161).
PUBLISHED_GMACS = {"fishnet99": 4.31, "fishnet150": 6.45, "fishnet201": 10.58, "resnet50": 4.1, "resnet101": 7.8,
                   "resnext50_32x4d": 4.23, "densenet161": 7.73}
PEAK_MEMORY_MEANS = {
    "cuda": "peak bytes of tensors allocated during one step above those live before it "
            "(torch.cuda.max_memory_allocated minus memory_allocated): activations, gradients, temporaries; "
            "weights and optimizer state excluded",
    "cpu": "peak bytes of tensors allocated during one step above those live before it, summed from "
           "torch.profiler's allocation and free events (profile_memory=True): activations, gradients, "
           "temporaries; weights and optimizer state excluded. Not the process RSS, which also holds "
           "allocator caches and oneDNN scratch buffers",
}
# Per device; the CPU ones kept the default run within about 5 minutes on 2 cores with FishNet-99/150/201 and
# ResNet-50/101 (ResNeXt-50 and DenseNet-161 add about a third more multiply-adds; not re-timed). One CPU thread: on a
# shared machine a multi-threaded op stalls whenever one of its threads is descheduled, which made
# 2-thread runs there swing by 5x from step to step, while 1-thread ratios held within ~10%.
DEFAULTS = {"cpu": {"batch_size": 8, "image_size": 128, "steps": 3, "warmup": 1, "threads": 1},
            "cuda": {"batch_size": 64, "image_size": 224, "steps": 20, "warmup": 5, "threads": None}}
# torch.compile is opt-in on CPU: a cold compile (empty inductor cache) of FishNet-150's training and
# inference graphs alone took 6-10 minutes on 2 shared cores, more than the whole default run may take.
DEFAULT_MODES = {"cpu": ("eager", "channels_last", "bf16", "fused"), "cuda": MODES}


def check_model_name(name: str) -> None:
    """Raise, naming the closest known names, unless ``build_model`` knows ``name``."""
    known = fishnet_pl.list_backbones()  # every timm model, FishNet's variants among them
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        raise ValueError(f"unknown model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else "")
                         + " (any timm model name, FishNet's variants among them: fishnet_pl.list_backbones())")


def build_model(name: str, num_classes: int = 1000) -> nn.Module:
    """``name`` from timm's registry through ``fishnet_pl.create_backbone``, randomly initialised."""
    check_model_name(name)
    return fishnet_pl.create_backbone(name, pretrained=False, num_classes=num_classes)


def count_macs(name: str, image_size: int = 224) -> int:
    """Multiply-adds of one ``image_size`` x ``image_size`` image through the model (inference).

    Built on the meta device, so no memory or compute is spent. ``FlopCounterMode`` counts a
    multiply-add as 2 FLOPs; papers' "FLOPs" for these networks are multiply-adds, hence the halving.
    """
    with torch.device("meta"):
        model = build_model(name).eval()
        x = torch.empty(1, 3, image_size, image_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _minor_page_faults() -> int:
    """This process's minor page faults so far: first touches of memory the kernel must map and zero."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _timed(step: Callable[[], None], device: torch.device) -> float:
    start = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - start


def peak_memory_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes of tensors allocated by one call of ``step`` above those live before it."""
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    # No allocator statistics on CPU: replay the profiler's allocation (+) and free (-) events in order.
    # Frees of tensors allocated before profiling started are not reported, so the sum starts at 0.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def _prepare(model: nn.Module, x: torch.Tensor, mode: str, device: torch.device):
    """Model to call, input and autocast context factory for one mode."""
    autocast = contextlib.nullcontext
    runner = model
    if mode == "channels_last":
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    elif mode == "bf16":
        autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    elif mode == "compile":
        runner = torch.compile(model)
    elif mode == "fused":  # inference only: fishnet_pl.fuse_for_inference's eval-mode copy
        runner = fishnet_pl.fuse_for_inference(model)
    elif mode != "eager":
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    return runner, x, autocast


def _failure(err: BaseException) -> str:
    message = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"failed: {type(err).__name__}: {message}"[:160]


def _prepared(base: nn.Module, mode: str, *, batch_size: int, image_size: int,
              device: torch.device) -> tuple[nn.Module, dict[str, Callable[[], None]]]:
    """A copy of ``base`` set up for ``mode``, with its training and inference step functions."""
    model = copy.deepcopy(base).to(device)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, image_size, image_size, generator=generator).to(device)
    y = torch.randint(0, 1000, (batch_size,), generator=generator).to(device)
    runner, x, autocast = _prepare(model, x, mode, device)
    # A small learning rate: random data must not drive the weights to inf/NaN, which run slow paths.
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=1e-4)

    def train_step():
        with autocast():
            loss = F.cross_entropy(runner(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer_step():
        with torch.inference_mode(), autocast():
            runner(x)

    if mode == "fused":  # the plain model in eval mode, timed in turn with its fused copy
        def unfused_step():
            with torch.inference_mode():
                model(x)

        return model, {"infer": infer_step, "infer_unfused": unfused_step}
    return model, {"train": train_step, "infer": infer_step}


def measure_mode(bases: dict[str, nn.Module], mode: str, *, batch_size: int, image_size: int,
                 device: torch.device, warmup: int, steps: int, seconds: float) -> dict[str, dict]:
    """Training and inference throughput and peak memory of every model in one mode.

    The models take turns, one timed step each per round (at least ``steps`` rounds and ``seconds``
    seconds), so a change of load on a shared machine hits them all alike and their ratios hold.
    Throughput is from the fastest step, as ``timeit`` advises: other processes only ever add time,
    and a 2-thread op stalls whenever one of its threads is descheduled. The median is kept too.
    Each model works on its own copy of its base.
    A failure is recorded for that model and part as ``{"error": "failed: ..."}`` and the rest go on.
    """
    results: dict[str, dict] = {name: {} for name in bases}
    prepared = {}
    for name, base in bases.items():
        try:
            prepared[name] = _prepared(base, mode, batch_size=batch_size, image_size=image_size, device=device)
        except Exception as err:  # one model failing must not end the run
            results[name] = {"train": {"error": _failure(err)}, "infer": {"error": _failure(err)}}
    # torch.compile compiles in the first warm-up call (again for eval mode), never in the timing.
    warmup = max(warmup, 1) if mode == "compile" else warmup
    # Inference first, as in a process that only predicts; "fused" times the unfused eval model in turn too.
    for parts in (("infer", "infer_unfused"), ("train",)):
        times: dict[tuple[str, str], list[float]] = {}
        faults: dict[tuple[str, str], list[int]] = {}
        first_call: dict[tuple[str, str], float] = {}
        for name, (model, step) in prepared.items():
            for part in parts:
                if part not in step:
                    if part == "train":
                        results[name][part] = {"error": f"n/a ({mode} is for inference)"}
                    continue
                try:
                    model.train(part == "train")
                    for _ in range(warmup):
                        first_call.setdefault((name, part), _timed(step[part], device))
                    times[name, part], faults[name, part] = [], []
                except Exception as err:
                    results[name][part] = {"error": _failure(err)}
        rounds, began = 0, time.perf_counter()
        while times and (rounds < max(steps, 1) or time.perf_counter() - began < seconds):
            order = list(times)
            for name, part in order[rounds % len(order):] + order[:rounds % len(order)]:  # rotate who goes first
                try:
                    before = _minor_page_faults()
                    times[name, part].append(_timed(prepared[name][1][part], device))
                    faults[name, part].append(_minor_page_faults() - before)
                except Exception as err:
                    results[name][part] = {"error": _failure(err)}
                    del times[name, part]
            rounds += 1
        for (name, part), measured in times.items():
            try:
                # Drop last step's gradients first: on CPU the profiler cannot see tensors freed that were
                # allocated before it started, so this keeps "above those live before" alike on both devices.
                prepared[name][0].zero_grad(set_to_none=True)
                peak = peak_memory_bytes(prepared[name][1][part], device)
            except Exception as err:
                results[name][part] = {"error": _failure(err)}
                continue
            fastest, median = min(measured), statistics.median(measured)
            results[name][part] = {"images_per_s": batch_size / fastest, "step_ms": 1000 * fastest,
                                   "images_per_s_median": batch_size / median, "step_ms_median": 1000 * median,
                                   "steps": len(measured), "peak_memory_mb": peak / 2**20,
                                   "page_faults_median": statistics.median(faults[name, part]),
                                   "compile_s": first_call.get((name, part)) if mode == "compile" else None}
    if device.type == "cuda":
        del prepared
        torch.cuda.empty_cache()
    return results


def _ratios(rows: list[dict], baseline: str, macs: dict[str, float | None]) -> None:
    """Add each row's throughput ratio to the baseline's in the same mode, per image and per multiply-add."""
    base_rows = {row["mode"]: row for row in rows if row["model"] == baseline}
    for row in rows:
        base = base_rows.get(row["mode"])
        for part in ("train", "infer"):
            ours, theirs = row[part], base[part] if base else {}
            if "images_per_s" not in ours or "images_per_s" not in theirs:
                continue
            ours["vs_baseline"] = ours["images_per_s"] / theirs["images_per_s"]
            if macs.get(row["model"]) and macs.get(baseline):
                # Multiply-adds per second relative to the baseline: 1.0 = as efficient per GMAC.
                ours["macs_per_s_vs_baseline"] = ours["vs_baseline"] * macs[row["model"]] / macs[baseline]
    for row in rows:  # fuse_for_inference against the same model's eager inference, timed in turn with it
        unfused = row.get("infer_unfused", {})
        if row["mode"] == "fused" and "images_per_s" in row["infer"] and "images_per_s" in unfused:
            row["infer"]["vs_eager"] = row["infer"]["images_per_s"] / unfused["images_per_s"]


def _fmt(value: float | None, digits: int = 2) -> str | None:
    return None if value is None else f"{value:.{digits}f}"


def speed_table(rows: list[dict], baseline: str) -> str:
    header = ["model", "mode", "train img/s", f"train x {baseline}", "train MAC/s x", "infer img/s",
              f"infer x {baseline}", "infer MAC/s x", "train peak MB", "infer peak MB",
              "page faults/step (train/infer)", "compile s (train/infer)"]
    lines = []
    for row in rows:
        train, infer = row["train"], row["infer"]
        compile_s = None
        if train.get("compile_s") is not None or infer.get("compile_s") is not None:
            compile_s = f"{_fmt(train.get('compile_s'), 1) or '-'} / {_fmt(infer.get('compile_s'), 1) or '-'}"
        lines.append([
            row["model"], row["mode"],
            train.get("error") or _fmt(train["images_per_s"], 1), _fmt(train.get("vs_baseline")),
            _fmt(train.get("macs_per_s_vs_baseline")),
            infer.get("error") or _fmt(infer["images_per_s"], 1), _fmt(infer.get("vs_baseline")),
            _fmt(infer.get("macs_per_s_vs_baseline")),
            _fmt(train.get("peak_memory_mb"), 0), _fmt(infer.get("peak_memory_mb"), 0),
            f"{_fmt(train.get('page_faults_median'), 0) or '-'} / {_fmt(infer.get('page_faults_median'), 0) or '-'}",
            compile_s,
        ])
    return markdown_table(header, lines)


def flops_table(flops: dict[str, dict], image_size: int) -> str:
    header = ["model", "params (M)", "GMACs @224 (counted)", "GMACs @224 (published)", "counted vs published",
              f"GMACs @{image_size}"]
    lines = []
    for name, entry in flops.items():
        counted, published = entry["gmacs_224"], entry["published_gmacs_224"]
        diff = f"{100 * (counted / published - 1):+.1f}%" if counted and published else None
        lines.append([name, _fmt(entry["params_m"]), _fmt(counted), _fmt(published), diff,
                      _fmt(entry["gmacs_bench"])])
    return markdown_table(header, lines)


def profile_training_step(name: str, *, batch_size: int, image_size: int, device: torch.device,
                          row_limit: int = 20) -> str:
    """torch.profiler's table of the ops that take the most self time in one eager training step."""
    model = build_model(name).to(device).train()
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    y = torch.randint(0, 1000, (batch_size,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step():
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up: oneDNN primitives, optimizer state
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
        _sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=row_limit)


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.backbones", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=_csv, default=list(DEFAULT_MODELS),
                        help="comma-separated timm model names, FishNet's variants among them "
                             f"(default: {','.join(DEFAULT_MODELS)})")
    parser.add_argument("--modes", type=_csv, help=f"comma-separated, from {', '.join(MODES)} (default: all on "
                                                   "CUDA; on CPU all but compile, which takes minutes per model)")
    parser.add_argument("--baseline", default="resnet50",
                        help="model the ratios are relative to, measured too if not in --models (default: resnet50)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda[:N] (default: cuda when there is one)")
    parser.add_argument("--batch-size", type=int, help="images per step (default: 8 on CPU, 64 on CUDA)")
    parser.add_argument("--image-size", type=int,
                        help="square input side, a multiple of 32 for FishNet (default: 128 on CPU, 224 on CUDA)")
    parser.add_argument("--steps", type=int, help="timed steps at least (default: 3 on CPU, 20 on CUDA)")
    parser.add_argument("--seconds", type=float, default=0.0, help="time for at least this long as well (default: 0)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: 1 on CPU, 5 on CUDA)")
    parser.add_argument("--threads", type=int,
                        help="torch intra-op threads (default: 1 on CPU, steady on a shared machine; 0 = torch's "
                             "choice, as on CUDA)")
    parser.add_argument("--json", default=str(RESULTS_DIR / "backbones.json"),
                        help="where to write the results (default: bench/results/backbones.json)")
    parser.add_argument("--malloc", choices=("keep", "default"), default="keep",
                        help="keep: freed CPU memory stays in the process for the next step, as fishnet-pl runs "
                             "(fishnet_pl.keep_freed_memory); default: glibc's own thresholds, which page-fault "
                             "large blocks in anew every step (default: keep)")
    parser.add_argument("--profile", action="store_true",
                        help="also print the top ops of one eager training step of each model")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.modes = args.modes or list(DEFAULT_MODES.get(device.type, MODES))
    unknown_modes = [m for m in args.modes if m not in MODES]
    if unknown_modes:
        parser.error(f"unknown mode(s) {', '.join(unknown_modes)}; choose from {', '.join(MODES)}")
    for name in [*args.models, args.baseline]:
        try:
            check_model_name(name)
        except ValueError as err:
            parser.error(str(err))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    for key, value in DEFAULTS.get(device.type, DEFAULTS["cpu"]).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.device = device
    return args


def run(args: argparse.Namespace) -> dict:
    """Measure everything ``args`` asks for; returns the JSON payload."""
    device = args.device
    flops = {}
    for name in dict.fromkeys([*args.models, args.baseline]):
        entry = {"params_m": None, "gmacs_224": None, "gmacs_bench": None,
                 "published_gmacs_224": PUBLISHED_GMACS.get(name)}
        with torch.device("meta"):
            entry["params_m"] = sum(p.numel() for p in build_model(name).parameters()) / 1e6
        for key, size in (("gmacs_224", 224), ("gmacs_bench", args.image_size)):
            try:
                entry[key] = count_macs(name, size) / 1e9
            except Exception as err:  # e.g. a size FishNet cannot take; the timing says why
                entry[f"{key}_error"] = _failure(err)
        flops[name] = entry

    load_before = machine_info(device)["load_average_1min"]
    began = time.perf_counter()
    bases = {}
    for name in dict.fromkeys([*args.models, args.baseline]):
        torch.manual_seed(0)
        bases[name] = build_model(name)
    rows = []
    for mode in args.modes:
        print(f"{mode}: {', '.join(bases)} ...", file=sys.stderr, flush=True)
        context = contextlib.nullcontext()
        if mode == "compile":
            torch._dynamo.reset()
            # FishNet variants share forward code: train and eval graphs of each count against one limit.
            context = torch._dynamo.config.patch(recompile_limit=max(8, 4 * len(bases)))
        with context:
            results = measure_mode(bases, mode, batch_size=args.batch_size, image_size=args.image_size,
                                   device=device, warmup=args.warmup, steps=args.steps, seconds=args.seconds)
        rows += [{"model": name, "mode": mode, **results[name]} for name in bases]
    rows.sort(key=lambda row: list(bases).index(row["model"]))  # stable: modes stay in order per model
    macs = {name: entry["gmacs_bench"] for name, entry in flops.items()}
    _ratios(rows, args.baseline, macs)
    profiles = {}
    if args.profile:
        for name in args.models:
            profiles[name] = profile_training_step(name, batch_size=args.batch_size, image_size=args.image_size,
                                                   device=device)
    machine = machine_info(device)
    machine["load_average_1min"] = [load_before, machine["load_average_1min"]]  # at start and end
    return {
        "machine": machine,
        "settings": {"models": list(args.models), "modes": list(args.modes), "baseline": args.baseline,
                     "batch_size": args.batch_size, "image_size": args.image_size, "steps": args.steps,
                     "seconds": args.seconds, "warmup": args.warmup,
                     "malloc": ("glibc keeps freed memory (fishnet_pl.keep_freed_memory)"
                                if getattr(args, "malloc_kept", False) else "the C library's default"),
                     "train_step": "forward, cross-entropy, backward, SGD(momentum=0.9) step",
                     "infer_step": "forward in eval mode under torch.inference_mode",
                     "throughput": "batch size / fastest timed step (images_per_s_median: / median step)",
                     "peak_memory": PEAK_MEMORY_MEANS["cuda" if device.type == "cuda" else "cpu"]},
        "flops": flops,
        "results": rows,
        "profiles": profiles,
        "wall_s": time.perf_counter() - began,
    }


def report(payload: dict) -> str:
    """The Markdown a person reads: machine, settings, the speed table and the multiply-add table."""
    m, s = payload["machine"], payload["settings"]
    device = m.get("gpu", m["cpu"]) if m["device"].startswith("cuda") else m["cpu"]
    lines = [
        f"## Backbones: batch {s['batch_size']}, {s['image_size']}x{s['image_size']}, {m['device']} ({device})",
        "",
        f"{m['cores']} cores, {m['torch_threads']} torch threads, {m['cpu_capability']}; torch {m['torch']}, "
        f"timm {m.get('timm', '?')}, torchvision {m['torchvision']}, Python {m['python']}. "
        f"Fastest of >= {s['steps']} timed steps after {s['warmup']} warm-up; {payload['wall_s']:.0f} s of measuring. "
        f"CPU allocator: {s.get('malloc', '?')}.",
        "",
        *_load_warning(m),
        f"Ratios are to {s['baseline']} in the same mode and run (the headline: absolute images/s drift on "
        f"shared machines). `MAC/s x` is throughput per multiply-add relative to {s['baseline']}: 1.00 means "
        f"as many multiply-adds per second, below 1 means the model is slower than its MACs predict.",
        "",
        speed_table(payload["results"], s["baseline"]),
        "",
        *[f"- `fuse_for_inference` {row['model']}: {row['infer']['vs_eager']:.2f}x its eager inference "
          "(the unfused eval model, timed in turn with it)"
          for row in payload["results"] if "vs_eager" in row["infer"]],
        "",
        ("Compile seconds are each model's first call, with inductor's on-disk cache cold or warm from an "
         "earlier run." if "compile" in s["modes"] else
         "torch.compile left out (on CPU by default: a cold compile takes minutes per model); add "
         "`--modes eager,compile` to measure it."),
        "",
        f"Peak memory: {s['peak_memory']}.",
        "",
        "Page faults: the process's median minor page faults per timed step, each a 4 KiB page of freshly "
        "allocated memory the kernel maps and zeroes (`--malloc keep` lets glibc reuse freed memory instead).",
        "",
        "## Multiply-adds (torch.utils.flop_counter, FLOPs / 2)",
        "",
        flops_table(payload["flops"], s["image_size"]),
    ]
    for name, table in payload.get("profiles", {}).items():
        lines += ["", f"## Top ops of one eager training step: {name}", "", "```", table, "```"]
    return "\n".join(lines)


def _load_warning(machine: dict) -> list[str]:
    loads = machine.get("load_average_1min") or [None, None]
    if None in loads or max(loads[0], loads[1] - machine["torch_threads"]) <= 1:  # the end counts our threads
        return []
    consequence = ("with several torch threads each op waits for its slowest thread, so the ratios suffer too; "
                   "`--threads 1` is steadier" if machine["torch_threads"] > 1 else
                   "absolute numbers are low, the ratios hold as the models took turns")
    return [f"**Busy machine**: load average {' -> '.join(f'{x:.1f}' for x in loads)} on {machine['cores']} cores "
            f"(start -> end): other processes shared the cores; {consequence}.", ""]


def main(argv: list[str] | None = None) -> dict:
    return run_bench(parse_args(argv), run, report)

if __name__ == "__main__":
    main()
