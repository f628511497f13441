"""The end-to-end benchmarks (``bench.fit``, ``bench.predict``) run on tiny settings, time both sides and write what
they print; no timing is asserted (a shared machine decides those)."""

from __future__ import annotations

import json

import pytest
import torch

from bench import fit, predict, stretch_rate

TINY = ["--model", "fishnet_tiny", "--image-size", "64", "--batch-size", "4", "--steps", "2", "--warmup", "1",
        "--rounds", "1", "--threads", "1"]


def check_written_with_machine(path, payload) -> dict:
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(payload))
    assert {"cpu", "cores", "torch", "timm", "torchvision", "torch_threads"} <= saved["machine"].keys()
    assert len(saved["machine"]["load_average_1min"]) == 2  # at start and end
    return saved


def test_fit_bench_times_fishnet_pl_fit_and_the_plain_loop_in_turn(tmp_path, capsys):
    path = tmp_path / "fit.json"
    threads = torch.get_num_threads()
    payload = fit.main([*TINY, "--workers", "1", "--json", str(path)])
    assert torch.get_num_threads() == threads  # --threads holds for the run only

    saved = check_written_with_machine(path, payload)
    assert saved["settings"]["threads"] == 1
    assert saved["settings"]["recommended"] == "bf16-mixed + channels_last"  # FishNetModule takes channels_last
    rows = {row["side"]: row for row in saved["results"]}
    assert list(rows) == ["plain", "fp32", "recommended"] and {row["workers"] for row in rows.values()} == {1}
    for side, row in rows.items():
        assert row["images_per_s"] > 0 and row["images_per_s_best"] >= row["images_per_s"], side
        assert 0 <= row["data_wait_share"] <= 1, side
        assert [r["steps"] for r in row["per_round"]] == [2], side  # the warm-up step is not timed
        assert row["torch_threads"] == 1, side  # Lightning's loop ran with the bench's thread count
        assert row["vs_plain_fp32"] == row["images_per_s"] / rows["plain"]["images_per_s"], side
    assert rows["fp32"]["aim"] == 0.95 and rows["recommended"]["aim"] == 1.8

    printed = capsys.readouterr().out
    for row in rows.values():
        assert f"| 1 | {row['run']} | {row['images_per_s']:.2f} |" in printed


def test_fit_bench_reports_the_data_wait_of_other_datamodules_per_worker_count(tmp_path, capsys):
    payload = fit.main([*TINY, "--modes", "fp32", "--workers", "0,1", "--datamodules", "cityscapes,coco",
                        "--json", str(tmp_path / "fit.json")])
    rows = {(d["datamodule"], d["workers"]): d for d in payload["datamodules"]}
    assert set(rows) == {(name, w) for name in ("cityscapes", "coco") for w in (0, 1)}
    for key, row in rows.items():
        assert row["images_per_s"] > 0 and 0 <= row["data_wait_share"] <= 1, key
        assert [r["steps"] for r in row["per_round"]] == [2], key
    printed = capsys.readouterr().out
    assert "| cityscapes | configs/quickstart/segmentation.yaml | 1 |" in printed


def test_predict_bench_times_fishnet_pl_predict_and_load_network_in_turn(tmp_path, capsys):
    path = tmp_path / "predict.json"
    payload = predict.main([*TINY, "--workers", "0", "--json", str(path)])

    saved = check_written_with_machine(path, payload)
    assert saved["settings"]["images"] == 3 * 4 and saved["settings"]["timed_batches"] == 2
    rows = {row["side"]: row for row in saved["results"]}
    assert list(rows) == ["plain", "lightning"]
    for side, row in rows.items():
        assert row["images_per_s"] > 0 and 0 <= row["data_wait_share"] <= 1, side
        assert row["torch_threads"] == 1, side
    assert rows["lightning"]["vs_plain"] == rows["lightning"]["images_per_s"] / rows["plain"]["images_per_s"]
    assert f"| 0 | fishnet-pl predict | {rows['lightning']['images_per_s']:.2f} |" in capsys.readouterr().out


def test_predict_bench_reads_a_given_checkpoint_and_folder_and_times_full_batches_only(tmp_path, capsys):
    from bench import write_jpegs

    ckpt = predict.make_checkpoint(predict.parse_args(TINY), tmp_path / "made")
    write_jpegs(tmp_path / "photos" / "a", 7, 80)  # nested, and 7 = one full batch of 4 and a partial one
    write_jpegs(tmp_path / "photos" / "b", 4, 48, seed=1)
    payload = predict.main(["--ckpt", str(ckpt), "--root", str(tmp_path / "photos"), "--batch-size", "4",
                            "--warmup", "1", "--rounds", "1", "--threads", "1", "--workers", "0",
                            "--json", str(tmp_path / "p.json")])
    assert payload["settings"]["images"] == 11 and payload["settings"]["timed_batches"] == 1
    assert all(row["per_round"][0]["steps"] == 1 for row in payload["results"])


def test_a_stretch_is_timed_from_the_end_of_the_warm_up_and_its_waits_are_the_gaps_between_steps():
    # Steps of 1 s each, 0.5 s apart: the warm-up step and the wait before it are left out.
    starts, ends = [0.0, 1.5, 3.0], [1.0, 2.5, 4.0]
    result = stretch_rate(starts, ends, warmup=1, batch_size=8)
    assert result["steps"] == 2 and result["seconds"] == ends[-1] - ends[0]
    assert result["images_per_s"] == 2 * 8 / result["seconds"]
    assert result["data_wait_share"] == (0.5 + 0.5) / result["seconds"]
    with pytest.raises(ValueError, match="warmup"):
        stretch_rate(starts, ends, warmup=3, batch_size=8)


@pytest.mark.parametrize(("bench", "argv", "message"), [
    (fit, ["--modes", "fp16"], "--modes takes fp32, recommended"),
    (fit, ["--warmup", "0"], "at least 1"),
    (fit, ["--root", "nowhere"], "--root nowhere: no train/ folder"),
    (fit, ["--model", "fishnet105"], "fishnet150"),
    (predict, ["--ckpt", "missing.ckpt"], "--ckpt missing.ckpt: no such file"),
])
def test_bad_options_stop_before_measuring_and_say_what_to_give(bench, argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert message in capsys.readouterr().err


def test_fit_bench_refuses_a_root_whose_epoch_is_shorter_than_a_round(tmp_path):
    root = fit.write_dataset(tmp_path / "small", 8)  # one batch of 8 in all
    with pytest.raises(SystemExit, match="holds 8 images, fewer than --warmup \\+ --steps = 3 batches of 8"):
        fit.main(["--root", str(root), "--model", "fishnet_tiny", "--warmup", "1", "--steps", "2",
                  "--json", str(tmp_path / "f.json")])
