"""``fishnet-pl fit|validate|test|predict --config ...``: LightningCLI over FishNetModule.

Configs compose: ``--config configs/backbone/fishnet150.yaml --config configs/task/classification.yaml
--config configs/data/imagenet.yaml --config configs/trainer/gpu8.yaml``; later files override
earlier ones and ``--print_config`` shows the merged run.
"""

from __future__ import annotations

import os
import sys

import lightning as L
import timm
from lightning.pytorch.cli import LightningCLI

from fishnet_pl.callbacks import PredictionWriter
from fishnet_pl.module import FishNetModule


class FishNetCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The dataset knows its classes; the model never repeats them.
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.add_argument("--predict_dir", type=str | None, default=None,
                            help="predict: folder for the prediction files (default <default_root_dir>/predictions)")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        self._loggers_write_under_default_root_dir(config)
        # Input size and evaluation resize are the backbone's (timm's pretrained_cfg), unless the config sets them.
        data = config.get("data") or {}
        init = data.get("init_args") if hasattr(data, "get") else None
        if init is None or "image_size" not in init:
            return
        cfg = timm.get_pretrained_cfg(config["model"]["backbone"].split(".")[0])
        if cfg is not None and init["image_size"] is None:
            init["image_size"] = cfg.input_size[-1]
        if cfg is not None and init.get("val_resize") is None:
            init["val_resize"] = round(init["image_size"] / cfg.crop_pct)

    #: A logger's save_dir in the configs: the CLI replaces it by trainer.default_root_dir (Lightning's
    #: CSV/TensorBoard loggers require a save_dir, so the configs cannot just leave it out).
    DEFAULT_ROOT_DIR = "${trainer.default_root_dir}"

    @classmethod
    def _loggers_write_under_default_root_dir(cls, config) -> None:
        # So --trainer.default_root_dir DIR moves logs and checkpoints (in the first logger's folder) with it.
        # jsonargparse gives a list of Namespaces (class_path, init_args), or one; a save_dir set by the user stays.
        trainer = config.get("trainer") or {}
        loggers = trainer.get("logger") if hasattr(trainer, "get") else None
        if loggers is None or isinstance(loggers, bool):
            return
        root = trainer.get("default_root_dir") or os.getcwd()  # Lightning's own default
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init = logger.get("init_args") if hasattr(logger, "get") else None
            if init is not None and init.get("save_dir") in (None, cls.DEFAULT_ROOT_DIR):
                init["save_dir"] = root

    def before_predict(self) -> None:
        # Not a model hyper-parameter: with --ckpt_path, LightningCLI takes those from the checkpoint.
        writer = PredictionWriter.for_head(self.model.head, self.config[self.subcommand].predict_dir)
        if writer is not None:
            self.trainer.callbacks.append(writer)


def build_cli(args: list[str] | None = None, run: bool = True) -> FishNetCLI:
    """Parse ``args`` (default: the command line), build trainer, model and data, and run the subcommand."""
    return FishNetCLI(FishNetModule, L.LightningDataModule, subclass_mode_data=True, args=args, run=run,
                      save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False)


def main(args: list[str] | None = None) -> None:
    """Console script ``fishnet-pl``: LightningCLI's fit/validate/test/predict, and ``export`` (ONNX, pt2)."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "export":
        from fishnet_pl.export import export_main

        export_main(argv[1:])
        return
    build_cli(args)


if __name__ == "__main__":
    main()
