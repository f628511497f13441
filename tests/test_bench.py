"""The benchmarks run end to end on tiny settings, write what they print, and count multiply-adds right."""

from __future__ import annotations

import json
import math
import re

import pytest
import timm
import torch
import torchvision

from bench import backbones, data, multitask, ops

# One thread: steadier on a shared machine, where 2-thread ops stall whenever a thread is descheduled.
TINY = ["--device", "cpu", "--threads", "1", "--batch-size", "2", "--image-size", "64", "--steps", "1", "--warmup", "1"]


def test_backbone_bench_writes_throughput_ratios_memory_and_machine(tmp_path, capsys):
    path = tmp_path / "backbones.json"
    threads = torch.get_num_threads()
    payload = backbones.main(["--models", "fishnet_tiny,resnet50", "--modes", "eager,channels_last", *TINY,
                              "--json", str(path)])
    assert torch.get_num_threads() == threads  # --threads holds for the run only

    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(payload))
    assert {"cpu", "cores", "torch", "timm", "torchvision", "device"} <= saved["machine"].keys()
    assert saved["machine"]["torch_threads"] == 1
    assert saved["settings"]["batch_size"] == 2 and saved["settings"]["image_size"] == 64
    assert "profiler" in saved["settings"]["peak_memory"]  # says what "peak memory" means on CPU
    rows = {(row["model"], row["mode"]): row for row in saved["results"]}
    assert rows.keys() == {(m, mode) for m in ("fishnet_tiny", "resnet50") for mode in ("eager", "channels_last")}
    for row in rows.values():
        for part in ("train", "infer"):
            result = row[part]
            assert result["images_per_s"] > 0 and result["peak_memory_mb"] > 0, (row["model"], row["mode"], part)
            assert result["vs_baseline"] > 0 and result["macs_per_s_vs_baseline"] > 0
    assert rows["resnet50", "eager"]["train"]["vs_baseline"] == 1.0
    # Activations of a training step outweigh those of an inference forward.
    assert rows["resnet50", "eager"]["train"]["peak_memory_mb"] > rows["resnet50", "eager"]["infer"]["peak_memory_mb"]
    assert saved["flops"]["fishnet_tiny"]["gmacs_224"] > saved["flops"]["fishnet_tiny"]["gmacs_bench"] > 0

    printed = capsys.readouterr().out
    assert "| fishnet_tiny | channels_last |" in printed and "| resnet50 | 25.56 | 4.09 | 4.10 | -0.3% |" in printed


def test_fused_mode_times_the_unfused_model_in_turn_and_reports_the_speed_up(tmp_path, capsys):
    payload = backbones.main(["--models", "fishnet_tiny", "--modes", "fused", *TINY,
                              "--json", str(tmp_path / "b.json")])
    (row,) = [row for row in payload["results"] if row["model"] == "fishnet_tiny"]
    assert "error" in row["train"]  # fused is for inference only
    assert row["infer"]["images_per_s"] > 0 and row["infer_unfused"]["images_per_s"] > 0
    assert row["infer"]["vs_eager"] == row["infer"]["images_per_s"] / row["infer_unfused"]["images_per_s"]
    assert f"fishnet_tiny: {row['infer']['vs_eager']:.2f}x its eager inference" in capsys.readouterr().out


def test_ops_bench_times_torchs_op_and_ours_for_each_layout_and_pass(capsys):
    rows = ops.main(["--batch-size", "1", "--repeats", "1", "--threads", "1"])
    printed = capsys.readouterr().out
    assert {(op, layout, run) for op, layout, run, *_ in rows} == {
        (op, layout, run) for op in ("2x2 max-pool", "nearest 2x up-sampling", "UR channel-pair sum")
        for layout in ("NCHW", "channels_last") for run in ("inference", "forward + backward")}
    for *_, theirs, ours, speedup in rows:
        assert float(theirs) > 0 and float(ours) > 0 and speedup in printed


def test_the_added_references_resnext50_and_densenet161_can_be_selected_and_measured(tmp_path, capsys):
    assert {"resnet50", "resnet101", "resnext50_32x4d", "densenet161"} <= set(backbones.DEFAULT_MODELS)
    # One as the baseline, so no third model is measured; 32x32 keeps DenseNet-161's steps short.
    payload = backbones.main(["--models", "densenet161", "--baseline", "resnext50_32x4d", "--modes", "eager", *TINY,
                              "--image-size", "32", "--json", str(tmp_path / "b.json")])
    rows = {row["model"]: row for row in payload["results"]}
    assert list(rows) == ["densenet161", "resnext50_32x4d"]
    for name in rows:
        for part in ("train", "infer"):
            result = rows[name][part]
            assert result["images_per_s"] > 0 and result["peak_memory_mb"] > 0, (name, part)
            assert result["vs_baseline"] > 0 and result["macs_per_s_vs_baseline"] > 0, (name, part)
        flops = payload["flops"][name]
        assert flops["gmacs_224"] == pytest.approx(flops["published_gmacs_224"], rel=0.01)
    printed = capsys.readouterr().out
    assert "| densenet161 | eager |" in printed and "| resnext50_32x4d | 25.03 | 4.23 | 4.23 |" in printed


def test_every_model_comes_from_the_same_timm_factory(monkeypatch):
    built = []
    create = backbones.fishnet_pl.create_backbone
    monkeypatch.setattr(backbones.fishnet_pl, "create_backbone",
                        lambda name, **kwargs: built.append(name) or create(name, **kwargs))
    with torch.device("meta"):
        models = {name: backbones.build_model(name) for name in ("fishnet_tiny", "resnet50", "densenet161")}
    assert built == list(models)
    assert isinstance(models["resnet50"], timm.models.ResNet)
    assert isinstance(models["densenet161"], timm.models.DenseNet)


def test_a_failing_model_is_reported_in_its_row_and_the_run_goes_on(tmp_path, capsys):
    # 48 is no multiple of FishNet's output stride: FishNet raises, ResNet-18 runs.
    payload = backbones.main(["--models", "fishnet_tiny", "--baseline", "resnet18", "--modes", "eager",
                              *TINY, "--image-size", "48", "--json", str(tmp_path / "b.json")])
    rows = {row["model"]: row for row in payload["results"]}
    assert rows["fishnet_tiny"]["train"]["error"].startswith("failed: ValueError: FishNet (output stride 32)")
    assert rows["resnet18"]["train"]["images_per_s"] > 0 and rows["resnet18"]["infer"]["images_per_s"] > 0
    assert "| fishnet_tiny | eager | failed: ValueError" in capsys.readouterr().out


def test_unknown_model_or_mode_stops_before_measuring_and_names_the_close_match(capsys):
    with pytest.raises(SystemExit):
        backbones.main(["--models", "fishnet105"])
    assert "fishnet150" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        backbones.main(["--modes", "fp16"])
    assert "eager, channels_last, bf16, compile" in capsys.readouterr().err


def test_mac_counter_agrees_with_torchvision_and_the_fishnet_paper():
    # torchvision documents ResNet-50 at 4.089 GFLOPS, meaning multiply-adds, as the counter's FLOPs / 2; timm's
    # ResNet-50, ResNeXt-50 and DenseNet-161 (concatenations and all) are the same networks as torchvision's.
    weights = {"resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
               "resnext50_32x4d": torchvision.models.ResNeXt50_32X4D_Weights.IMAGENET1K_V1,
               "densenet161": torchvision.models.DenseNet161_Weights.IMAGENET1K_V1}
    for name, weight in weights.items():
        assert backbones.count_macs(name) / 1e9 == pytest.approx(weight.meta["_ops"], rel=0.001), name
    # The paper's 6.45G for FishNet-150 counts a little more than convolutions; within 3%.
    assert backbones.count_macs("fishnet150") / 1e9 == pytest.approx(backbones.PUBLISHED_GMACS["fishnet150"], rel=0.03)


def test_data_bench_times_a_training_pipeline_on_quickstart_data(tmp_path, capsys):
    payload = data.main(["--datamodules", "imagenet", "--seconds", "0.2", "--json", str(tmp_path / "data.json")])
    result = payload["results"]["imagenet"]
    assert result["images_per_s"] > 0 and result["decode_images_per_s"] > 0 and result["decode_share"] > 0
    assert result["output_shape"] == "3x224x224" and result["train_images"] > 0
    assert json.loads((tmp_path / "data.json").read_text())["results"]["imagenet"] == json.loads(json.dumps(result))
    assert "| imagenet |" in capsys.readouterr().out


def test_data_bench_skips_a_datamodule_that_is_not_importable_with_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(data.DATAMODULES, "missing", ("datamodules.not_written_yet", "MissingDataModule", list))
    payload = data.main(["--datamodules", "missing", "--json", str(tmp_path / "data.json")])
    assert "not importable" in payload["results"]["missing"]["skipped"]
    captured = capsys.readouterr()
    assert "note: skipping missing" in captured.err and "| missing | skipped: not importable" in captured.out


# The recipe's three sub-heads at a small width (as tests/test_multitask.py builds them), in a task file.
TINY_HEADS = """
model:
  freeze_bn: true
  head:
    class_path: fishnet_pl.tasks.MultiTaskHead
    init_args:
      tasks:
        cls: {class_path: fishnet_pl.tasks.ClassificationHead}
        det:
          class_path: fishnet_pl.tasks.DetectionHead
          init_args: {fpn_channels: 32, representation_size: 32, mask_head_channels: 8, box_batch_size_per_image: 16}
        seg:
          class_path: fishnet_pl.tasks.SegmentationHead
          init_args: {decoder_kwargs: {decoder_pyramid_channels: 32, decoder_segmentation_channels: 32}}
      loss_weights: {seg: 0.5}
"""
TINY_MULTITASK = ["--model", "fishnet_tiny", "--device", "cpu", "--threads", "1", "--batch-sizes", "cls=2,det=1,seg=1",
                  "--image-sizes", "cls=64,det=64x96,seg=64", "--steps", "1", "--warmup", "1", "--rounds", "2"]


def test_multitask_bench_times_one_step_of_all_tasks_against_the_sum_of_the_single_steps(tmp_path, capsys):
    config = tmp_path / "heads.yaml"
    config.write_text(TINY_HEADS)
    threads = torch.get_num_threads()
    payload = multitask.main([*TINY_MULTITASK, "--config", str(config), "--json", str(tmp_path / "m.json")])
    assert torch.get_num_threads() == threads  # --threads holds for the run only
    assert json.loads((tmp_path / "m.json").read_text()) == json.loads(json.dumps(payload))
    s = payload["settings"]
    assert s["threads"] == 1 and s["options"] == {"freeze_bn": True}  # the config's freezing applies to every step
    assert {name: (t["head"], t["batch_size"], t["image_size"]) for name, t in s["tasks"].items()} == {
        "cls": ("ClassificationHead", 2, [64, 64]), "det": ("DetectionHead", 1, [64, 96]),
        "seg": ("SegmentationHead", 1, [64, 64])}

    results, ratios = payload["results"], payload["ratios"]
    assert list(results) == ["multi-task", "cls", "det", "seg", "sum"]
    for name, row in results.items():
        assert len(row["per_round_ms"]) == 2, name  # one time per round
        for key in ("step_ms", "step_ms_best", "peak_memory_mb", "state_mb", "total_mb", "params_m"):
            assert math.isfinite(row[key]) and row[key] > 0, (name, key)
        assert row["total_mb"] == pytest.approx(row["state_mb"] + row["peak_memory_mb"]), name
    for key in ("step_ms", "peak_memory_mb", "state_mb", "params_m"):
        assert results["sum"][key] == pytest.approx(sum(results[t][key] for t in ("cls", "det", "seg"))), key
    assert ratios["peak_memory"] == results["multi-task"]["peak_memory_mb"] / results["sum"]["peak_memory_mb"]
    assert ratios["time"] > 0 and math.isfinite(ratios["time"])
    # One backbone's weights and momentum instead of three.
    assert results["multi-task"]["params_m"] < results["sum"]["params_m"] and ratios["state"] < 1

    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| ")][1:]  # the header row left out
    assert [row.split(" | ")[0] for row in rows] == [
        "| multi-task (cls + det + seg)", "| cls alone (ClassificationHead)", "| det alone (DetectionHead)",
        "| seg alone (SegmentationHead)", "| sum of the single tasks"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 8 and all(math.isfinite(float(c)) for c in cells[1:7]), row
    assert f"time {ratios['time']:.2f}, peak {ratios['peak_memory']:.2f} |" in rows[0]
    assert re.search(r"## Multi-task step: fishnet_tiny \(cls 2 x 64x64, det 1 x 64x96, seg 1 x 64x64\)", printed)


@pytest.mark.parametrize(("argv", "message"), [
    (["--batch-sizes", "depth=2"], "name the tasks of"),
    (["--batch-sizes", "cls2"], "give task=value"),
    (["--image-sizes", "seg=64y64"], "HEIGHTxWIDTH"),
    (["--model", "fishnet105"], "fishnet150"),
])
def test_multitask_bench_refuses_bad_options_before_building_anything(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        multitask.main([*argv, "--json", str(tmp_path / "m.json")])
    assert message in capsys.readouterr().err


def test_multitask_bench_needs_a_config_with_a_multitask_head(tmp_path):
    config = tmp_path / "single.yaml"
    config.write_text("model:\n  head:\n    class_path: fishnet_pl.tasks.ClassificationHead\n")
    with pytest.raises(SystemExit, match=f"--config {config} has no model.head of class_path .*MultiTaskHead"):
        multitask.main(["--config", str(config)])
