"""The ``distill`` command: LightningCLI over every method and the shared DataModule.

    distill fit --config configs/mnist5k/kd.yaml
    distill fit --model BaselineKD --model.student resnet8x4 --model.teacher t.ckpt --data.dataset cifar100
    distill fit --config configs/mnist5k/kd.yaml --print_config

Beyond plain LightningCLI it: links the data set's ``num_classes``/``in_channels``/``image_size`` into
the method; gives every run its own directory ``<trainer.default_root_dir>/<run_name>/version_N``
(TensorBoard + CSV logs, the saved config, checkpoints, ``results.json`` and ``model.safetensors``);
after ``fit`` tests the best-validation checkpoint; and reports user errors in one line (exit 2).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Any, Iterator, Literal

import lightning.pytorch as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from distill.callbacks import PredictionWriter
from distill.data import DistillDataModule
from distill.errors import CheckpointError, ConfigError, DataNotFoundError, DistillError, storage_error
from distill.methods import DistillModule, StagedModule
from distill.reliability import Preempted, Stopped, preemptible_after_training, signals_stop_the_command
from distill.reliability.checkpoints import fork_run
from distill.run import (DISTILL_DATA_MODULE, EXPORT_FILE, RESULTS_FILE, RUN_DIR_ENV, finish_fit, has_checkpoint,
                         next_numbered_dir, next_version_dir, run_loggers, write_json_atomic)
from distill.teachers import safe_torch_load, sha256_of

# test/predict of a run's checkpoint log into a folder inside the run; the checkpoint callback's recorded
# dirpath then differs, which matters only to a fit
warnings.filterwarnings("ignore", message=r"The dirpath has changed from")

#: The first line of a config that LightningCLI wrote out (``--print_config``, a run's ``config.yaml``).
RESOLVED_CONFIG_MARK = "# lightning.pytorch=="
#: Lightning's special ``ckpt_path`` values, which are not files.
SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")


#: What a method learns from the DataModule: every DataModule ``distill fit`` trains on has these attributes.
DATA_FACTS = ("num_classes", "in_channels", "image_size")


def data_fact(attribute: str, datamodule: L.LightningDataModule) -> Any:
    """``datamodule.<attribute>``, or one error saying what your own DataModule must provide."""
    value = getattr(datamodule, attribute, None)
    if value is None:
        raise ConfigError(f"{type(datamodule).__name__} has no {attribute}: a DataModule that distill trains on needs "
                          f"the attributes {', '.join(DATA_FACTS)} (ints, known when it is built) and loaders whose "
                          "batches are (images, labels) or (images, labels, indices).")
    return value


def check_tests_at_the_end(datamodule: L.LightningDataModule | None) -> None:
    """``distill fit`` tests the best checkpoint when training ends: a DataModule of your own without a
    ``test_dataloader`` is refused before anything runs, not after the whole training."""
    if datamodule is not None and type(datamodule).test_dataloader is L.LightningDataModule.test_dataloader:
        raise ConfigError(f"{type(datamodule).__name__} has no test_dataloader, and distill fit tests the best checkpoint "
                          "when training ends: give it one (with no test split of your own, it may return the "
                          "validation loader; the results then report validation images as `test`).")


def check_trains_something(trainer: dict[str, Any]) -> None:
    """A fit that would take no optimiser step (``max_epochs 0``, ``max_steps 0``, ``limit_train_batches 0``) is
    refused: it would export an untrained network as the run's model and point ``latest`` at it."""
    for key in ("max_epochs", "max_steps", "limit_train_batches"):
        if trainer.get(key) is not None and trainer[key] == 0:
            raise ConfigError(f"trainer.{key}=0 trains nothing: the run would export an untrained network as its model "
                              f"(and as `latest`, which later configs teach from); give trainer.{key} a positive value, "
                              "or use `distill validate`/`distill test` to evaluate without training.")


def _has_content(path: Any, sha256: str | None) -> bool:
    """Whether ``path`` names a file whose sha256 is ``sha256``."""
    return bool(sha256) and isinstance(path, str) and Path(path).is_file() and sha256_of(path) == sha256


class DistillCLI(LightningCLI):
    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        self.results: dict[str, Any] | None = None
        self._extends: Path | None = None  # the finished run that this fit extends, in a new version
        # `data:` is DistillDataModule's arguments unless the command names another DataModule; only then is there
        # no default class, since jsonargparse would carry the default's values (batch_size, ...) over to yours
        self._data_default = None if names_own_datamodule(sys.argv[1:] if args is None else args) \
            else DISTILL_DATA_MODULE
        super().__init__(
            DistillModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=0,
            trainer_defaults={"default_root_dir": "runs"},
            # a run never overwrites an earlier run's config: every run has a fresh version directory
            save_config_kwargs={"overwrite": False},
            save_config_callback=ResumeAwareSaveConfig,
            auto_configure_optimizers=False,  # each method takes `optimizer`/`lr_scheduler` itself
            parser_kwargs={"prog": "distill", "description": "Knowledge distillation with Lightning: "
                           "fit/validate/test/predict a method from a YAML config. Other commands: "
                           "distill report | sweep | choose-assistant | repro | bench | residual-budget | robustness (each with --help)."},
            args=args,
            run=run,
        )

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        parser.error = types.MethodType(_one_line_parse_error, parser)
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_name", type=str | None, default=None,
            help="Runs go to <trainer.default_root_dir>/<run_name>/version_N "
                 "(default: <dataset>/<method>-<student>).",
        )
        parser.add_argument(
            "--recipe", type=str | None, default=None,
            help="The data set's recipe (optimiser, schedule, data, trainer) that a config file builds on, "
                 "named in its first line (`recipe: recipe.yaml`, relative to that file): `--config row.yaml` "
                 "reads the recipe first, then the row, so the row's lines win.",
        )
        parser.add_argument(
            "--nonfinite_loss", type=Literal["stop", "skip"], default="stop",
            help="A NaN/inf training loss stops the run with an error naming the step and loss part "
                 "(stop), or skips the batch and counts it in train/skipped_nonfinite (skip).",
        )
        if self._data_default is not None:
            parser.set_defaults({"data": {"class_path": self._data_default}})
        for attribute in DATA_FACTS:
            parser.link_arguments("data", f"model.init_args.{attribute}", apply_on="instantiate",
                                  compute_fn=functools.partial(data_fact, attribute))

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the checkpoint's hyperparameters here, before anything is built: a file that
        # is missing, corrupt or carries pickled code must be one clear error, not a traceback.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        checkpoint = None
        if ckpt_path and ckpt_path not in SPECIAL_CKPT_PATHS:
            checkpoint = safe_torch_load(Path(ckpt_path))
        given = self._model_arguments()
        super()._parse_ckpt_path()  # the checkpoint's method arguments replace the configured ones
        if subcommand == "fit" and isinstance(checkpoint, dict) and checkpoint.get("hyper_parameters"):
            self._check_resumed_arguments(given, checkpoint, Path(ckpt_path))

    def _model_arguments(self) -> dict[str, Any]:
        subcommand = self.config.get("subcommand")
        model = self.config[subcommand].get("model") if subcommand else None
        return model.as_dict() if hasattr(model, "as_dict") else dict(model or {})

    def _check_resumed_arguments(self, given: dict[str, Any], checkpoint: dict[str, Any], ckpt_path: Path) -> None:
        """A resumed fit runs with the method arguments it started with (Lightning takes them from the checkpoint):
        an argument given otherwise is refused, not silently dropped. The teacher is the file the run started
        with, found by its content: a ``latest`` link that moved since, or the same file named by another path."""
        resumed = self._model_arguments()
        before, after = given.get("init_args") or {}, resumed.get("init_args") or {}
        changed = sorted(k for k in set(before) | set(after) if k not in DATA_FACTS and before.get(k) != after.get(k))
        if given.get("class_path") != resumed.get("class_path"):
            changed.insert(0, "class_path")
        recorded = checkpoint.get("teacher") or {}
        subcommand = self.config["subcommand"]
        if "teacher" in changed and _has_content(before.get("teacher"), recorded.get("sha256")):
            changed.remove("teacher")  # the run's teacher under another name: used, and recorded in the config
            self.config[subcommand]["model.init_args.teacher"] = before["teacher"]
        elif "teacher" not in changed and recorded.get("sha256") and isinstance(after.get("teacher"), str) \
                and not _has_content(after["teacher"], recorded["sha256"]) \
                and _has_content(recorded.get("resolved_path"), recorded["sha256"]):
            self.config[subcommand]["model.init_args.teacher"] = recorded["resolved_path"]
            print(f"distill: {after['teacher']} is no longer the teacher this run started with; resuming with that "
                  f"file, {recorded['resolved_path']} (sha256 {recorded['sha256'][:12]}…)", file=sys.stderr)
        if changed:
            run_dir = ckpt_path.parent.parent
            listed = ", ".join(f"{key} (given {before.get(key)!r}, the run's {after.get(key)!r})" for key in changed)
            overrides = " ".join(f"--model.init_args.{k} {before.get(k)!r}" for k in changed if k != "class_path")
            raise ConfigError(f"a resumed run continues with the method arguments it started with; these differ from "
                              f"its checkpoint: {listed}. Resume without them, or start a new run with them from this "
                              f"run's weights: distill fit --config {run_dir / 'config.yaml'} --model.init_args.student_init "
                              f"{ckpt_path} {overrides} (without student_init: from the start)")

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        if isinstance(self.model, DistillModule):
            self.model.nonfinite_loss = self._get(self.config, "nonfinite_loss") or "stop"

    def instantiate_trainer(self, **kwargs: Any):
        if isinstance(self.datamodule, DistillDataModule) and not self.datamodule.download:
            # the splits built (and the image files checked) before a run directory is claimed; Lightning's own
            # setup call then has nothing to do. A download happens in prepare_data, so it waits for the Trainer
            self.datamodule.setup()
        if self.config.get("subcommand") == "fit" and isinstance(self.model, DistillModule):
            # before a run directory is claimed (a DataModule of your own does not augment for the method)
            self.model.check_training_data(getattr(self.datamodule, "augment", "none"),
                                           bool(getattr(self.datamodule, "device_resident", False)))
        trainer_config = self._get(self.config_init, "trainer", default={})
        if self.config.get("subcommand") == "fit":
            check_trains_something(trainer_config)  # before a run directory is claimed
            check_tests_at_the_end(self.datamodule)
        if isinstance(self.model, StagedModule) and "max_epochs" not in kwargs:
            # the stages say how long a staged run is; a shorter Trainer is refused before anything is written
            self.model.check_max_epochs(trainer_config.get("max_epochs"))
            kwargs["max_epochs"] = self.model.total_epochs
        if trainer_config.get("logger") in (None, True) and "logger" not in kwargs:
            run_dir = self._run_dir()
            kwargs["logger"] = run_loggers(trainer_config.get("default_root_dir") or "runs", "", run_dir,
                                           resume=run_dir in (self._resumed_run_dir(), self._extends))
            if trainer_config.get("fast_dev_run"):
                # Lightning runs fast_dev_run without loggers, so its files would land in default_root_dir
                # itself: give it the run's own directory instead
                kwargs["default_root_dir"] = str(run_dir)
        return super().instantiate_trainer(**kwargs)

    def _checkpoint_run_dir(self) -> Path | None:
        """The run directory of ``--ckpt_path <run_dir>/checkpoints/<file>.ckpt`` (a run ``distill fit`` made)."""
        ckpt_path = self._get(self.config, "ckpt_path")
        if not ckpt_path or ckpt_path in SPECIAL_CKPT_PATHS:
            return None
        run_dir = Path(ckpt_path).parent.parent
        if Path(ckpt_path).parent.name == "checkpoints" and (run_dir / "config.yaml").is_file():
            return run_dir
        return None

    def _resumed_run_dir(self) -> Path | None:
        """The run directory that ``fit --ckpt_path <run_dir>/checkpoints/<file>.ckpt`` continues."""
        return self._checkpoint_run_dir() if self.config.get("subcommand") == "fit" else None

    def _run_dir(self) -> Path:
        # DDP worker processes re-run this command: they must join rank 0's directory.
        inherited = os.environ.get(RUN_DIR_ENV)
        if inherited and os.environ.get("LOCAL_RANK", "0") != "0":
            return Path(inherited)
        subcommand = self.config.get("subcommand")
        evaluated = self._checkpoint_run_dir()
        if subcommand == "fit" and evaluated is not None and (evaluated / RESULTS_FILE).is_file():
            # a finished run is never rewritten: extending it (--resume with more epochs) continues a copy of it in
            # the next version (logs and checkpoints, their paths moved there), whose results.json names the run
            # it extends (extended_from); with nothing more to train there is nothing to copy
            limits = dict(self.config[subcommand].get("trainer") or {})
            if isinstance(self.model, StagedModule):  # its stages set the run's length (instantiate_trainer)
                limits["max_epochs"] = self.model.total_epochs
            refuse_a_fit_with_nothing_to_train(evaluated, limits)
            run_dir = next_numbered_dir(evaluated.parent, "version_")
            fork_run(evaluated, run_dir, leave_out=(RESULTS_FILE, EXPORT_FILE, "latest"))
            ckpt_path = str(run_dir / Path(self._get(self.config, "ckpt_path")).relative_to(evaluated))
            self.config[subcommand]["ckpt_path"] = ckpt_path
            if self.config_init is not None and subcommand in self.config_init:
                self.config_init[subcommand]["ckpt_path"] = ckpt_path
            self._extends = evaluated
        elif subcommand == "fit" and evaluated is not None:  # a stopped run continues in its own directory
            run_dir = evaluated
        elif evaluated is not None:  # test/validate/predict of a run's checkpoint: inside that run, test_N/...
            run_dir = next_numbered_dir(evaluated, f"{subcommand}_")
        else:
            root = self._get(self.config, "trainer").get("default_root_dir") or "runs"
            name = self._get(self.config, "run_name") or self._default_run_name()
            run_dir = next_version_dir(root, name)
        os.environ[RUN_DIR_ENV] = str(run_dir)
        if run_dir != evaluated:  # with the folder below which this command made the folders on the way to it
            CLAIMED_HERE[run_dir] = evaluated if evaluated is not None else Path(root)
        return run_dir

    def before_predict(self) -> None:
        self.trainer.callbacks.append(PredictionWriter(self.trainer.log_dir))

    def _default_run_name(self) -> str:
        model = self._get(self.config, "model")
        method = model.class_path.rsplit(".", 1)[-1].lower()
        dataset = self.datamodule.hparams.get("dataset") or type(self.datamodule).__name__.lower()
        return f"{dataset}/{method}-{model.init_args.student}"

    def before_fit(self) -> None:
        self._fit_started = time.time()

    def after_fit(self) -> None:
        with preemptible_after_training(self.trainer):
            self._dump_config()
            for attribute in DATA_FACTS:  # the values linked from the data, not the method's defaults
                self.config_dump["model"]["init_args"][attribute] = data_fact(attribute, self.datamodule)
            self.results = finish_fit(
                self.trainer, self.model, self.datamodule,
                config=self.config_dump, seed=self._get(self.config, "seed_everything"),
                started=self._fit_started,
            )
            if self._extends is not None:
                self.results["extended_from"] = str(self._extends)
                if self.trainer.is_global_zero:
                    write_json_atomic(Path(self.results["run_dir"]) / RESULTS_FILE, self.results)
        if self.trainer.is_global_zero:
            run_dir = self.results["run_dir"]
            best, test_acc = self.results["best_val_acc"], self.results["test_acc"]
            if best is not None and test_acc is not None:
                print(f"\nbest val acc {best:.4f}, test acc {test_acc:.4f} (best-validation checkpoint)")
            print(f"Run directory: {run_dir}\nTensorBoard:   tensorboard --logdir {Path(run_dir).parent}")


class ResumeAwareSaveConfig(SaveConfigCallback):
    """Saves the resolved config as ``config.yaml``; a resumed run keeps it and adds ``config.resume-N.yaml``."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        log_dir = trainer.log_dir
        resuming = self.config.get("ckpt_path")  # trainer.ckpt_path is set only after setup
        if not self.already_saved and resuming and log_dir and (Path(log_dir) / self.config_filename).is_file():
            taken = {p.name for p in Path(log_dir).glob("config.resume-*.yaml")}
            self.config_filename = next(f"config.resume-{n}.yaml" for n in range(1, len(taken) + 2)
                                        if f"config.resume-{n}.yaml" not in taken)
        if self.already_saved or not log_dir:
            return super().setup(trainer, pl_module, stage)
        # written whole or not at all: a run killed while saving it must not leave an empty config.yaml, which
        # the command that starts it again reads
        final = self.config_filename
        self.config_filename = f".{final}.tmp-{os.getpid()}"
        try:
            super().setup(trainer, pl_module, stage)
            written = Path(log_dir) / self.config_filename
            if trainer.is_global_zero and written.is_file():
                written.replace(Path(log_dir) / final)
        finally:
            self.config_filename = final


def method_help_arguments(args: list[str]) -> list[str]:
    """``fit --model BaselineKD --help`` → ``fit --model.help BaselineKD``: the chosen method's arguments (its own
    and the inherited ones), which jsonargparse prints only for ``--model.help``; other arguments are kept."""
    if not any(arg in ("--help", "-h") for arg in args):
        return args
    for position, arg in enumerate(args):
        name = args[position + 1] if arg == "--model" and position + 1 < len(args) else (
            arg.split("=", 1)[1] if arg.startswith("--model=") else None)
        if name and not name.lstrip().startswith(("{", "[")):  # a class name, not an inline config
            rest = [a for i, a in enumerate(args) if a not in ("--help", "-h")
                    and i not in (position, position + (arg == "--model"))]
            return [*rest[:1], "--model.help", name]
    return args


def names_own_datamodule(args: list[str]) -> bool:
    """Whether the command names its DataModule by ``class_path``: ``--data.class_path``, ``--data X``, or a
    config file (or its recipe) whose ``data:`` has a ``class_path`` or is a class name."""
    for position, arg in enumerate(args):
        if arg in ("--data", "--data.class_path") or arg.startswith(("--data=", "--data.class_path=")):
            return True
        path = args[position + 1] if arg in ("--config", "-c") and position + 1 < len(args) else (
            arg.split("=", 1)[1] if arg.startswith("--config=") else None)
        if path and Path(path).is_file():
            try:
                data = config_lines(path).get("data")
            except Exception:  # not YAML, or a broken recipe line: jsonargparse and recipe_arguments report those
                continue
            if isinstance(data, str) or (isinstance(data, dict) and "class_path" in data):
                return True
    return False


def recipe_of(path: str | Path) -> Path | None:
    """The recipe a config file builds on (its ``recipe:`` line, relative to the file or to the working directory),
    or None: no such line, a file that is not there or not YAML (jsonargparse reports those in its own words), or
    a resolved config (what ``--print_config`` prints and every run saves), which holds its recipe's values already.
    A named recipe that does not exist is one :class:`ConfigError`."""
    import yaml

    text = Path(path).read_text() if Path(path).is_file() else ""
    if not text or text.startswith(RESOLVED_CONFIG_MARK):
        return None
    try:
        content = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    named = content.get("recipe") if isinstance(content, dict) else None
    if not named:
        return None
    recipe = next((c for c in (Path(path).parent / named, Path(named)) if c.is_file()), None)
    if recipe is None:
        raise ConfigError(f"{path} builds on recipe {named!r}, which exists neither next to it nor "
                          f"under {Path.cwd()}; fix the `recipe:` line, or remove it.")
    return recipe


def config_lines(path: str | Path) -> dict[str, Any]:
    """What a config file and its recipe say, the file's lines over the recipe's (mappings merged key by key, as
    ``distill fit --config`` reads them), without the defaults that ``--print_config`` adds."""
    import yaml

    def over(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
        merged = dict(base)
        for key, value in top.items():
            both = isinstance(value, dict) and isinstance(merged.get(key), dict)
            merged[key] = over(merged[key], value) if both else value
        return merged

    lines = yaml.safe_load(Path(path).read_text()) or {}
    recipe = recipe_of(path)
    return over(yaml.safe_load(recipe.read_text()) or {}, lines) if recipe is not None else lines


def recipe_arguments(args: list[str]) -> list[str]:
    """``--config row.yaml`` → ``--config RECIPE --config row.yaml --recipe RECIPE`` when the row names a recipe.

    A config file that starts with ``recipe: recipe.yaml`` (a path relative to the file, or to the working
    directory) builds on that recipe: jsonargparse reads the recipe first, the row then overrides it, and the
    method's arguments the recipe gives (optimiser, schedule) carry over to the row's ``class_path``. The
    resolved path goes into the saved config, so that it names the recipe it was made from.
    """
    expanded: list[str] = []
    position = 0
    while position < len(args):
        arg = args[position]
        if arg == "--config" and position + 1 < len(args):
            path, consumed = args[position + 1], 2
        elif arg.startswith("--config="):
            path, consumed = arg.split("=", 1)[1], 1
        else:
            expanded.append(arg)
            position += 1
            continue
        recipe = recipe_of(path)
        if recipe is not None:
            if expanded[-2:] != ["--config", str(recipe)]:  # not expanded already (a DDP worker's command)
                expanded += ["--config", str(recipe)]
            expanded += args[position:position + consumed]
            if args[position + consumed:position + consumed + 2] != ["--recipe", str(recipe)]:
                expanded += ["--recipe", str(recipe)]
        else:
            expanded += args[position:position + consumed]
        position += consumed
    return expanded


def intact_checkpoint(last: Path) -> Path:
    """``last`` if it loads; else the newest other checkpoint of its folder that loads, with a warning, after moving
    the damaged ``last.ckpt`` aside (``last.ckpt.damaged``, kept) so that the resumed run's ``last.ckpt`` takes its
    place. None intact: one error naming them all."""
    try:
        safe_torch_load(last)
        return last
    except DistillError as damage:
        reason = str(damage)
    others = sorted((p for p in last.parent.glob("*.ckpt") if p != last), key=lambda p: p.stat().st_mtime, reverse=True)
    for candidate in others:
        try:
            safe_torch_load(candidate)
        except DistillError:
            continue
        if last.exists():
            kept = last.with_name(last.name + ".damaged")
            last.replace(kept)
            print(f"distill: {last} is damaged ({reason}); resuming from {candidate}, the newest intact checkpoint "
                  f"(the damaged file is kept as {kept.name})", file=sys.stderr)
        else:
            print(f"distill: {last} does not exist; resuming from {candidate}, the newest checkpoint", file=sys.stderr)
        return candidate
    raise CheckpointError(f"cannot resume: {reason} and no other checkpoint in {last.parent} is intact "
                          f"({', '.join(p.name for p in others) or 'there is none'}); start the run again.")


def resume_arguments(args: list[str]) -> list[str]:
    """``fit --resume RUN_DIR ...`` → ``fit --config RUN_DIR/config.yaml ... --ckpt_path RUN_DIR/checkpoints/last.ckpt``.

    The config is the newest one the run saved (``config.resume-N.yaml`` of an earlier resume, so
    its overrides carry over), else ``config.yaml``.
    """
    for position, arg in enumerate(args):
        if arg == "--resume" or arg.startswith("--resume="):
            value_at = position + 1 if arg == "--resume" else position
            if value_at >= len(args):
                raise ConfigError("--resume needs a run directory, e.g. --resume runs/mnist5k/kd/version_0")
            run_dir = Path(args[value_at].split("=", 1)[1] if arg != "--resume" else args[value_at])
            resumes = sorted(run_dir.glob("config.resume-*.yaml"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
            config = resumes[-1] if resumes else run_dir / "config.yaml"
            last = run_dir / "checkpoints" / "last.ckpt"
            resumable = has_checkpoint(run_dir)
            if not config.is_file() and run_dir.is_dir() and not resumable:
                raise ConfigError(f"cannot resume {run_dir}: it stopped before it saved its config.yaml, so there is "
                                  "nothing to continue; run the command that started it again.")
            if not config.is_file():
                raise ConfigError(f"cannot resume {run_dir}: {config} does not exist (a run directory "
                                  "holds config.yaml and checkpoints/last.ckpt).")
            if not resumable:
                raise ConfigError(f"cannot resume {run_dir}: it stopped before its first checkpoint, so there is "
                                  f"nothing to continue; start it again with: distill fit --config {config}")
            rest = args[:position] + args[value_at + 1:]
            if not rest or rest[0] != "fit":
                raise ConfigError("--resume works with `distill fit --resume RUN_DIR`.")
            return [rest[0], "--config", str(config), *rest[1:], "--ckpt_path", str(intact_checkpoint(last))]
    return args


def _one_line_parse_error(parser: LightningArgumentParser, message: str, ex: Exception | None = None) -> None:
    """A wrong type, an unknown key or a missing value: one line on stderr, exit status 2, as other user errors."""
    # jsonargparse explains every alternative of an Optional[...] type; keep the lines about the real one
    noise = ("NoneType", "Subtypes:", "Errors:", "Does not validate against any", "Given value type:")
    lines = [line.strip(" -") for line in str(message).splitlines()]
    text = " ".join(line for line in lines if line and not any(n in line for n in noise))
    print(f"distill: error: {text[:500]} (`{parser.prog.replace(' [options]', '')} --help` lists the options)",
          file=sys.stderr)
    raise SystemExit(2)


def _user_error(err: BaseException | None) -> DistillError | None:
    """The DistillError behind ``err`` (jsonargparse wraps errors raised while building classes), or the
    :class:`~distill.errors.StorageError` of a full disk, a missing permission or a file where a folder should be."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, DistillError):
            return err
        if isinstance(err, OSError) and (storage := storage_error(err)) is not None:
            return storage
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def user_errors_as_exit() -> Iterator[None]:
    """A user error becomes one line on stderr and exit status 2; anything else stays a traceback."""
    try:
        yield
    except Exception as err:
        user_error = _user_error(err)
        if user_error is None:
            raise
        print(f"distill: error: {worker_message(str(user_error))}", file=sys.stderr)
        raise UserErrorExit(user_error) from None


class UserErrorExit(SystemExit):
    """Exit status 2 for a user error (said on stderr already), which it carries."""

    def __init__(self, error: DistillError) -> None:
        super().__init__(2)
        self.error = error


def worker_message(message: str) -> str:
    """The error's own line of a message that a DataLoader worker's error carries to the main process (torch puts
    the worker's whole traceback in it, ending in ``module.ErrorClass: message``)."""
    if "Original Traceback" not in message:
        return message
    last = message.rstrip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


class AlreadyFinished(SystemExit):
    """``fit --resume`` (or ``--ckpt_path``) of a finished run that the Trainer's limits would not train further:
    nothing is copied or written, exit status 0."""

    def __init__(self, message: str) -> None:
        super().__init__(0)
        self.message = message


def refuse_a_fit_with_nothing_to_train(run_dir: Path, trainer: Any) -> None:
    """Raises :class:`AlreadyFinished` when continuing the finished run in ``run_dir`` under these Trainer limits would
    take no step: Lightning stops at ``max_epochs`` or ``max_steps``, whichever comes first (``max_epochs`` 1000 when
    neither is set, unbounded when only ``max_steps`` is). Copying the run then would only test it again."""
    done = json.loads((run_dir / RESULTS_FILE).read_text())
    epochs, steps = int(done.get("epochs") or 0), int(done.get("global_steps") or 0)
    max_epochs, max_steps = trainer.get("max_epochs"), trainer.get("max_steps")
    if max_steps in (None, -1):
        max_steps = None
        max_epochs = 1000 if max_epochs is None else max_epochs
    epochs_left = max_epochs in (None, -1) or epochs < max_epochs
    steps_left = max_steps is None or steps < max_steps
    if not (epochs_left and steps_left):
        raise AlreadyFinished(
            f"{run_dir} has finished ({epochs} epochs, {steps} steps; results in {run_dir / RESULTS_FILE}) and "
            f"trainer.max_epochs={max_epochs}, trainer.max_steps={-1 if max_steps is None else max_steps} train it no "
            f"further, so nothing was copied or written. To train it longer: distill fit --resume {run_dir} "
            f"--trainer.max_epochs {epochs * 2 or 1} (any number above {epochs}).")


#: The run directories this process made (a new run's, an extension's copy, ``test_N``), which it may remove when
#: it stops before they hold anything to continue; never a stopped run's own directory that a resume continues.
#: Each maps to the folder it was made in (a new run's: the runs root, whose folders for its name this command may
#: have made too; a copy's or a ``test_N``'s: the run it belongs to).
CLAIMED_HERE: dict[Path, Path] = {}


def main(args: list[str] | None = None) -> DistillCLI | None:
    """Entry point of the ``distill`` console script (``args`` for calls from Python and tests)."""
    owns_run_dir = RUN_DIR_ENV not in os.environ
    try:
        with signals_stop_the_command(), user_errors_as_exit():
            if args is None:
                # rewritten in place: DDP launches its worker processes with sys.argv (both rewrites are idempotent)
                sys.argv[1:] = resume_arguments(recipe_arguments(method_help_arguments(sys.argv[1:])))
                return DistillCLI(args=None)
            return DistillCLI(args=resume_arguments(recipe_arguments(method_help_arguments(list(args)))))
    except (Preempted, AlreadyFinished) as stop:
        print(f"distill: {stop.message}", file=sys.stderr)
        raise SystemExit(0) from None
    except Stopped as stop:
        claimed = os.environ.get(RUN_DIR_ENV) if owns_run_dir else None
        raise SystemExit(stopped_outside_training(stop, Path(claimed) if claimed else None)) from None
    except UserErrorExit as refused:
        claimed = os.environ.get(RUN_DIR_ENV) if owns_run_dir else None
        if claimed and isinstance(refused.error, (ConfigError, DataNotFoundError)):
            give_back_unstarted_run_dir(Path(claimed))
        raise
    finally:
        if owns_run_dir:
            claimed = os.environ.pop(RUN_DIR_ENV, None)
            # a run that stopped before writing anything gives back the version directory it claimed
            if claimed and Path(claimed).is_dir() and not any(Path(claimed).iterdir()):
                Path(claimed).rmdir()
            if claimed and not Path(claimed).exists() and Path(claimed) in CLAIMED_HERE:
                remove_empty_folders(Path(claimed).parent, below=CLAIMED_HERE[Path(claimed)])
            if claimed:
                CLAIMED_HERE.pop(Path(claimed), None)


def give_back_unstarted_run_dir(run_dir: Path) -> None:
    """A run directory this command made, for a run that stopped before it had anything to continue (refused by its
    config or data once the Trainer was built, or a SIGTERM outside training): with no checkpoint and no results it
    holds only what the start wrote (its config.yaml, an empty event file), and goes, as if never claimed."""
    if run_dir in CLAIMED_HERE and run_dir.is_dir() and not has_checkpoint(run_dir) and not (run_dir / RESULTS_FILE).exists():
        shutil.rmtree(run_dir, ignore_errors=True)


def remove_empty_folders(folder: Path, below: Path) -> None:
    """``folder`` and its parents while they are empty, up to (not including) ``below``: the folders of a run's name
    (``runs/cifar100/teacher-resnet32x4``) that a refused first run of that name leaves with nothing in them."""
    below = below.resolve()
    while folder.resolve() != below and below in folder.resolve().parents:
        with contextlib.suppress(OSError):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        if folder.exists():
            return
        folder = folder.parent


def stopped_outside_training(stop: Stopped, run_dir: Path | None) -> int:
    """What a SIGTERM outside training leaves, said in one line; the exit status. A run directory made by this
    command that holds nothing to continue (no checkpoint) is removed: a run that never started leaves none."""
    if run_dir is not None and (run_dir / RESULTS_FILE).is_file():
        print(f"distill: stopped by {stop.signal_name} after the run had finished; its results are in {run_dir}",
              file=sys.stderr)
        return 0
    if run_dir is not None and has_checkpoint(run_dir):
        print(f"distill: stopped by {stop.signal_name} outside training; continue with: distill fit --resume {run_dir}",
              file=sys.stderr)
        return 0
    if run_dir is not None:
        give_back_unstarted_run_dir(run_dir)
    print(f"distill: stopped by {stop.signal_name} before training started; nothing was kept, so run the same "
          "command again", file=sys.stderr)
    return 128 + stop.signum


if __name__ == "__main__":
    main()
