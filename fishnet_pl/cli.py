"""``fishnet-pl fit|validate|test|predict --config ...``: LightningCLI over FishNetModule.

Configs compose: ``--config configs/backbone/fishnet150.yaml --config configs/task/classification.yaml
--config configs/data/imagenet.yaml --config configs/trainer/gpu8.yaml``; later files override
earlier ones and ``--print_config`` shows the merged run.
"""

from __future__ import annotations

import difflib
import importlib
import itertools
import linecache
import logging
import os
import pkgutil
import re
import sys
import tempfile
import traceback
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
import timm
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.rank_zero import rank_zero_info

import datamodules
from datamodules.common import DatasetError
from fishnet_pl.checkpoint import check_checkpoint, recorded_predict_data
from fishnet_pl.malloc import keep_freed_memory
from fishnet_pl.module import FishNetModule
from fishnet_pl.writers import PredictionWriter

log = logging.getLogger(__name__)

#: The data of ``predict --ckpt_path CKPT`` given without a config: a folder of images, prepared as the checkpoint says
#: (for a multi-task checkpoint, as each task's data did).
PREDICT_FOLDER = "datamodules.predict.PredictFolderDataModule"
MULTITASK_PREDICT_FOLDER = "datamodules.predict.MultiTaskPredictFolderDataModule"

#: Set to 1 to see the traceback of fishnet-pl's own errors, which print as their message alone.
TRACEBACK_VARIABLE = "FISHNET_PL_TRACEBACK"

EXPORT_HELP = "Export a checkpoint's network as ONNX or torch.export (.pt2): fishnet-pl export --help."


class FishNetArgumentParser(LightningArgumentParser):
    """LightningCLI's parser with short errors: an unknown option or config key is refused in a few lines naming
    the closest real one (the whole usage is ``--help``'s), and no option is taken by its abbreviation
    (``--trainer.max_epoch`` is refused, not read as ``--trainer.max_epochs``)."""

    def __init__(self, *args, allow_abbrev: bool = False, **kwargs) -> None:
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)
        self.subcommands_action = None

    def add_subcommands(self, *args, **kwargs):
        self.subcommands_action = super().add_subcommands(*args, **kwargs)  # its .choices: name -> parser
        return self.subcommands_action

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # jsonargparse is trying alternatives, or a caller wants the exception
            super().error(message, ex)
        parser = self._subcommand_parser() or self
        prog = parser.prog.replace(" [options]", "")
        message, hint = explain_parse_error(message, parser, getattr(self, "args", None) or [])
        lines = [f"{prog}: error: {message}", *([f"  did you mean {hint}?"] if hint else []),
                 f"  all options: {prog} --help"]
        sys.stderr.write("\n".join(lines) + "\n")
        self.exit(2)

    def _subcommand_parser(self):
        """The parser of the subcommand on the command line, for the main parser's errors about its options."""
        choices = self.subcommands_action.choices if self.subcommands_action else {}
        return next((choices[arg] for arg in getattr(self, "args", None) or [] if arg in choices), None)


def explain_parse_error(message: str, parser: ArgumentParser, argv: list[str]) -> tuple[str, str | None]:
    """jsonargparse's error ``message`` in one line, and the closest real option to the one it refuses (or None).

    ``parser`` is the (sub)command's, ``argv`` the command line: a suggestion keeps the user's spelling
    (``--data.rot`` -> ``--data.root``); a key from a config file is suggested as a key."""
    unrecognized = re.match(r"unrecognized arguments: (.*)", message, re.DOTALL)
    if unrecognized:
        flags = [arg for arg in unrecognized.group(1).split() if re.match(r"--?[A-Za-z_]", arg)]
        if flags:
            match = closest_key(flags[0].lstrip("-").split("=", 1)[0], parser.get_defaults().keys())
            return f"unknown option{'s' if len(flags) > 1 else ''} {', '.join(flags)}", match and f"--{match}"
    unknown_key = re.match(r"(?:Subcommand '\w+'|Group '([\w.]+)') does not accept option '([\w.]+)'", message)
    if unknown_key:  # a key of a --config file (or of a dict value) that no argument has
        key = ".".join(filter(None, unknown_key.groups()))
        return f"unknown key {key!r} (in a --config file?)", closest_key(key, parser.get_defaults().keys())
    # jsonargparse's error for a class_path value (data, model.head, a callback) lists each Union alternative.
    noise = ("Does not validate against any of the Union", "Subtypes:", "Errors:", "Given value type:",
             "Expected a <class 'NoneType'>")
    lines = [line.strip().removeprefix("- ") for line in message.splitlines()]
    message = " ".join(line for line in lines if line and not line.startswith(noise))
    refused = re.search(r"Parser key \"([\w.]+)\":.*?given class_path '([\w.]+)': Option '(\w+)' is not accepted",
                        message)
    if not refused:
        return message, None
    key, class_path, option = refused.groups()
    message = f"{class_path} ({key}) has no argument {option!r}"
    match = closest_key(option, class_arguments(class_path))
    if match is None:
        return message, None
    given = next((flag for flag in (arg.split("=", 1)[0] for arg in argv)
                  if re.fullmatch(rf"--{re.escape(key)}\.(init_args\.)?{option}", flag)), None)
    return message, f"{given.removesuffix(option)}{match}" if given else f"{key}.init_args.{match}"


def closest_key(key: str, keys: Iterable[str]) -> str | None:
    """The known dotted key nearest to ``key``, one part corrected: the last part among its known siblings
    (``model.bakbone`` -> ``model.backbone``), else an earlier one with the rest kept (``dta.init_args.root`` ->
    ``data.init_args.root``); None if nothing is close."""
    parts = key.split(".")
    known = [k.split(".") for k in keys]
    for n in range(len(parts) - 1, -1, -1):
        siblings = {k[n] for k in known if len(k) > n and k[:n] == parts[:n]}
        match = difflib.get_close_matches(parts[n], siblings, n=1, cutoff=0.6)
        if match and match[0] != parts[n]:
            return ".".join([*parts[:n], match[0], *parts[n + 1:]])
    return None


def class_arguments(class_path: str) -> list[str]:
    """The init arguments jsonargparse accepts for ``class_path`` (parents' included), or [] if it is no class."""
    module, _, name = class_path.rpartition(".")
    try:
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(getattr(importlib.import_module(module), name))
    except (ImportError, AttributeError, TypeError, ValueError):  # then no suggestion, only the error
        return []
    return list(parser.get_defaults().keys())


class FishNetCLI(LightningCLI):
    def setup_parser(self, add_subcommands, main_kwargs, subparser_kwargs) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if add_subcommands:  # only for ``fishnet-pl --help``: main() runs export (no Trainer method) by itself
            self.parser.subcommands_action.add_subcommand("export", self.parser_class(description=EXPORT_HELP),
                                                          help=EXPORT_HELP)

    def add_arguments_to_parser(self, parser) -> None:
        # The dataset knows its classes; the model never repeats them.
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.add_argument("--predict_dir", type=str | None, default=None,
                            help="predict: folder for the prediction files (default: the first free of "
                                 "<default_root_dir>/predictions, predictions_1, ...)")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="predict: write into a --predict_dir that already holds files")

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # LightningCLI reads the checkpoint's hyper-parameters right after this: a bad file fails here, named.
        subcommand = self.config.get("subcommand")
        if subcommand:
            check_checkpoint(self.config[subcommand].get("ckpt_path"), resume=subcommand == "fit")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        self._one_folder_per_run(config)
        if self.subcommand == "predict":  # it writes prediction files only: no logs to replace the training run's
            config["trainer"]["logger"] = False
        native_bf16_or_fp32(config["trainer"])
        if self.subcommand in ("validate", "test", "predict") and config.get("ckpt_path"):
            # The checkpoint's weights replace the backbone's initial ones: do not read (or fetch) those.
            config["model"]["backbone_weights"] = None
            self._predict_data_from_checkpoint(config)
        if self.subcommand == "fit" and config.get("ckpt_path") == "last" and run_checkpoints(
                config["trainer"].get("default_root_dir") or os.getcwd()):
            # A resume: the checkpoint replaces the start weights, whose files may be gone by now. (A named file's
            # hyper-parameters, which record none, replace the config's already; "last" is found only here.)
            config["model"]["backbone_weights"] = None
            head_arguments = (config["model"].get("head") or {}).get("init_args") or {}
            if "task_weights" in head_arguments:
                head_arguments["task_weights"] = None
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
        if not data or data.get("class_path") not in (PREDICT_FOLDER, MULTITASK_PREDICT_FOLDER) \
                or not os.path.isfile(config["ckpt_path"]):
            return
        init = data["init_args"]
        for key, value in recorded_predict_data(config["ckpt_path"]).items():
            if key in init and init[key] is None:
                init[key] = value

    #: A logger's save_dir in the configs: the CLI replaces it by trainer.default_root_dir (Lightning's
    #: CSV/TensorBoard loggers require a save_dir, so the configs cannot just leave it out).
    DEFAULT_ROOT_DIR = "${trainer.default_root_dir}"

    @classmethod
    def _one_folder_per_run(cls, config) -> None:
        """Every logger of the run writes in one new ``version_N`` folder, which also gets its checkpoints and
        ``config.yaml``; earlier runs' folders are never reused (CSVLogger deletes the logs of a folder it reuses).

        Lightning's loggers each pick their next free version by themselves, so a CSV and a TensorBoard logger
        of one run land in ``version_0`` and ``version_1``. Here one number is picked, free for all of them. A
        ``save_dir`` left as ``${trainer.default_root_dir}`` (or unset) becomes that folder, so
        ``--trainer.default_root_dir DIR`` moves logs and checkpoints with it; a ``version`` the user set stays.
        """
        trainer = config.get("trainer") or {}
        loggers = trainer.get("logger") if hasattr(trainer, "get") else None
        if loggers is None or isinstance(loggers, bool):
            return
        root = trainer.get("default_root_dir") or os.getcwd()  # Lightning's own default
        inits = [logger.get("init_args") for logger in (loggers if isinstance(loggers, list) else [loggers])
                 if hasattr(logger, "get") and logger.get("init_args") is not None]
        for init in inits:
            if init.get("save_dir") in (None, cls.DEFAULT_ROOT_DIR):
                init["save_dir"] = root
        unversioned = [init for init in inits if "version" in init and init["version"] is None]
        folders = {Path(init["save_dir"]) / (init.get("name") or "") for init in unversioned}
        version = next(n for n in itertools.count() if not any((f / f"version_{n}").exists() for f in folders))
        for init in unversioned:
            init["version"] = version  # an int: the folder is version_N, the progress bar shows v_num=N

    def before_fit(self) -> None:
        self._check_run()
        self._say_where_outputs_go()

    def before_validate(self) -> None:
        self._check_run()
        self._say_where_outputs_go()

    def before_test(self) -> None:
        self._check_run()
        self._say_where_outputs_go()

    def _say_where_outputs_go(self) -> None:
        """Before the run starts, so that a run stopped midway has said it too."""
        if self.trainer.loggers:
            what = "logs, checkpoints and config.yaml" if self.subcommand == "fit" else "logs and config.yaml"
            folder = self.trainer.log_dir.rstrip("/") or "/"  # a logger without name and version ends it with /
            rank_zero_info(f"{self.subcommand}: {what} go to {folder}")

    def after_fit(self) -> None:
        best = self.trainer.checkpoint_callback
        if best is None or not best.dirpath:
            return
        kept = f"best checkpoint {best.best_model_path}; " if best.best_model_path else ""
        rank_zero_info(f"fit: {kept}checkpoints in {best.dirpath} (to resume or train on: --ckpt_path last)")

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
        found = run_checkpoints(self.trainer.default_root_dir)
        found += [Path(path) for callback in self.trainer.checkpoint_callbacks if isinstance(callback, ModelCheckpoint)
                  for path in callback._find_last_checkpoints(self.trainer)]  # what Lightning's "last" looks at
        return str(max(found, key=os.path.getmtime)) if found else "last"

    def before_predict(self) -> None:
        self._check_run()
        # Not a model hyper-parameter: with --ckpt_path, LightningCLI takes those from the checkpoint.
        config = self.config[self.subcommand]
        writer = PredictionWriter.for_head(self.model.head, config.predict_dir, config.overwrite)
        if writer is not None:
            self.trainer.callbacks.append(writer)


def run_checkpoints(root: str | os.PathLike) -> list[Path]:
    """The checkpoints ``--ckpt_path last`` resumes from in a run folder: SLURM's ``hpc_ckpt_N.ckpt``, the
    ``last.ckpt`` link, and each version's ``checkpoints/last*.ckpt``."""
    root = Path(root)
    return [*root.glob("hpc_ckpt_*.ckpt"), *root.glob("last.ckpt"), *root.glob("checkpoints/last*.ckpt"),
            *root.glob("*/checkpoints/last*.ckpt"), *root.glob("*/*/checkpoints/last*.ckpt")]


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


#: Third-party messages that tell a fishnet-pl user nothing they can act on (warnings: regular expressions).
CHATTER_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's own pytree code on torch 2.14
    r"No seed found, seed set to",  # predict without a config: nothing random happens
    r"The dirpath has changed from",  # a resumed run writes in its own version folder, by design
    # Under DDP, for each val/test metric: FishNetModule logs the values of torchmetrics' compute(), already reduced
    # over every process, which Lightning cannot tell from a rank's own (Lightning #20153, a false positive).
    r"It is recommended to use `self\.log\('(val|test)/.*sync_dist=True",
)


class _DropTips(logging.Filter):
    """Lightning's advertisements for its cloud services (litlogger, litmodels), and its notice that the module's
    ``ModelCheckpoint`` replaces Lightning's default one (the module adds its own only when the user has none)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("💡 Tip", "The following callbacks returned in `LightningModule"))


def native_bf16_or_fp32(trainer: Any) -> None:
    """bf16 precision on a CPU without native bf16 arithmetic (AVX512-BF16 or AMX) runs emulated, slower than fp32:
    there the run trains in 32-true instead, and says so. The quickstarts ask for bf16-mixed, their fastest setting
    where the CPU has it (``python -m bench.fit``; docs/performance.md)."""
    precision = str(trainer.get("precision"))
    accelerator = str(trainer.get("accelerator") or "auto")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if precision.startswith("bf16") and on_cpu and not (torch.backends.mkldnn.is_available()
                                                        and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        log.warning("precision %s: this CPU has no native bf16 arithmetic (AVX512-BF16 or AMX), where bf16 runs "
                    "slower than fp32; training in 32-true instead", precision)
        trainer["precision"] = "32-true"


def quiet_third_party_chatter() -> None:
    """Hide the messages of ``CHATTER_WARNINGS`` and Lightning's tips; everything else is shown."""
    for message in CHATTER_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    import lightning_utilities.core.rank_zero

    rank_zero_log = lightning_utilities.core.rank_zero.log  # every rank_zero_info goes here (Lightning sets it)
    if not any(isinstance(f, _DropTips) for f in rank_zero_log.filters):
        rank_zero_log.addFilter(_DropTips())


def build_cli(args: list[str] | None = None, run: bool = True) -> FishNetCLI:
    """Parse ``args`` (default: the command line), build trainer, model and data, and run the subcommand."""
    keep_freed_memory()  # CPU steps reuse freed blocks instead of page-faulting them in anew
    quiet_third_party_chatter()
    if args is None:  # rewritten in place, so DDP's re-launched processes see the same command line
        sys.argv[1:] = _predict_from_checkpoint_alone(sys.argv[1:])
    else:
        args = _predict_from_checkpoint_alone([str(a) for a in args])
    # predict writes prediction files, not a run: its config.yaml would replace the training run's.
    command = (sys.argv[1:] if args is None else args)[:1]
    save_config = None if command == ["predict"] else SaveConfigCallback
    import_datamodules()
    return FishNetCLI(FishNetModule, L.LightningDataModule, subclass_mode_data=True, args=args, run=run,
                      save_config_callback=save_config, save_config_kwargs={"overwrite": True},
                      auto_configure_optimizers=False, parser_class=FishNetArgumentParser,
                      parser_kwargs={"description": "FishNet (or any timm backbone) for classification, "
                                                    "segmentation and detection: train, evaluate, predict, export."})


def import_datamodules() -> None:
    """Import every module of ``datamodules``, so that short class names resolve (``--data.help
    SegmentationFolderDataModule``, ``class_path: CityscapesDataModule``): jsonargparse looks them up among the
    imported subclasses of LightningDataModule. A module whose optional dependency is missing (LitData for
    ``streaming``) is left out; its full class_path still gives its own error."""
    for module in pkgutil.iter_modules(datamodules.__path__, "datamodules."):
        try:
            importlib.import_module(module.name)
        except ImportError:
            continue


def _predict_from_checkpoint_alone(args: list[str]) -> list[str]:
    """``predict --ckpt_path CKPT`` with neither a config nor data: predict the folder ``--data.predict_root``
    with ``PredictFolderDataModule``, or ``MultiTaskPredictFolderDataModule`` for a multi-task checkpoint (filled
    in from the checkpoint)."""
    if not args or args[0] != "predict":
        return args
    given = {arg.split("=", 1)[0] for arg in args[1:] if arg.startswith("-")}
    if "--ckpt_path" not in given or given & {"--config", "-c", "--data", "--data.class_path"}:
        return args
    path = _ckpt_path_argument(args)
    data = MULTITASK_PREDICT_FOLDER if path and "tasks" in _recorded_predict_data(path) else PREDICT_FOLDER
    return [args[0], "--data", data, *args[1:]]


def _ckpt_path_argument(args: list[str]) -> str | None:
    """The value of ``--ckpt_path`` on a command line (``--ckpt_path X`` or ``--ckpt_path=X``)."""
    for flag, value in zip(args, [*args[1:], None]):
        if flag.startswith("--ckpt_path="):
            return flag.split("=", 1)[1]
        if flag == "--ckpt_path":
            return value
    return None


def _recorded_predict_data(path: str) -> dict[str, Any]:
    """``recorded_predict_data`` of the checkpoint ``path``; empty when it is not a readable checkpoint (the
    parser's check then names the problem)."""
    try:
        return recorded_predict_data(path) if os.path.isfile(path) else {}
    except ValueError:
        return {}


def main(args: list[str] | None = None) -> None:
    """Console script ``fishnet-pl``: LightningCLI's fit/validate/test/predict, and ``export`` (ONNX, pt2).

    From the command line (``args`` None), fishnet-pl's own errors (a bad dataset, checkpoint, weights file,
    backbone name or output folder) print as their message alone, exit status 1; any other exception keeps its
    traceback, as all do with ``FISHNET_PL_TRACEBACK=1``. Called with ``args`` (from Python), errors raise.
    """
    argv = sys.argv[1:] if args is None else list(args)
    try:
        if argv and argv[0] == "export":
            from fishnet_pl.export import export_main

            export_main(argv[1:])
            return
        build_cli(args)
    except Exception as err:
        if args is not None:
            raise
        message = own_error_message(err)
        if message is None or os.environ.get(TRACEBACK_VARIABLE, "0") not in ("", "0"):
            traceback.print_exception(err)
        else:
            sys.stderr.write(f"fishnet-pl: error: {message}\n  ({TRACEBACK_VARIABLE}=1 shows the traceback)\n")
        sys.exit(1)


#: fishnet-pl's own code: an error that a ``raise`` statement there raises is meant for the user.
OWN_FOLDERS = tuple(os.path.dirname(os.path.realpath(file)) + os.sep for file in (__file__, datamodules.__file__))

#: How torch re-raises an error of a DataLoader worker: the worker's traceback is in the message.
WORKER_ERROR = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")


def own_error_message(err: BaseException) -> str | None:
    """The message of an error fishnet-pl raised for the user, or None for anything else (a bug, whose traceback
    matters): a ``DatasetError``, or an error with a message raised by a ``raise`` statement in ``fishnet_pl`` or
    ``datamodules``. For an error re-raised from a DataLoader worker, the worker's frame decides and the message
    is the worker's own, without torch's "Caught ... in DataLoader worker process" and traceback text."""
    text = err.args[0] if len(err.args) == 1 and isinstance(err.args[0], str) else str(err)
    if WORKER_ERROR.match(text):
        lines = text.splitlines()
        last = max(i for i, line in enumerate(lines) if re.match(r'  File ".+", line \d+', line))
        filename, lineno = re.match(r'  File "(.+)", line (\d+)', lines[last]).groups()
        rest = lines[last + 1:]
        while rest and rest[0].startswith("    "):  # the source line and its ^^^ markers
            rest.pop(0)
        text = re.sub(r"^[\w.]+: ", "", "\n".join(rest).strip(), count=1)  # "datamodules.common.DatasetError: "
    else:
        tb = err.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        filename, lineno = (tb.tb_frame.f_code.co_filename, tb.tb_lineno) if tb else ("", 0)
    raised_here = (os.path.realpath(filename).startswith(OWN_FOLDERS)
                   and linecache.getline(filename, int(lineno)).lstrip().startswith("raise "))
    return text if text and (raised_here or isinstance(err, DatasetError)) else None


if __name__ == "__main__":
    main()
