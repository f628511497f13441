"""Every shipped config, alone or composed, resolves to a runnable configuration (--print_config); every
composed command of the README resolves to the same run as its one-file recipe; a run writes under its
default_root_dir."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

import fishnet_pl
from fishnet_pl.tasks import MultiTaskHead

from .conftest import CONFIGS, ROOT, run_cli

RECIPES = sorted(p for d in ("quickstart", "imagenet", "cityscapes", "coco", "multitask")
                 for p in (CONFIGS / d).glob("*.yaml"))
# Task file -> (its data file, its head's class name).
TASK_DATA = {"classification": ("imagenet", "ClassificationHead"), "segmentation": ("cityscapes", "SegmentationHead"),
             "detection": ("coco", "DetectionHead"), "panoptic_fpn": ("coco_panoptic", "PanopticHead")}
BACKBONES = sorted(p.stem for p in (CONFIGS / "backbone").glob("*.yaml"))
TRAINERS = sorted(p.stem for p in (CONFIGS / "trainer").glob("*.yaml") if p.stem != "default")
# One-file recipe -> its task and data files; with a backbone file, the shared trainer file and the machine
# file, they compose the same run.
RECIPE_PARTS = {"imagenet/fishnet150.yaml": ("task/classification.yaml", "data/imagenet.yaml"),
                "coco/maskrcnn_fishnet150_fpn_1x.yaml": ("task/detection.yaml", "data/coco.yaml"),
                "cityscapes/fpn_fishnet150.yaml": ("task/segmentation.yaml", "data/cityscapes.yaml"),
                "coco/panoptic_fpn_fishnet150_1x.yaml": ("task/panoptic_fpn.yaml", "data/coco_panoptic.yaml")}
MACHINE = ("trainer/default.yaml", "trainer/gpu8.yaml")
# The data files of the recipes. The README composes others (ADE20K, VOC, your own folders) from parts only: those
# runs have no one-file twin (tests/test_segmentation_folder.py resolves their compositions).
RECIPE_DATA = {data for _, data in RECIPE_PARTS.values()}
# Where the commands are: the front page and the guides of the docs site.
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def readme_fit_configs() -> list[list[str]]:
    """The --config files (relative to configs/) of every ``fishnet-pl fit`` command in the DOCUMENTS' bash blocks,
    continuation lines joined and ``R="..."`` shorthands expanded; commands with a placeholder (...) skipped."""
    commands = []
    text = "\n".join(p.read_text() for p in DOCUMENTS)
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        shorthands = {}
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if m := re.fullmatch(r'(\w+)="(.*)"', line):
                shorthands[m[1]] = m[2]
                continue
            for name, value in shorthands.items():
                line = line.replace(f"${name}", value)
            words = shlex.split(line, comments=True)
            if words[:2] != ["fishnet-pl", "fit"]:
                continue
            configs = [words[i + 1] for i, w in enumerate(words) if w == "--config"]
            if configs and all((ROOT / c).is_file() for c in configs):
                commands.append([c.removeprefix("configs/") for c in configs])
    return commands


def readme_twins() -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """(one-file recipe [+ backbone file], the composition of the same run) for every README command that
    uses a recipe or composes one: a composed command is paired with the recipe of its task and data files,
    a recipe command (the paper's rows swap the backbone file) with the composition it stands for."""
    twins = {}
    for configs in readme_fit_configs():
        if configs[0] in RECIPE_PARTS:
            recipe, backbones = configs[0], [c for c in configs[1:] if c.startswith("backbone/")]
            assert len(configs) == 1 + len(backbones), f"README: unexpected files after a recipe: {configs}"
            backbone = backbones[-1] if backbones else None
            default = "backbone/" + yaml.safe_load((CONFIGS / recipe).read_text())["model"]["backbone"] + ".yaml"
            composed = (backbone or default, *RECIPE_PARTS[recipe], *MACHINE)
            twins.setdefault(composed, (recipe,) if backbone in (None, default) else (recipe, backbone))
        elif len(configs) > 1 and RECIPE_DATA & set(configs):
            recipes = [r for r, parts in RECIPE_PARTS.items() if configs[1:3] == list(parts)]
            assert configs[0].startswith("backbone/") and recipes, f"README: a composition with no recipe: {configs}"
            backbone = yaml.safe_load((CONFIGS / recipes[0]).read_text())["model"]["backbone"]
            one_file = (recipes[0],) if configs[0] == f"backbone/{backbone}.yaml" else (recipes[0], configs[0])
            twins.setdefault(tuple(configs), one_file)
    return [(one_file, composed) for composed, one_file in twins.items()]


def resolved(capsys, *configs) -> dict:
    args = ["fit"] + [a for c in configs for a in ("--config", c)] + ["--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(args)
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_every_fishnet_variant_and_the_papers_baselines_have_a_backbone_file():
    fishnets = fishnet_pl.list_backbones("fishnet*") + fishnet_pl.list_backbones("fishnext*")
    baselines = ["densenet161", "resnet101", "resnet50", "resnext50_32x4d"]
    assert BACKBONES == sorted(fishnets + baselines)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_full_recipe_resolves(recipe, capsys):
    config = resolved(capsys, recipe)
    assert config["model"]["backbone"] in fishnet_pl.list_backbones()
    assert config["data"]["class_path"].startswith("datamodules.")


@pytest.mark.parametrize("task", sorted(TASK_DATA))
@pytest.mark.parametrize("trainer", TRAINERS)
def test_backbone_task_data_trainer_files_compose(task, trainer, capsys):
    files = [CONFIGS / "backbone/fishnet150.yaml", CONFIGS / f"task/{task}.yaml",
             CONFIGS / f"data/{TASK_DATA[task][0]}.yaml", CONFIGS / "trainer/default.yaml",
             CONFIGS / f"trainer/{trainer}.yaml"]
    config = resolved(capsys, *files)
    assert config["model"]["backbone"] == "fishnet150"
    assert config["model"]["head"]["class_path"] == f"fishnet_pl.tasks.{TASK_DATA[task][1]}"
    assert config["seed_everything"] == 42


def test_swapping_the_task_is_swapping_the_task_and_data_files(capsys):
    heads = {}
    for task, (data, _) in TASK_DATA.items():
        config = resolved(capsys, CONFIGS / "backbone/fishnet99.yaml", CONFIGS / f"task/{task}.yaml",
                          CONFIGS / f"data/{data}.yaml")
        assert config["model"]["backbone"] == "fishnet99"
        heads[task] = (config["model"]["head"]["class_path"], config["data"]["class_path"])
    assert len(set(heads.values())) == len(TASK_DATA)


def test_the_readme_composes_every_recipe():
    composed = [c for c in readme_fit_configs() if c[0].startswith("backbone/") and RECIPE_DATA & set(c)]
    assert {tuple(c[1:3]) for c in composed} == set(RECIPE_PARTS.values())


@pytest.mark.parametrize(("one_file", "composed"), readme_twins(),
                         ids=lambda files: "+".join(f.removesuffix(".yaml") for f in files))
def test_a_readme_composition_is_the_same_run_as_its_one_file_recipe(one_file, composed, capsys):
    # Nothing is left out of the comparison: the recipe is the composition written out (same run folder,
    # loggers writing in it, same machine). The commands' other arguments are the same on both sides.
    assert resolved(capsys, *(CONFIGS / c for c in one_file)) == resolved(capsys, *(CONFIGS / c for c in composed))


MULTITASK_RECIPE = "multitask/fishnet150_in1k_coco_cityscapes.yaml"
#: Its datamodules by task name: the data file each one is.
MULTITASK_DATA = {"cls": "data/imagenet.yaml", "det": "data/coco.yaml", "seg": "data/cityscapes.yaml"}


def test_the_multitask_recipe_is_its_parts_written_out(capsys):
    """Model and trainer: backbone + task/multitask + the shared trainer file + the machine file; each task's
    datamodule: that task's data file; the tasks of the head, its loss weights and the data: the same names."""
    recipe = resolved(capsys, CONFIGS / MULTITASK_RECIPE)
    composed = resolved(capsys, *(CONFIGS / c for c in ("backbone/fishnet150.yaml", "task/multitask.yaml", *MACHINE)))
    assert {k: v for k, v in recipe.items() if k != "data"} == {k: v for k, v in composed.items() if k != "data"}
    datamodules = recipe["data"]["init_args"]["datamodules"]
    for task, data in MULTITASK_DATA.items():
        assert datamodules[task] == resolved(capsys, CONFIGS / data)["data"], task
    head = recipe["model"]["head"]["init_args"]
    assert set(head["tasks"]) == set(head["loss_weights"]) == set(datamodules) == set(MULTITASK_DATA)
    assert head["tasks"]["cls"]["class_path"] == "fishnet_pl.tasks.ClassificationHead"  # the classifier is shared
    # The sub-heads' arguments are plain dicts to the CLI (MultiTaskHead takes any head): the heads check them.
    heads = MultiTaskHead(**head).heads
    assert heads["det"].min_size == 800 and heads["seg"].eval_mode == "whole"


@pytest.mark.parametrize("trainer", TRAINERS)
def test_the_multitask_task_file_composes_with_any_backbone_and_machine(trainer, capsys):
    config = resolved(capsys, CONFIGS / "backbone/resnet50.yaml", CONFIGS / "task/multitask.yaml",
                      CONFIGS / "trainer/default.yaml", CONFIGS / f"trainer/{trainer}.yaml")
    assert config["model"]["backbone"] == "resnet50"
    assert config["model"]["head"]["class_path"] == "fishnet_pl.tasks.MultiTaskHead"
    assert config["trainer"]["default_root_dir"] == "runs/multitask_in1k_coco_cityscapes"


@pytest.mark.parametrize("machine", TRAINERS)
def test_a_machine_file_sets_no_recipe_value(machine):
    config = yaml.safe_load((CONFIGS / f"trainer/{machine}.yaml").read_text())
    assert set(config) == {"trainer"}
    assert set(config["trainer"]) <= {"accelerator", "devices", "num_nodes", "strategy", "sync_batchnorm"}


def test_default_root_dir_takes_every_output_of_a_run(in_tmp):
    out = in_tmp / "out"
    args = ["--config", CONFIGS / "quickstart/classification.yaml", "--trainer.default_root_dir", out,
            "--data.init_args.image_size", "32", "--data.init_args.val_resize", "36",
            "--data.init_args.num_workers", "0", "--trainer.enable_progress_bar", "false"]
    run_cli(["fit", *args, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
             "--trainer.limit_val_batches", "1"])
    run = out / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file() and (out / "last.ckpt").is_file()
    assert (run / "metrics.csv").is_file() and list(run.glob("events.out.tfevents.*"))
    run_cli(["predict", *args, "--ckpt_path", out / "last.ckpt"])
    assert list(out.glob("predictions*/predictions.jsonl"))
    assert not (in_tmp / "runs").exists()


def _fit_tiny(*args) -> list[str]:
    return ["fit", *args, "--data.init_args.image_size", "32", "--data.init_args.val_resize", "36",
            "--data.init_args.num_workers", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_every_run_of_a_recipe_has_its_own_folder_and_a_failed_run_deletes_nothing(in_tmp):
    """Re-running a recipe in its folder, or a run that stops in set-up, leaves every earlier run's logs,
    checkpoints and config as they were; the recipe folder's last.ckpt follows the newest run."""
    recipe = ["--config", CONFIGS / "quickstart/classification.yaml"]
    run_cli(_fit_tiny(*recipe))
    runs = in_tmp / "runs" / "quickstart" / "classification"
    first = _files(runs / "version_0")
    assert {"metrics.csv", "config.yaml", "checkpoints/last.ckpt"} <= set(first)
    with pytest.raises(Exception, match="no_such_folder"):  # a typo in the data folder: stops in set-up
        run_cli(_fit_tiny(*recipe, "--data.init_args.root", in_tmp / "no_such_folder",
                          "--data.init_args.quickstart", "false"))
    assert _files(runs / "version_0") == first
    second = run_cli(_fit_tiny(*recipe))
    newest = Path(second.trainer.log_dir).absolute()
    assert newest.parent == runs and newest.name.startswith("version_") and newest.name != "version_0"
    assert _files(runs / "version_0") == first
    assert (runs / "last.ckpt").resolve() == (newest / "checkpoints" / "last.ckpt").resolve()


def test_the_composed_recipe_writes_each_run_in_one_folder(in_tmp):
    """CSV and TensorBoard logs, checkpoints and config.yaml of one run share one version folder (Lightning's
    loggers would each take their own next version), and the next run takes the next one."""
    from datamodules.quickstart import write_classification

    data = write_classification(in_tmp / "imagenet")
    composed = [arg for part in ("backbone/fishnet_tiny.yaml", "task/classification.yaml", "data/imagenet.yaml",
                                 "trainer/default.yaml", "trainer/cpu.yaml") for arg in ("--config", CONFIGS / part)]
    for version in (0, 1):
        cli = run_cli(_fit_tiny(*composed, "--data.init_args.root", data, "--data.init_args.batch_size", "4",
                                "--trainer.precision", "32-true"))
        run = in_tmp / "runs" / "imagenet" / f"version_{version}"
        assert Path(cli.trainer.log_dir).absolute() == run
        assert sorted(p.name for p in (in_tmp / "runs" / "imagenet").glob("version_*")) == [
            f"version_{v}" for v in range(version + 1)]
        assert (run / "metrics.csv").is_file() and list(run.glob("events.out.tfevents.*"))
        assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
