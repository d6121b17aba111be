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
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from distill.data import DistillDataModule
from distill.errors import DistillError
from distill.methods import DistillModule
from distill.run import RUN_DIR_ENV, finish_fit, next_version_dir, run_loggers


class DistillCLI(LightningCLI):
    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        self.results: dict[str, Any] | None = None
        super().__init__(
            DistillModule,
            DistillDataModule,
            subclass_mode_model=True,
            seed_everything_default=0,
            trainer_defaults={"default_root_dir": "runs"},
            # a run never overwrites an earlier run's config: every run has a fresh version directory
            save_config_kwargs={"overwrite": False},
            auto_configure_optimizers=False,  # each method takes `optimizer`/`lr_scheduler` itself
            parser_kwargs={"prog": "distill", "description": "Knowledge distillation with Lightning: "
                           "fit/validate/test/predict a method from a YAML config. Other commands: "
                           "distill report | sweep | choose-assistant | repro | bench | residual-budget | robustness (each with --help)."},
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_name", type=str | None, default=None,
            help="Runs go to <trainer.default_root_dir>/<run_name>/version_N "
                 "(default: <dataset>/<method>-<student>).",
        )
        for attribute in ("num_classes", "in_channels", "image_size"):
            parser.link_arguments(f"data.{attribute}", f"model.init_args.{attribute}", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs: Any):
        trainer_config = self._get(self.config_init, "trainer", default={})
        if trainer_config.get("logger") in (None, True) and "logger" not in kwargs:
            kwargs["logger"] = run_loggers(trainer_config.get("default_root_dir") or "runs", "", self._run_dir())
        return super().instantiate_trainer(**kwargs)

    def _run_dir(self) -> Path:
        # DDP worker processes re-run this command: they must join rank 0's directory.
        inherited = os.environ.get(RUN_DIR_ENV)
        if inherited and os.environ.get("LOCAL_RANK", "0") != "0":
            return Path(inherited)
        root = self._get(self.config, "trainer").get("default_root_dir") or "runs"
        name = self._get(self.config, "run_name") or self._default_run_name()
        run_dir = next_version_dir(root, name)
        os.environ[RUN_DIR_ENV] = str(run_dir)
        return run_dir

    def _default_run_name(self) -> str:
        model = self._get(self.config, "model")
        method = model.class_path.rsplit(".", 1)[-1].lower()
        return f"{self.datamodule.hparams.get('dataset', 'data')}/{method}-{model.init_args.student}"

    def before_fit(self) -> None:
        self._fit_started = time.time()

    def after_fit(self) -> None:
        self._dump_config()
        self.results = finish_fit(
            self.trainer, self.model, self.datamodule,
            config=self.config_dump, seed=self._get(self.config, "seed_everything"),
            started=self._fit_started,
        )
        if self.trainer.is_global_zero:
            run_dir = self.results["run_dir"]
            test_acc = self.results["test_acc"]
            print(f"\nbest val acc {self.results['best_val_acc']:.4f}, test acc {test_acc:.4f} "
                  f"(best-validation checkpoint)" if test_acc is not None else "")
            print(f"Run directory: {run_dir}\nTensorBoard:   tensorboard --logdir {Path(run_dir).parent}")


def _user_error(err: BaseException | None) -> DistillError | None:
    """The DistillError behind ``err``: jsonargparse wraps errors raised while building classes."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, DistillError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def _user_errors_as_exit() -> Iterator[None]:
    """A user error becomes one line on stderr and exit status 2; anything else stays a traceback."""
    try:
        yield
    except Exception as err:
        user_error = _user_error(err)
        if user_error is None:
            raise
        print(f"distill: error: {user_error}", file=sys.stderr)
        raise SystemExit(2) from None


def main(args: list[str] | None = None) -> DistillCLI | None:
    """Entry point of the ``distill`` console script (``args`` for calls from Python and tests)."""
    owns_run_dir = RUN_DIR_ENV not in os.environ
    try:
        with _user_errors_as_exit():
            return DistillCLI(args=args)
    finally:
        if owns_run_dir:
            os.environ.pop(RUN_DIR_ENV, None)


#: Subcommands that are not LightningCLI's: ``distill <name> ...`` calls ``<module>.main(argv)``.
TOOLS = {"report": "distill.report", "sweep": "distill.sweep", "choose-assistant": "distill.choose_assistant",
         "repro": "distill.repro",
         "bench": "distill.bench",
         "residual-budget": "distill.residual_budget", "robustness": "distill.robustness"}


def entry_point() -> None:
    """The console script: exit status 0, or 2 for a user error (see :func:`main`)."""
    argv = sys.argv[1:]
    if argv and argv[0] in TOOLS:
        import importlib

        tool = importlib.import_module(TOOLS[argv[0]])
        with _user_errors_as_exit():
            tool.main(argv[1:])
        return
    main()


if __name__ == "__main__":
    entry_point()
