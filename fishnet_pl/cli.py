"""``fishnet-pl fit|validate|test|predict --config ...``: LightningCLI over FishNetModule.

Configs compose: ``--config configs/backbone/fishnet150.yaml --config configs/task/classification.yaml
--config configs/data/imagenet.yaml --config configs/trainer/gpu8.yaml``; later files override
earlier ones and ``--print_config`` shows the merged run.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import lightning as L
import timm
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from fishnet_pl.callbacks import PredictionWriter
from fishnet_pl.inference import read_checkpoint
from fishnet_pl.malloc import keep_freed_memory
from fishnet_pl.models.weights import CKPT_BACKBONE_KEY, CKPT_CLASS_NAMES_KEY, CKPT_PREDICT_DATA_KEY
from fishnet_pl.module import FishNetModule

#: The data of ``predict --ckpt_path CKPT`` given without a config: a folder of images, prepared as the checkpoint says.
PREDICT_FOLDER = "datamodules.predict.PredictFolderDataModule"


class FishNetCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The dataset knows its classes; the model never repeats them.
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.add_argument("--predict_dir", type=str | None, default=None,
                            help="predict: folder for the prediction files (default <default_root_dir>/predictions)")

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # LightningCLI reads the checkpoint's hyper-parameters right after this: a bad file fails here, named.
        subcommand = self.config.get("subcommand")
        if subcommand:
            check_checkpoint(self.config[subcommand].get("ckpt_path"), resume=subcommand == "fit")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        self._loggers_write_under_default_root_dir(config)
        if self.subcommand == "predict":  # it writes prediction files only: no logs to replace the training run's
            config["trainer"]["logger"] = False
        if self.subcommand in ("validate", "test", "predict") and config.get("ckpt_path"):
            # The checkpoint's weights replace the backbone's initial ones: do not read (or fetch) those.
            config["model"]["backbone_weights"] = None
            self._predict_data_from_checkpoint(config)
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

    @staticmethod
    def _predict_data_from_checkpoint(config) -> None:
        # PredictFolderDataModule's unset arguments: what the checkpoint recorded of its training data.
        data = config.get("data")
        if not data or data.get("class_path") != PREDICT_FOLDER or not os.path.isfile(config["ckpt_path"]):
            return
        ckpt = read_checkpoint(config["ckpt_path"], mmap=True)  # a few small entries: the tensors stay on disk
        recorded = {**ckpt.get(CKPT_PREDICT_DATA_KEY, {}), "class_names": ckpt.get(CKPT_CLASS_NAMES_KEY),
                    "num_classes": ckpt["hyper_parameters"].get("num_classes")}
        init = data["init_args"]
        for key, value in recorded.items():
            if key in init and init[key] is None:
                init[key] = value

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

    def before_fit(self) -> None:
        self._check_run()

    def before_validate(self) -> None:
        self._check_run()

    def before_test(self) -> None:
        self._check_run()

    def _check_run(self) -> None:
        """Before the trainer starts, not hours into the run: every output folder is writable, and ``--ckpt_path``
        is one of our checkpoints (resumable, for ``fit``); ``last`` is the newest in the run folder."""
        config = self.config_init[self.subcommand]
        check_writable(self.trainer.default_root_dir, "--trainer.default_root_dir")
        for logger in self.trainer.loggers:
            if getattr(logger, "save_dir", None):
                check_writable(logger.save_dir, f"the save_dir of {type(logger).__name__}")
        if config.get("predict_dir"):
            check_writable(config["predict_dir"], "--predict_dir")
        if self.subcommand == "fit" and config.get("ckpt_path") == "last":
            # A file given by name was checked in parse_arguments; the one "last" finds is checked here.
            config["ckpt_path"] = self._last_checkpoint()
            check_checkpoint(config["ckpt_path"], resume=True)

    def _last_checkpoint(self) -> str:
        """``--ckpt_path last``: the newest checkpoint this run folder holds, else ``last`` (Lightning starts afresh).

        Lightning's ``last`` looks for ``last*.ckpt`` in this run's checkpoint folder only: not in the version
        folder of the run that was stopped (a logger without a fixed ``version`` starts a new one each run), nor
        at the ``hpc_ckpt_N.ckpt`` that SLURM's requeue signal (``--signal=USR1@90``) makes Lightning save in
        ``default_root_dir`` (it reads those only without a ``ckpt_path``). This looks at all three.
        """
        root = Path(self.trainer.default_root_dir)
        found = [*root.glob("hpc_ckpt_*.ckpt"), *root.glob("checkpoints/last*.ckpt"),
                 *root.glob("*/checkpoints/last*.ckpt"), *root.glob("*/*/checkpoints/last*.ckpt")]
        found += [Path(path) for callback in self.trainer.checkpoint_callbacks if isinstance(callback, ModelCheckpoint)
                  for path in callback._find_last_checkpoints(self.trainer)]  # what Lightning's "last" looks at
        return str(max(found, key=os.path.getmtime)) if found else "last"

    def before_predict(self) -> None:
        self._check_run()
        # Not a model hyper-parameter: with --ckpt_path, LightningCLI takes those from the checkpoint.
        writer = PredictionWriter.for_head(self.model.head, self.config[self.subcommand].predict_dir)
        if writer is not None:
            self.trainer.callbacks.append(writer)


def check_writable(folder: str | os.PathLike, what: str) -> None:
    """Create ``folder`` if needed and write a file in it, or raise an error naming it (and ``what`` sets it)."""
    if "://" in str(folder):  # a remote filesystem (fsspec): Lightning's own errors
        return
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise PermissionError(f"{folder}: cannot write there ({err.strerror or err}); it is {what}, where the run "
                              "writes its outputs: give a folder this user can create and write") from None


def check_checkpoint(ckpt_path: str | os.PathLike | None, resume: bool) -> None:
    """Raise an error naming ``ckpt_path`` unless it is a readable fishnet-pl checkpoint, with the training state
    when ``resume`` (``fit``). Lightning's special values (``last``, ``best``, ``hpc``, ...) pass."""
    if ckpt_path is None or str(ckpt_path) in ("last", "best", "hpc") or "://" in str(ckpt_path) \
            or str(ckpt_path).startswith("registry"):
        return
    ckpt = read_checkpoint(ckpt_path, mmap=True)  # names the file if it is missing, truncated or not a checkpoint
    if CKPT_BACKBONE_KEY not in ckpt:
        raise ValueError(f"{ckpt_path}: a Lightning checkpoint, but not one of fishnet-pl's (no "
                         f"{CKPT_BACKBONE_KEY!r}); to start from other weights use --model.backbone_weights")
    missing = [key for key in ("optimizer_states", "loops") if key not in ckpt]
    if resume and missing:
        raise ValueError(f"{ckpt_path}: holds the weights only (no {' or '.join(missing)}), not the training state "
                         "that fit --ckpt_path resumes; to start a new run from it use --model.backbone_weights")


def build_cli(args: list[str] | None = None, run: bool = True) -> FishNetCLI:
    """Parse ``args`` (default: the command line), build trainer, model and data, and run the subcommand."""
    keep_freed_memory()  # CPU steps reuse freed blocks instead of page-faulting them in anew
    if args is None:  # rewritten in place, so DDP's re-launched processes see the same command line
        sys.argv[1:] = _predict_from_checkpoint_alone(sys.argv[1:])
    else:
        args = _predict_from_checkpoint_alone([str(a) for a in args])
    # predict writes prediction files, not a run: its config.yaml would replace the training run's.
    command = (sys.argv[1:] if args is None else args)[:1]
    save_config = None if command == ["predict"] else SaveConfigCallback
    return FishNetCLI(FishNetModule, L.LightningDataModule, subclass_mode_data=True, args=args, run=run,
                      save_config_callback=save_config, save_config_kwargs={"overwrite": True},
                      auto_configure_optimizers=False)


def _predict_from_checkpoint_alone(args: list[str]) -> list[str]:
    """``predict --ckpt_path CKPT`` with neither a config nor data: predict the folder ``--data.predict_root``
    with ``PredictFolderDataModule`` (filled in from the checkpoint)."""
    if not args or args[0] != "predict":
        return args
    given = {arg.split("=", 1)[0] for arg in args[1:] if arg.startswith("-")}
    if "--ckpt_path" not in given or given & {"--config", "-c", "--data", "--data.class_path"}:
        return args
    return [args[0], "--data", PREDICT_FOLDER, *args[1:]]


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
