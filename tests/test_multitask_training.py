"""Training several tasks on one backbone (issue 23): learned uncertainty loss weights, tasks started from
single-task checkpoints (never read again once a checkpoint holds the weights), and the backbone options
(frozen stages, frozen BatchNorms, its learning rate) on the shared backbone."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import yaml

from fishnet_pl import FishNetModule, load_network
from fishnet_pl.tasks import ClassificationHead, DetectionHead, MultiTaskHead, SegmentationHead

from .conftest import CONFIGS, csv_logger, run_checkpoint, run_cli
from .test_multitask import CLASSES, DET, SEG, batches, three_tasks


def fit_steps(module: FishNetModule, batch: dict, folder, steps: int = 1) -> L.Trainer:
    """``steps`` optimizer steps of ``module`` on ``batch`` with a real Trainer (no validation), writing in
    ``folder``."""
    trainer = L.Trainer(max_steps=steps, limit_val_batches=0, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=folder)
    trainer.fit(module, torch.utils.data.DataLoader([batch] * steps, batch_size=None))
    return trainer


def test_uncertainty_weighting_learns_each_tasks_weight_and_checkpoints_keep_it(tmp_path):
    module = FishNetModule(MultiTaskHead({"cls": ClassificationHead(), "seg": SegmentationHead(**SEG)},
                                         loss_weighting="uncertainty"),
                           backbone="fishnet_tiny", num_classes={"cls": 4, "seg": 5}, lr=0.1)
    log_vars = module.head.log_vars
    with torch.no_grad():
        log_vars["cls"].fill_(0.5), log_vars["seg"].fill_(-0.25)
    # Kendall et al.'s sum_t exp(-s_t) * L_t + s_t on a real batch, each task's term and weight logged.
    batch = {task: batches()[task] for task in ("cls", "seg")}
    loss, logs = module.head.training_step(module.network.train(), batch)
    expected = sum(torch.exp(-log_vars[t]) * logs[f"{t}/loss"] + log_vars[t] for t in ("cls", "seg"))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logs["seg/weight"], torch.exp(torch.tensor(0.25)))
    torch.testing.assert_close(logs["cls/weighted_loss"], torch.exp(torch.tensor(-0.5)) * logs["cls/loss"] + 0.5)
    # The module's optimizer trains them without weight decay, which would pull them to 0.
    optimizer = module.configure_optimizers()["optimizer"]
    groups = [g for g in optimizer.param_groups if any(p is log_vars["cls"] for p in g["params"])]
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0 and len(groups[0]["params"]) == 2
    before = {t: s.item() for t, s in log_vars.items()}
    trainer = fit_steps(module, batch, tmp_path)
    assert all(log_vars[t].item() != before[t] for t in before)
    assert {"train/cls/weight", "train/seg/weight"} <= set(trainer.callback_metrics)
    trainer.save_checkpoint(tmp_path / "multi.ckpt")
    loaded = FishNetModule.load_from_checkpoint(tmp_path / "multi.ckpt")
    assert loaded.head.loss_weighting == "uncertainty"
    assert {t: s.item() for t, s in loaded.head.log_vars.items()} == {t: s.item() for t, s in log_vars.items()}
    # Fixed weights are the learned ones' alternative: both at once is a mistake.
    with pytest.raises(ValueError, match="leave loss_weights at 1"):
        MultiTaskHead({"cls": ClassificationHead()}, loss_weights={"cls": 2.0}, loss_weighting="uncertainty")


def two_task_config(folder, head: dict) -> str:
    """The multi-task quickstart with its classification and segmentation tasks only, no workers, ``head``'s
    further ``MultiTaskHead`` arguments; written into ``folder``."""
    config = yaml.safe_load((CONFIGS / "quickstart" / "multitask.yaml").read_text())
    config["model"]["head"]["init_args"]["tasks"].pop("det")
    config["model"]["head"]["init_args"].pop("loss_weights")
    config["model"]["head"]["init_args"].pop("monitor_task")  # det, which this run leaves out
    config["model"]["head"]["init_args"].update(head)
    data = config["data"]["init_args"]["datamodules"]
    data.pop("det")
    for dm in data.values():
        dm["init_args"]["num_workers"] = 0
    (folder / "two_tasks.yaml").write_text(yaml.safe_dump(config))
    return "two_tasks.yaml"


def quickstart_step(task: str) -> list[str]:
    return ["fit", "--config", CONFIGS / "quickstart" / f"{task}.yaml", "--trainer.max_steps", "1",
            "--trainer.limit_val_batches", "0",
            "--trainer.enable_progress_bar", "false", "--data.init_args.num_workers", "0", *csv_logger(task)]


def test_single_task_checkpoints_start_a_multitask_run_and_are_never_read_again(in_tmp):
    # One step of the segmentation and the classification quickstarts: the multi-task quickstart's two heads.
    run_cli([*quickstart_step("segmentation"), "--model.backbone_weights", "null"])
    run_cli(quickstart_step("classification"))
    seg_ckpt, cls_ckpt = in_tmp / "seg.ckpt", in_tmp / "cls.ckpt"
    run_checkpoint("segmentation").rename(seg_ckpt)
    run_checkpoint("classification").rename(cls_ckpt)
    seg = torch.load(seg_ckpt, weights_only=True)["state_dict"]
    cls = torch.load(cls_ckpt, weights_only=True)["state_dict"]
    tasks = yaml.safe_load((CONFIGS / "quickstart" / "multitask.yaml").read_text())["model"]["head"]["init_args"]
    heads = {name: tasks["tasks"][name] for name in ("cls", "seg")}

    def multitask(task_weights: dict, **kwargs) -> FishNetModule:
        return FishNetModule(MultiTaskHead(heads, task_weights={k: str(v) for k, v in task_weights.items()}),
                             backbone="fishnet_tiny", num_classes={"cls": 4, "seg": 19}, **kwargs)

    # Each task's whole network, its decoder exactly; the shared backbone from the last file listed.
    module = multitask({"cls": cls_ckpt, "seg": seg_ckpt})
    state = module.state_dict()
    decoder = [k for k in seg if not k.startswith("network.encoder.")]
    assert decoder and all(torch.equal(state[f"network.tasks.seg.{k[8:]}"], seg[k]) for k in decoder)
    assert torch.equal(state["network.tasks.cls.fc.weight"], cls["network.fc.weight"])  # the classifier's own
    backbone = {k: v for k, v in module.backbone.state_dict().items() if not k.startswith(("fc.", "pre_logits."))}
    assert all(torch.equal(v, seg[f"network.encoder.model.model.{k}"]) for k, v in backbone.items())
    other_order = multitask({"seg": seg_ckpt, "cls": cls_ckpt}).backbone.state_dict()
    assert all(torch.equal(v, cls[f"network.{k}"]) for k, v in other_order.items())
    # backbone_weights, applied after the tasks' files, replaces their backbone.
    replaced = multitask({"cls": cls_ckpt, "seg": seg_ckpt}, backbone_weights=str(cls_ckpt)).backbone.state_dict()
    assert all(torch.equal(v, cls[f"network.{k}"]) for k, v in replaced.items())
    # Another task's, class count's or backbone's checkpoint: an error naming the file and what differs.
    with pytest.raises(ValueError, match=r"cls.ckpt: not a checkpoint of this task; its task .*ClassificationHead"):
        multitask({"seg": cls_ckpt})
    with pytest.raises(ValueError, match=r"seg.ckpt: .* num_classes 19 \(this task's: 5\)"):
        FishNetModule(MultiTaskHead(heads, task_weights={"seg": str(seg_ckpt)}), backbone="fishnet_tiny",
                      num_classes={"cls": 4, "seg": 5})
    with pytest.raises(ValueError, match=r"seg.ckpt: .* backbone 'fishnet_tiny' \(this task's: 'resnet18'\)"):
        FishNetModule(MultiTaskHead(heads, task_weights={"seg": str(seg_ckpt)}), backbone="resnet18",
                      num_classes={"cls": 4, "seg": 19})

    # A multi-task run from them (and learned weights); then the files are gone, and every rebuild from its
    # checkpoint works: load_from_checkpoint, load_network, validate and a resumed fit through the CLI.
    config = two_task_config(in_tmp, {"task_weights": {"seg": str(seg_ckpt)}, "loss_weighting": "uncertainty"})
    args = ["--config", config, "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "1"]
    fit = run_cli(["fit", *args, "--model.backbone_weights", str(cls_ckpt), "--trainer.max_steps", "1",
                   *csv_logger("multi")])
    assert "train/seg/weight" in fit.trainer.callback_metrics
    seg_ckpt.unlink(), cls_ckpt.unlink()
    last = run_checkpoint("multi")
    loaded = FishNetModule.load_from_checkpoint(last)
    torch.testing.assert_close(loaded.state_dict(), fit.model.state_dict())
    assert load_network(last).tasks["seg"] is not None
    run_cli(["validate", *args, "--ckpt_path", last, *csv_logger("validate")])
    resumed = run_cli(["fit", *args, "--trainer.max_steps", "2", "--ckpt_path", last, *csv_logger("resumed")])
    assert resumed.trainer.global_step == 2
    # --ckpt_path last, which the CLI finds in the run folder after the config is read, does not read them either.
    again = run_cli(["fit", *args, "--model.backbone_weights", str(cls_ckpt), "--trainer.max_steps", "3",
                     "--trainer.default_root_dir", "multi", "--ckpt_path", "last", *csv_logger("again")])
    assert again.trainer.global_step == 3


@pytest.mark.parametrize("backbone", ["fishnet_tiny", "resnet18"])
def test_backbone_options_act_on_the_one_shared_backbone(backbone):
    head = MultiTaskHead({"cls": ClassificationHead(), "seg": SegmentationHead(**SEG), "det": DetectionHead(**DET)})
    module = FishNetModule(head, backbone=backbone, num_classes=dict(CLASSES), frozen_stages=2, freeze_bn=True,
                           backbone_lr_mult=0.1, lr=0.1)
    shared = {id(p) for p in module.backbone.parameters()}
    # Each parameter in one optimizer group: the shared backbone's once, at lr x backbone_lr_mult.
    groups = module.configure_optimizers()["optimizer"].param_groups
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in module.parameters()}
    assert {id(p) for p in groups[0]["params"]} == shared and groups[0]["lr"] == pytest.approx(0.01)
    assert groups[1]["lr"] == pytest.approx(0.1)
    # Frozen stages and BatchNorms for every task: each task's view of the backbone gets no gradient there.
    frozen = {id(p) for p in module.backbone.parameters() if not p.requires_grad}
    assert frozen and frozen < shared
    module.train()
    for task, path in (("cls", ""), ("seg", "encoder.model"), ("det", "backbone.body")):
        view = module.network.tasks[task].get_submodule(path)
        norms = [m for m in view.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert norms and not any(m.training for m in norms), task
        module.zero_grad()
        loss, _ = module.head.training_step(module.network, {task: batches()[task]})
        loss.backward()
        grads = {id(p) for p in view.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert grads and not grads & frozen, task
    # Without frozen stages nothing of it is frozen (the freeze above came from the options).
    assert all(p.requires_grad for p in three_tasks(backbone).backbone.parameters())
