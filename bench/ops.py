"""FishNet's resampling ops against torch's own modules, at FishNet-150's shapes: ``python -m bench.ops``.

FishNet-150 down-samples with six 2x2 max-pools, up-samples three times (nearest, 2x) and sums channel pairs
in three UR-blocks. ``fishnet_pl.models.architecture`` gives each a faster path that computes the same values
(``MaxPool2x2``, ``Upsample2x``, ``channel_sum``; ``tests/models/test_fishnet.py`` checks equality, gradients
included). This times both per op, summed over the network's calls at batch 8 and 224x224, without autograd
(inference) and as forward + backward (training), in NCHW and channels_last.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from bench import machine_info, markdown_table
from fishnet_pl.models.architecture import MaxPool2x2, Upsample2x, channel_sum

# Input shapes of FishNet-150's calls at 224x224 (batch first, set by --batch-size).
POOL_SHAPES = [(128, 56, 56), (256, 28, 28), (512, 14, 14), (320, 56, 56), (832, 28, 28), (1600, 14, 14)]
UPSAMPLE_SHAPES = [(512, 7, 7), (384, 14, 14), (256, 28, 28)]
CHANNEL_SUM_SHAPES = [(1024, 7, 7), (768, 14, 14), (512, 28, 28)]


def _fastest(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up: first touch of the output memory
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _total_ms(op: Callable[[torch.Tensor], torch.Tensor], shapes: list[tuple[int, ...]], batch_size: int,
              layout: torch.memory_format, train: bool, repeats: int) -> float:
    total = 0.0
    for shape in shapes:
        x = torch.randn(batch_size, *shape).contiguous(memory_format=layout).requires_grad_(train)

        def step(x: torch.Tensor = x) -> None:
            if train:
                y = op(x)
                y.backward(torch.ones_like(y))
                x.grad = None
            else:
                with torch.no_grad():
                    op(x)

        total += _fastest(step, repeats)
    return 1000 * total


def main(argv: list[str] | None = None) -> list[list[str]]:
    parser = argparse.ArgumentParser(prog="python -m bench.ops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per shape; the fastest counts")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:  # main() also runs inside other processes (the tests)
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> list[list[str]]:
    ops = [
        ("2x2 max-pool", POOL_SHAPES, nn.MaxPool2d(2, stride=2), MaxPool2x2()),
        ("nearest 2x up-sampling", UPSAMPLE_SHAPES, nn.Upsample(scale_factor=2, mode="nearest"), Upsample2x()),
        ("UR channel-pair sum", CHANNEL_SUM_SHAPES, lambda x: x.unflatten(1, (-1, 2)).sum(2),
         lambda x: channel_sum(x, 2)),
    ]
    rows = []
    for name, shapes, torchs, ours in ops:
        for layout_name, layout in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
            for train in (False, True):
                theirs_ms = _total_ms(torchs, shapes, args.batch_size, layout, train, args.repeats)
                ours_ms = _total_ms(ours, shapes, args.batch_size, layout, train, args.repeats)
                rows.append([name, layout_name, "forward + backward" if train else "inference", f"{len(shapes)}",
                             f"{theirs_ms:.1f}", f"{ours_ms:.1f}", f"{theirs_ms / ours_ms:.2f}x"])
    m = machine_info()
    print(f"## FishNet-150's resampling ops, batch {args.batch_size}, 224x224: {m['cpu']}, "
          f"{m['torch_threads']} torch threads, torch {m['torch']}\n")
    print(markdown_table(["op", "layout", "pass", "calls", "torch ms", "fishnet_pl ms", "speed-up"], rows))
    return rows


if __name__ == "__main__":
    main()
