"""Run directories and the end of a run: test the best-validation checkpoint (and, for methods that report
the end of their schedule, the final weights), export, write results.json.

These functions are what the CLI calls after ``Trainer.fit``; notebooks call them the same way::

    trainer = L.Trainer(max_epochs=5, logger=run_loggers("runs", "mnist5k/kd"))
    trainer.fit(model, datamodule=dm)
    results = finish_fit(trainer, model, dm)
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from distill.callbacks import TrainingThroughput
from distill.errors import ConfigError
from distill.methods.base import DistillModule
from distill.teachers import save_network

#: Set by the process that starts a run so that DDP worker processes (which re-run the command)
#: log into the same run directory instead of picking the next free version.
RUN_DIR_ENV = "DISTILL_RUN_DIR"


def child_environment(default_threads: int | None = 1) -> dict[str, str]:
    """The environment of a subprocess started by this package (repro, killtest, bench).

    ``default_threads`` torch threads unless the user chose otherwise (``None``: torch's default): several
    runs at once on a few cores would otherwise fight over them. This package comes first on the path, so
    a checkout runs its own code, not an installed copy. A run directory inherited from a parent run would
    make every child write into it.
    """
    env = dict(os.environ)
    if default_threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(default_threads))
    env.pop(RUN_DIR_ENV, None)
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return env
# TensorBoard and CSV logs share the run directory on purpose; the CSV logger only ever replaces
# its own metrics.csv there, so its "directory not empty" warning is noise.
warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
RESULTS_FILE = "results.json"
#: The DataModule a config's ``data:`` builds unless it names another by ``class_path``.
DISTILL_DATA_MODULE = "distill.data.DistillDataModule"
EXPORT_FILE = "model.safetensors"
#: Prefix of the metrics that the test of the final weights logs (``end_of_schedule/test/acc``), so that
#: the run's TensorBoard and metrics.csv show them apart from the best checkpoint's ``test/acc``.
END_OF_SCHEDULE_PREFIX = "end_of_schedule/"


def next_version_dir(root: str | Path, name: str) -> Path:
    """``root/name/version_N`` with N one above the highest existing version, created here: never an
    existing run's directory, also when several runs of one name start at once (``distill repro --jobs``,
    a SLURM job array): each claims its directory with an exclusive ``mkdir``, and one that loses the
    race takes the next N."""
    return next_numbered_dir(Path(root) / name, "version_")


def has_checkpoint(run_dir: Path) -> bool:
    """Whether a run directory holds a checkpoint to continue from (``checkpoints/*.ckpt``)."""
    return any((run_dir / "checkpoints").glob("*.ckpt"))


def dir_number(path: Path, prefix: str = "version_") -> int | None:
    """N of a directory named ``<prefix>N``, else None."""
    match = re.fullmatch(rf"{re.escape(prefix)}(\d+)", path.name)
    return int(match.group(1)) if match else None


def next_numbered_dir(parent: Path, prefix: str) -> Path:
    """``parent/<prefix>N``, N one above the highest taken, claimed with an exclusive ``mkdir``."""
    parent.mkdir(parents=True, exist_ok=True)
    taken = [n for p in parent.glob(f"{prefix}*") if (n := dir_number(p, prefix)) is not None]
    number = max(taken, default=-1) + 1
    while True:
        claimed = parent / f"{prefix}{number}"
        try:
            claimed.mkdir()
            return claimed
        except FileExistsError:
            number += 1


def run_loggers(root: str | Path, name: str, version_dir: Path | None = None, resume: bool = False) -> list[Any]:
    """TensorBoard (with an ``hp_metric`` of best validation accuracy) and CSV loggers in one directory.

    ``resume``: the directory is an interrupted run's, continued: ``metrics.csv`` keeps its rows and
    gets the new ones appended (Lightning's CSV logger would delete it).
    """
    version_dir = version_dir or next_version_dir(root, name)
    save_dir, name, version = str(version_dir.parent.parent), version_dir.parent.name, version_dir.name
    # an integer version is the same directory (Lightning names it version_N) and shows as v_num=N, not "on_N"
    number = dir_number(version_dir)
    version = number if number is not None else version
    return [
        TensorBoardLogger(save_dir=save_dir, name=name, version=version),
        (_AppendingCSVLogger if resume else CSVLogger)(save_dir=save_dir, name=name, version=version),
    ]


class _AppendingExperimentWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):  # keep the earlier rows and their columns
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                header = handle.readline().strip()
            self.metrics_keys = sorted(header.split(",")) if header else []


class _AppendingCSVLogger(CSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment


def best_checkpoint_callback(trainer: L.Trainer) -> ModelCheckpoint | None:
    callbacks = [c for c in trainer.checkpoint_callbacks if c.monitor is not None]
    return callbacks[0] if callbacks else None


def throughput_callback(trainer: L.Trainer) -> TrainingThroughput | None:
    return next((c for c in trainer.callbacks if isinstance(c, TrainingThroughput)), None)


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return value


def finish_fit(
    trainer: L.Trainer,
    model: DistillModule,
    datamodule: L.LightningDataModule,
    config: dict[str, Any] | None = None,
    seed: int | None = None,
    started: float | None = None,
) -> dict[str, Any]:
    """Tests the best-validation checkpoint and writes ``results.json`` and ``model.safetensors``.

    Model selection uses the validation split only; the test split is evaluated once, here. Returns
    the results dict (on every process; only global rank 0 writes files).

    ``best_val_acc``, ``test_acc`` and ``test`` always describe the best-validation checkpoint (the
    weights the fit ended with when there is none, e.g. without validation), and ``model.safetensors``
    is that same network. A method with ``report_end_of_schedule`` (PatientConsistentKD: Beyer et al.
    report the student at the end of the schedule) also gets ``results["end_of_schedule"]``: ``epoch``
    and ``global_step`` the fit ended at, ``val_acc`` (the last validation's accuracy if that validation
    ran on these final weights, else null), ``test_acc`` and ``test`` of the final weights. Those are
    tested first, in memory, before the best checkpoint is loaded into the module; their metrics are
    logged to the run's loggers as ``end_of_schedule/test/...`` (so metrics.csv and TensorBoard hold
    both results, under distinct names) and stored in ``test`` without the prefix. Without a best
    checkpoint the one test serves both. Staged methods (``evaluation_stages``) have no such entry.
    """
    throughput = throughput_callback(trainer)
    resumed_from = trainer.ckpt_path  # before the tests below replace it
    if started is None:  # the fit's own start when the module's throughput callback saw it
        started = throughput.fit_started if throughput and throughput.fit_started else time.time()
    checkpoint = best_checkpoint_callback(trainer)
    best_path = checkpoint.best_model_path if checkpoint is not None else ""
    fit_epochs = trainer.current_epoch
    end_of_schedule: dict[str, Any] | None = None
    stages = []
    for name in model.evaluation_stages():  # staged methods: every stage's network, the last one final
        record = dict(model.select_stage(name))
        stage_metrics = _test(trainer, model, datamodule, None)
        if trainer.is_global_zero:  # one line per stage instead of a table each
            print(f"stage {name}: best val acc {_fmt(record.get('best_val_acc'))}, "
                  f"test acc {_fmt(stage_metrics.get(f'{name}/test/acc'))}")
        stages.append({**record, "test_acc": stage_metrics.get(f"{name}/test/acc"), "test": stage_metrics})
    if stages:
        test_metrics = {k.split("/", 1)[1]: v for k, v in stages[-1]["test"].items()}
        best_score = stages[-1].get("best_val_acc")
    else:
        # the final weights first: testing the best checkpoint loads it into the module
        separate = bool(model.report_end_of_schedule and best_path)
        end_metrics = _test_final_weights(trainer, model, datamodule) if separate else None
        test_metrics = _test(trainer, model, datamodule, best_path or None, verbose=True)
        best_score = checkpoint.best_model_score if checkpoint is not None else None
        if model.report_end_of_schedule:  # without a best checkpoint, the test above was of the final weights
            end_of_schedule = _end_of_schedule(trainer, model, fit_epochs, end_metrics if separate else test_metrics)
    run_dir = Path(trainer.log_dir or trainer.default_root_dir)
    # a resumed run: its earlier segments' fit time (up to the checkpoint it resumed from) counts too
    finished = time.time()
    wall_time = finished - started + (throughput.previous_wall_s if throughput else 0.0)
    results: dict[str, Any] = {
        "method": type(model).__name__,
        "student": model.hparams.get("student"),
        "teacher": getattr(model, "teacher_info", None),
        "student_init": getattr(model, "student_init_info", None),
        "best_val_acc": _plain(best_score) if best_score is not None else None,
        "test_acc": test_metrics.get("test/acc"),
        "test": test_metrics,
        "epochs": fit_epochs,
        "global_steps": trainer.global_step,
        "wall_time_s": round(wall_time, 3),
        "train_images_per_s": round(throughput.images_per_s, 2) if throughput else None,
        "train_images": throughput.images if throughput else None,
        # this segment's start and end on the wall clock (Unix seconds): which runs overlapped in time
        "started_at": round(started, 3),
        "finished_at": round(finished, 3),
        "seed": seed,
        "machine": machine(trainer),
        "resumed_from": resumed_from,
        "best_checkpoint": best_path or None,
        "model_file": str(run_dir / EXPORT_FILE),
        "run_dir": str(run_dir),
        "config": config if config is not None else dict(model.hparams),
    }
    if end_of_schedule is not None:
        results["end_of_schedule"] = end_of_schedule
    if stages:
        results["stages"] = stages
    trained = trainer.global_step > 0
    if not trained:  # a fit of no step (from Python; the CLI refuses it): no model to export, nothing for `latest`
        results["model_file"] = None
    if trainer.is_global_zero and not trained:
        warnings.warn(f"{run_dir}: the fit took no optimiser step, so no model.safetensors is exported and `latest` "
                      "is left where it was.", UserWarning, stacklevel=2)
        write_json_atomic(run_dir / RESULTS_FILE, results)
    elif trainer.is_global_zero:
        save_network(model.student_network(), model.student_spec, run_dir / EXPORT_FILE,
                     best_val_acc=results["best_val_acc"], test_acc=results["test_acc"])
        write_json_atomic(run_dir / RESULTS_FILE, results)
        if not trainer.fast_dev_run:  # a smoke test is no run for `latest` (a later config's teacher) to name
            _point_latest(run_dir)
    return results


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"


def _test(trainer: L.Trainer, model: DistillModule, datamodule: L.LightningDataModule,
          ckpt_path: str | None, verbose: bool = False) -> dict[str, Any]:
    """``verbose``: Lightning's table of the test metrics on the console (the run's own test, not the extras)."""
    metrics = trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=verbose)
    return {k: _plain(v) for k, v in (metrics[0] if metrics else {}).items()}


def _test_final_weights(trainer: L.Trainer, model: DistillModule,
                        datamodule: L.LightningDataModule) -> dict[str, Any] | None:
    """Test metrics of the weights in memory, logged as ``end_of_schedule/test/...``, returned as ``test/...``.

    ``trainer.test(model, ckpt_path=None)`` tests the module as it is, loading nothing, except under
    SLURM when ``default_root_dir`` holds an HPC checkpoint (``hpc_ckpt_N.ckpt``, left by Lightning's
    auto-requeue): Lightning would load that one. There the weights go through a weights-only
    checkpoint of their own, which ``trainer.test`` loads instead.
    """
    hpc = SLURMEnvironment.detect() and any(Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt"))
    path = Path(trainer.log_dir or trainer.default_root_dir) / "end_of_schedule.ckpt" if hpc else None
    prefix = model.log_prefix
    model.log_prefix = END_OF_SCHEDULE_PREFIX + prefix
    try:
        if path is not None:
            trainer.save_checkpoint(path, weights_only=True)
        metrics = _test(trainer, model, datamodule, str(path) if path is not None else None)
    finally:
        model.log_prefix = prefix
        if path is not None and trainer.is_global_zero:
            path.unlink(missing_ok=True)
    if trainer.ckpt_path != (str(path) if path is not None else None):  # another file's weights were tested
        warnings.warn(f"the test of the final weights loaded {trainer.ckpt_path}; results.json records no "
                      "end-of-schedule test", stacklevel=2)
        return None
    return {k.removeprefix(END_OF_SCHEDULE_PREFIX): v for k, v in metrics.items()}


def _end_of_schedule(trainer: L.Trainer, model: DistillModule, fit_epochs: int,
                     test_metrics: dict[str, Any] | None) -> dict[str, Any]:
    """``results["end_of_schedule"]``: where the fit ended, and the final weights' validation and test results."""
    validated = model.last_validation
    final = validated is not None and validated[0] == trainer.global_step
    return {"epoch": fit_epochs, "global_step": trainer.global_step,
            "val_acc": _plain(validated[1]) if final else None,
            "test_acc": (test_metrics or {}).get("test/acc"), "test": test_metrics}


def cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows of it."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name") and ":" in line:
                return " ".join(line.split(":", 1)[1].split())
    return platform.processor() or platform.machine()


def machine(trainer: L.Trainer) -> dict[str, Any]:
    """Where a run trained, for its results.json: the same config and seed can give a few tenths of a point apart
    on another processor (floating-point sums in another order), so a result names its machine."""
    device = trainer.strategy.root_device
    accelerator = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "accelerator": accelerator, "devices": trainer.world_size,
            "torch": torch.__version__, "lightning": L.__version__}


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def _point_latest(run_dir: Path) -> None:
    """``<name>/latest`` → the newest finished version (the highest ``version_N`` with a ``results.json``), so
    configs can name a teacher by a stable path; an older run that finishes later does not take it back."""
    link = run_dir.parent / "latest"
    if link.exists() and not link.is_symlink():  # a folder or file of the user's: never replaced, but said
        warnings.warn(f"{link} is not a link, so it was not pointed at {run_dir}: remove or rename it, and the next "
                      "finished run points it at the newest version.", UserWarning, stacklevel=2)
        return
    finished = [d for d in run_dir.parent.glob("version_*") if (d / RESULTS_FILE).is_file() and dir_number(d) is not None]
    newest = max(finished, key=dir_number, default=run_dir)
    tmp = run_dir.parent / f".latest.{os.getpid()}"
    try:
        tmp.symlink_to(newest.name, target_is_directory=True)
        tmp.replace(link)
    except OSError:  # file systems without symlinks: the versioned path still works
        tmp.unlink(missing_ok=True)


def load_results(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / RESULTS_FILE).read_text())


def data_arguments(config: Mapping[str, Any]) -> dict[str, Any]:
    """The DistillDataModule arguments of a run's resolved config: ``data.init_args`` (``data`` of runs saved
    before the CLI took DataModules by ``class_path``). A run on a DataModule of your own is an error here."""
    data = dict(config.get("data") or {})
    if "class_path" not in data:
        return data
    if data["class_path"] != DISTILL_DATA_MODULE:
        raise ConfigError(f"this run trained on {data['class_path']}, not {DISTILL_DATA_MODULE}: rebuild its "
                          "data yourself (the tools that reload a run's data know only distill's data sets).")
    return dict(data.get("init_args") or {})
