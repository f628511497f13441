"""``make demo``: the quickstart runs on built-in data, each the same command a user would type.

    python -m fishnet_pl.demo [classification|segmentation|detection ...]

The segmentation quickstart fine-tunes the classification quickstart's checkpoint, so that one
runs first when its checkpoint is missing.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fishnet_pl.cli import build_cli

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "quickstart"
TASKS = ("classification", "segmentation", "detection")
CLASSIFICATION_CKPT = Path("runs/quickstart/classification/checkpoints/last.ckpt")


def run(task: str) -> dict[str, float]:
    """Fit the task's quickstart, then test its best checkpoint; returns the test metrics."""
    print(f"\n=== quickstart {task}: fishnet-pl fit --config configs/quickstart/{task}.yaml", flush=True)
    result = build_cli(["fit", "--config", str(CONFIGS / f"{task}.yaml")])
    (metrics,) = result.trainer.test(result.model, datamodule=result.datamodule, ckpt_path="best")
    return metrics


def main(argv: list[str] | None = None) -> None:
    tasks = (argv if argv is not None else sys.argv[1:]) or TASKS
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise SystemExit(f"unknown demo task(s) {sorted(unknown)}; choose from {TASKS}")
    if "segmentation" in tasks and "classification" not in tasks and not CLASSIFICATION_CKPT.is_file():
        tasks = ["classification", *tasks]
    results = {task: run(task) for task in tasks}
    print("\n=== quickstart results")
    for task, metrics in results.items():
        print(task, " ".join(f"{k}={v:.3f}" for k, v in sorted(metrics.items())))


if __name__ == "__main__":
    main()
