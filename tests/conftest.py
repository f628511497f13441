"""Shared test helpers: paths of the shipped configs and a runner for the CLI."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# One torch thread in every test process (and in the processes they start), with or without xdist: make test
# runs two workers on two cores, and a test alone then computes exactly what it computes in the suite.
os.environ["OMP_NUM_THREADS"] = "1"
import torch  # noqa: E402

torch.set_num_threads(1)

DDP_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE")


def run_cli(args: list[str]):
    """Run ``fishnet-pl`` in this process; returns the LightningCLI (trainer, model, datamodule)."""
    from fishnet_pl.cli import build_cli

    return build_cli([str(a) for a in args])


def run_cli_subprocess(args: list[str], cwd: Path, timeout: int = 600,
                       new_session: bool = False) -> subprocess.CompletedProcess:
    """Run ``fishnet-pl`` as a new process (needed for DDP, which re-launches the command line); with
    ``new_session``, in a process group of its own, which a signal to the group reaches as a scheduler's would."""
    # Without the rendezvous variables an in-process DDP test left behind (Lightning stores its port in
    # os.environ): each run then picks a free port, instead of all reusing one that may still be taken.
    inherited = {k: v for k, v in os.environ.items() if k not in DDP_VARIABLES}
    env = {**inherited, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "fishnet_pl.cli", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          start_new_session=new_session)


def validation_metrics(args: list, cwd: Path, devices: int) -> dict[str, float]:
    """``fishnet-pl validate ARGS`` in ``cwd`` on ``devices`` CPU processes (DDP: a new process, which
    re-launches the others; one device: this process): the logged ``val/`` metrics."""
    out = Path(tempfile.mkdtemp(prefix=f"validate_on_{devices}_", dir=cwd))  # its own folder: nothing shared
    args = ["validate", *args, "--trainer.devices", devices, "--trainer.strategy", "ddp" if devices > 1 else "auto",
            "--trainer.enable_progress_bar", "false", *csv_logger(out)]
    if devices > 1:
        result = run_cli_subprocess(args, cwd=cwd)
        assert result.returncode == 0, result.stderr[-3000:]
        # The metrics are reduced over the processes already: Lightning's advice to sync them again is not shown.
        assert "sync_dist=True" not in result.stderr, result.stderr[-3000:]
        assert f"validate: logs and config.yaml go to {out}\n" in result.stdout + result.stderr, result.stderr[-3000:]
    else:
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(cwd)
            run_cli(args)
    with open(out / "metrics.csv") as f:
        row = next(csv.DictReader(f))
    return {name: float(value) for name, value in row.items() if value and name.startswith("val/")}


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run with a temporary working directory: the configs' relative data/ and runs/ land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def csv_logger(save_dir) -> list[str]:
    """CLI arguments replacing the config's loggers by one CSV logger writing (and checkpointing) in save_dir."""
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
              "init_args": {"save_dir": str(save_dir), "name": "", "version": ""}}
    return ["--trainer.logger", json.dumps(logger)]


@pytest.fixture(scope="session")
def classification_quickstart(tmp_path_factory):
    """The README's classification quickstart, fitted and tested once per session: (cli, working
    directory). Fitted in ``classification_quickstart_dir``'s folder unless another xdist worker got there
    first (that worker's run has no cli here)."""
    shared = _session_dir(tmp_path_factory) / "classification_quickstart"
    with FileLock(f"{shared}.lock"):
        done = (shared / DONE).exists()
        cwd = tmp_path_factory.mktemp("quickstart") if done else shared
        cli = _fit_classification_quickstart(cwd, test=True)
        if not done:
            (shared / DONE).touch()
    return cli, cwd


@pytest.fixture(scope="session")
def classification_quickstart_dir(tmp_path_factory) -> Path:
    """A working directory holding the fitted classification quickstart (``runs/quickstart/classification``),
    where the segmentation quickstart fine-tunes from its checkpoint: fitted once for all xdist workers."""
    shared = _session_dir(tmp_path_factory) / "classification_quickstart"
    with FileLock(f"{shared}.lock"):
        if not (shared / DONE).exists():
            _fit_classification_quickstart(shared, test=False)
            (shared / DONE).touch()
    return shared


DONE = ".fitted"


def run_checkpoint(run_root: str | os.PathLike, name: str = "last.ckpt") -> Path:
    """The newest ``name`` a recipe's runs wrote under ``run_root`` (its ``trainer.default_root_dir``), whatever
    the run-folder layout: ``<root>/checkpoints/``, ``<root>/<version>/checkpoints/`` or a link in ``<root>``."""
    root = Path(run_root)
    found = [p for p in (root / name, *root.glob(f"checkpoints/{name}"), *root.glob(f"*/checkpoints/{name}"),
                         *root.glob(f"*/*/checkpoints/{name}")) if p.is_file()]
    assert found, f"no {name} under {root}"
    return max(found, key=lambda p: p.stat().st_mtime)


def _session_dir(tmp_path_factory) -> Path:
    """The temporary folder of the whole session: xdist workers each have one below it."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _fit_classification_quickstart(cwd: Path, test: bool):
    cwd.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        cli = run_cli(["fit", "--config", CONFIGS / "quickstart" / "classification.yaml"])
        if test:
            cli.test_metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best")[0]
    return cli


def predict_from_checkpoint_alone(ckpt: Path, images: list[Path], tmp_path: Path,
                                  *args) -> tuple[Path, list[str], list[str]]:
    """``fishnet-pl predict --ckpt_path CKPT --data.predict_root DIR --predict_dir OUT`` as a user runs it on
    a copy of the checkpoint, in an empty working directory (no config, no dataset, no run folder), over a
    folder holding ``images`` (as ``nested/<name>``) and what users' folders hold besides: nested folders, the
    first image again under the same name in another folder, ``gray.jpg`` beside ``gray.png``, grayscale, CMYK,
    palette and odd-sized images, an unreadable ``.jpg`` and a text file; ``args`` are further CLI arguments.
    Returns OUT, the unreadable file's path as the prediction writer lists it, and the readable images' paths
    relative to DIR (sorted)."""
    import shutil

    import numpy as np
    from PIL import Image

    folder, cwd, out = tmp_path / "my photos", tmp_path / "elsewhere", tmp_path / "out"
    (folder / "nested" / "deeper").mkdir(parents=True)
    cwd.mkdir()
    for image in images:
        shutil.copy(image, folder / "nested" / image.name)
    shutil.copy(images[0], folder / "nested" / "deeper" / images[0].name)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 70), np.uint8)).save(folder / "gray.jpg")
    Image.fromarray(rng.integers(0, 255, (70, 50), np.uint8)).save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 255, (81, 33, 3), np.uint8)).convert("CMYK").save(folder / "nested" / "cmyk.JPG")
    palette = Image.fromarray(rng.integers(0, 255, (45, 61, 3), np.uint8)).convert("P")
    palette.save(folder / "nested" / "deeper" / "p.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    (folder / "notes.txt").write_text("not an image")
    shutil.copy(ckpt, cwd / "model.ckpt")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        run_cli(["predict", "--ckpt_path", "model.ckpt", "--data.predict_root", folder, "--predict_dir", out,
                 "--trainer.enable_progress_bar", "false", *args])
    assert sorted(p.name for p in cwd.iterdir()) == ["model.ckpt"], "predict wrote outside --predict_dir"
    readable = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                      if p.is_file() and p.name not in ("broken.jpg", "notes.txt"))
    return out, [str(folder / "broken.jpg")], readable


def assert_same_final_weights(expected, actual, global_step: int) -> None:
    """Both checkpoints are at ``global_step`` and hold identical weights and buffers, bit for bit."""
    import torch

    a, b = (torch.load(path, weights_only=True) for path in (expected, actual))
    assert a["global_step"] == b["global_step"] == global_step
    assert a["state_dict"].keys() == b["state_dict"].keys()
    different = [key for key, value in a["state_dict"].items() if not torch.equal(b["state_dict"][key], value)]
    assert not different, f"{len(different)} of {len(a['state_dict'])} tensors differ, e.g. {different[:3]}"
