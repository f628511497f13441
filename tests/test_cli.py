"""What ``fishnet-pl`` prints when a command is wrong: a mistyped or abbreviated option is refused in a few lines
naming the closest real one; fishnet-pl's own errors (dataset, backbone, checkpoint...) print as their message
alone, exit status 1; a bug keeps its traceback. And what ``--help`` lists."""

from __future__ import annotations

import inspect
import re
import sys

import pytest
import yaml
from lightning.pytorch.callbacks import Callback
from PIL import Image

from datamodules.segmentation_folder import SegmentationFolderDataModule
from fishnet_pl.cli import TRACEBACK_VARIABLE, main

from .conftest import CONFIGS, run_cli_subprocess

QUICKSTART = CONFIGS / "quickstart" / "classification.yaml"


def fishnet_pl(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """``fishnet-pl ARGS`` from the command line, in this process: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["fishnet-pl", *map(str, args)])
    with pytest.raises(SystemExit) as exit_:
        main()
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def imagenet_folders(root, broken: str | None = None):
    """Two classes of two 40x40 JPEGs per split, in ImageNet's layout; ``broken``: a file that is no image."""
    for split in ("train", "val"):
        for wnid in ("n01440764", "n01443537"):
            (root / split / wnid).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 40), (40 * i, 90, 200)).save(root / split / wnid / f"{i}.JPEG")
    if broken:
        (root / broken).write_text("not a JPEG")
    return root


def small_validate(root) -> list[str]:
    return ["validate", "--config", QUICKSTART, "--data.init_args.root", root, "--data.init_args.quickstart", "false",
            "--data.init_args.image_size", "32", "--data.init_args.val_resize", "36", "--data.init_args.batch_size",
            "2", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", root / "run"]


def assert_short_usage_error(status: int, err: str, refused: str, closest: str) -> None:
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) <= 3 and "usage:" not in err, err
    assert refused in lines[0] and lines[1].strip() == f"did you mean {closest}?", err


# ---------------------------------------------------------------------- options and config keys
@pytest.mark.parametrize(("given", "closest"), [
    ("--model.bakbone", "--model.backbone"),
    ("--trainer.max_epoch", "--trainer.max_epochs"),  # an abbreviation: refused, not taken
    ("--data.init_args.rot", "--data.init_args.root"),  # an init argument of the config's datamodule class
    ("--data.rot", "--data.root"),
    ("--dta.init_args.root", "--data.init_args.root"),
])
def test_a_mistyped_option_is_refused_naming_the_closest_one(monkeypatch, capsys, given, closest):
    status, _, err = fishnet_pl(monkeypatch, capsys, "fit", "--config", QUICKSTART, given, "1")
    assert_short_usage_error(status, err, given.split(".")[-1], closest)


def test_an_option_nothing_is_close_to_gets_no_guess(monkeypatch, capsys):
    status, _, err = fishnet_pl(monkeypatch, capsys, "fit", "--config", QUICKSTART, "--model.zzzzz", "1")
    assert status == 2 and err.splitlines() == ["fishnet-pl fit: error: unknown option --model.zzzzz",
                                                "  all options: fishnet-pl fit --help"], err


@pytest.mark.parametrize(("config", "refused", "closest"), [
    ({"model": {"bakbone": "fishnet_tiny"}}, "model.bakbone", "model.backbone"),
    ({"data": {"init_args": {"batch_sise": 4}}}, "batch_sise", "data.init_args.batch_size"),
    ({"trainer": {"max_epoch": 1}}, "trainer.max_epoch", "trainer.max_epochs"),
])
def test_an_unknown_key_of_a_config_file_is_refused_naming_the_closest_one(monkeypatch, capsys, tmp_path, config,
                                                                           refused, closest):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(config))
    status, _, err = fishnet_pl(monkeypatch, capsys, "fit", "--config", QUICKSTART, "--config", path)
    assert_short_usage_error(status, err, refused, closest)


def test_export_takes_no_abbreviation(monkeypatch, capsys, tmp_path):
    # Abbreviated, --ckpt_pat would have been read as --ckpt_path and the export tried.
    status, _, err = fishnet_pl(monkeypatch, capsys, "export", "--ckpt_pat", tmp_path / "run.ckpt",
                                "--format", "onnx", "--output", tmp_path / "x.onnx")
    assert status == 2 and "--ckpt_path" in err and "does not exist" not in err, err


# ---------------------------------------------------------------------- errors of fishnet-pl and bugs
def test_an_unknown_backbone_prints_the_message_alone(monkeypatch, capsys, tmp_path):
    status, _, err = fishnet_pl(monkeypatch, capsys, *small_validate(imagenet_folders(tmp_path)),
                                "--model.backbone", "fishnet_tinny")
    assert status == 1 and "Traceback" not in err, err
    assert err.splitlines()[-2].startswith("fishnet-pl: error: Unknown backbone 'fishnet_tinny'. Did you mean "
                                           "fishnet_tiny"), err
    assert TRACEBACK_VARIABLE in err.splitlines()[-1]

    monkeypatch.setenv(TRACEBACK_VARIABLE, "1")
    status, _, err = fishnet_pl(monkeypatch, capsys, *small_validate(tmp_path), "--model.backbone", "fishnet_tinny")
    assert status == 1 and "Traceback (most recent call last)" in err and "check_backbone_name" in err, err


def test_a_dataset_error_in_a_loading_worker_prints_its_message_alone_and_the_process_ends(tmp_path):
    root = imagenet_folders(tmp_path, broken="val/n01440764/2.JPEG")
    run = run_cli_subprocess([*small_validate(root), "--data.init_args.num_workers", "1"], cwd=tmp_path, timeout=300)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and "DataLoader worker" not in run.stderr, run.stderr[-3000:]
    assert re.fullmatch(rf"fishnet-pl: error: {re.escape(str(root / 'val/n01440764/2.JPEG'))}: cannot be decoded "
                        r"as an image \(.*\)", lines[-2]), lines[-2]
    assert TRACEBACK_VARIABLE in lines[-1]


class BuggyCallback(Callback):
    """A callback with a bug: an error raised outside fishnet-pl's own code."""

    def on_validation_start(self, trainer, pl_module):
        raise ZeroDivisionError("division by zero in a user's callback")


def test_a_bug_elsewhere_keeps_its_traceback(monkeypatch, capsys, tmp_path):
    status, _, err = fishnet_pl(monkeypatch, capsys, *small_validate(imagenet_folders(tmp_path)),
                                f"--trainer.callbacks+={__name__}.BuggyCallback")
    assert status == 1 and "Traceback (most recent call last)" in err and "in on_validation_start" in err, err
    assert err.strip().splitlines()[-1] == "ZeroDivisionError: division by zero in a user's callback"
    assert "fishnet-pl: error" not in err


# ---------------------------------------------------------------------- help
def test_help_lists_export_beside_lightnings_subcommands(monkeypatch, capsys):
    status, out, _ = fishnet_pl(monkeypatch, capsys, "--help")
    assert status == 0
    listed = re.findall(r"^ {4}(\w+) ", out, re.MULTILINE)
    assert listed == ["fit", "validate", "test", "predict", "export"], out


def test_data_help_takes_a_datamodules_short_name(monkeypatch, capsys):
    status, out, err = fishnet_pl(monkeypatch, capsys, "fit", "--data.help", "SegmentationFolderDataModule")
    assert status == 0, err
    arguments = list(inspect.signature(SegmentationFolderDataModule).parameters)
    assert arguments and all(f"--data.{name} " in out for name in arguments), out
