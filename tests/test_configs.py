"""Every shipped config, alone or composed, resolves to a runnable configuration (--print_config)."""

from __future__ import annotations

import pytest
import yaml

import fishnet_pl

from .conftest import CONFIGS, run_cli

RECIPES = sorted(p for d in ("quickstart", "imagenet", "cityscapes", "coco") for p in (CONFIGS / d).glob("*.yaml"))
TASK_DATA = {"classification": "imagenet", "segmentation": "cityscapes", "detection": "coco"}
BACKBONES = sorted(p.stem for p in (CONFIGS / "backbone").glob("*.yaml"))
TRAINERS = sorted(p.stem for p in (CONFIGS / "trainer").glob("*.yaml") if p.stem != "default")


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
             CONFIGS / f"data/{TASK_DATA[task]}.yaml", CONFIGS / "trainer/default.yaml",
             CONFIGS / f"trainer/{trainer}.yaml"]
    config = resolved(capsys, *files)
    assert config["model"]["backbone"] == "fishnet150"
    assert config["model"]["head"]["class_path"].lower().endswith(f"{task}head")
    assert config["seed_everything"] == 42


def test_swapping_the_task_is_swapping_the_task_and_data_files(capsys):
    heads = {}
    for task, data in TASK_DATA.items():
        config = resolved(capsys, CONFIGS / "backbone/fishnet99.yaml", CONFIGS / f"task/{task}.yaml",
                          CONFIGS / f"data/{data}.yaml")
        assert config["model"]["backbone"] == "fishnet99"
        heads[task] = (config["model"]["head"]["class_path"], config["data"]["class_path"])
    assert len(set(heads.values())) == 3
