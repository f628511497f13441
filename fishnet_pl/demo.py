"""``make demo``: the quickstart runs on built-in data, each the same command a user would type.

    python -m fishnet_pl.demo [classification|segmentation|detection|panoptic|multitask ...]

The segmentation and panoptic quickstarts fine-tune the classification quickstart's checkpoint, so that
one runs first when its checkpoint is missing. Each run writes in a new version folder of its recipe's
``runs/quickstart/<task>``; the demo ends by saying where, and what to run next.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fishnet_pl.cli import build_cli

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "quickstart"
TASKS = ("classification", "segmentation", "detection", "panoptic", "multitask")
#: Quickstarts that fine-tune the classification quickstart's backbone.
FINE_TUNED = ("segmentation", "panoptic")
#: What they start from: a link to the newest classification run's last checkpoint.
CLASSIFICATION_CKPT = Path("runs/quickstart/classification/last.ckpt")


def run(task: str) -> tuple[dict[str, float], Path, Path]:
    """Fit the task's quickstart, then test its best checkpoint: (test metrics, run folder, best checkpoint)."""
    print(f"\n=== quickstart {task}: fishnet-pl fit --config configs/quickstart/{task}.yaml", flush=True)
    result = build_cli(["fit", "--config", str(CONFIGS / f"{task}.yaml")])
    return test_best(result), Path(result.trainer.log_dir), Path(result.trainer.checkpoint_callback.best_model_path)


def test_best(cli) -> dict[str, float]:
    """The test metrics of a fitted run's best checkpoint (a multi-task run's: every task's, one loader each)."""
    per_loader = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best")
    return {name: value for loader in per_loader for name, value in loader.items()}


def main(argv: list[str] | None = None) -> None:
    tasks = (argv if argv is not None else sys.argv[1:]) or TASKS
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise SystemExit(f"unknown demo task(s) {sorted(unknown)}; choose from {TASKS}")
    if set(FINE_TUNED) & set(tasks) and "classification" not in tasks and not CLASSIFICATION_CKPT.is_file():
        tasks = ["classification", *tasks]
    print(summary({task: run(task) for task in tasks}))


def summary(results: dict[str, tuple[dict[str, float], Path, Path]]) -> str:
    """The demo's last words: each task's test metrics, where its run wrote, and the commands to run next."""
    lines = ["", "=== quickstart results"]
    for task, (metrics, run_dir, best) in results.items():
        lines += [f"{task}: " + " ".join(f"{k}={v:.3f}" for k, v in sorted(metrics.items())),
                  f"  run folder (logs, checkpoints, config.yaml): {run_dir}", f"  best checkpoint: {best}"]
    task, (_, _, best) = next(iter(results.items()))
    lines += ["", "Next:",
              f"  fishnet-pl predict --ckpt_path {best} --data.predict_root YOUR_IMAGES "
              f"--predict_dir predictions/{task}",
              f"  fishnet-pl export --ckpt_path {best} --format onnx --output exports/",
              "  fishnet-pl fit --config configs/quickstart/<task>.yaml --data.init_args.root YOUR_DATA "
              "--data.init_args.quickstart false   # a recipe on your own data"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
