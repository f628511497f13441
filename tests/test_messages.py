"""What a run prints: where its outputs went, and no third-party chatter a user cannot act on."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from fishnet_pl import demo

from .conftest import CONFIGS, run_checkpoint, run_cli_subprocess

CHATTER = ("💡 Tip", "LeafSpec", "No seed found", "The dirpath has changed", "configure_callbacks` will override")


def test_fit_resume_and_predict_print_no_third_party_chatter(tmp_path):
    tiny = ["--config", CONFIGS / "quickstart/classification.yaml", "--data.init_args.image_size", "32",
            "--data.init_args.val_resize", "36", "--data.init_args.num_workers", "0",
            "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false"]
    runs = [run_cli_subprocess(["fit", *tiny, "--trainer.max_epochs", "1"], cwd=tmp_path),
            run_cli_subprocess(["fit", *tiny, "--trainer.max_epochs", "2", "--ckpt_path", "last"], cwd=tmp_path)]
    ckpt = run_checkpoint(tmp_path / "runs/quickstart/classification")
    runs.append(run_cli_subprocess(["predict", "--ckpt_path", ckpt, "--data.predict_root",
                                    tmp_path / "data/quickstart/imagenet/val", "--predict_dir", tmp_path / "out",
                                    "--trainer.enable_progress_bar", "false"], cwd=tmp_path))
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
        shown = run.stdout + run.stderr
        assert not [c for c in CHATTER if c in shown], shlex.join(run.args) + "\n" + shown[-3000:]
    # Each fit says where its run folder is, before it starts (a killed run has said it too) and, at the end, the
    # best checkpoint; both are there.
    for version, run in enumerate(runs[:2]):
        shown = run.stdout + run.stderr
        folder = Path("runs/quickstart/classification") / f"version_{version}"
        assert f"fit: logs, checkpoints and config.yaml go to {folder}\n" in shown, shown[-3000:]
        best = re.search(r"fit: best checkpoint (\S+); checkpoints in (\S+) ", shown)
        assert best and Path(best[1]).parent == folder / "checkpoints" == Path(best[2]), shown[-3000:]
        assert (tmp_path / best[1]).is_file() and (tmp_path / folder / "config.yaml").is_file()


def test_the_demo_ends_with_where_each_run_wrote_and_the_next_commands(classification_quickstart):
    cli, cwd = classification_quickstart
    best = Path(cli.trainer.checkpoint_callback.best_model_path)
    text = demo.summary({"classification": (cli.test_metrics, Path(cli.trainer.log_dir), best)})
    assert f"run folder (logs, checkpoints, config.yaml): {cli.trainer.log_dir}" in text
    assert f"best checkpoint: {best}" in text and (cwd / best).is_file()
    assert f"fishnet-pl predict --ckpt_path {best}" in text and f"fishnet-pl export --ckpt_path {best}" in text
    assert "test/acc1=" in text
