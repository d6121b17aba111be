"""``distill sweep``: hyperparameter studies on Optuna, every trial an ordinary ``distill fit`` run.

    distill sweep --config configs/mnist5k/kd.yaml --space configs/sweeps/kd_temperature.yaml --trials 20
    distill sweep ... --study kd-tau --storage postgresql://user@db-host/optuna   # many machines, one study
    distill sweep ... --trials 20 -- --trainer.max_epochs 5                      # extra `distill fit` flags
    distill sweep ... --trials 20 --jobs 4                                        # 4 trials at once, one machine

The search space is a YAML file mapping dotted config keys (anything ``distill fit`` accepts as a
flag) to a distribution::

    model.init_args.temperature: {type: loguniform, low: 1, high: 20}
    model.init_args.alpha:       {type: float, low: 0.5, high: 1.0}
    model.init_args.student:     {type: categorical, choices: [mlp_30_30, mlp_300_300]}
    seed_everything:             {type: int, low: 0, high: 4}

Types: ``float`` (``low``, ``high``, optional ``step`` or ``log: true``), ``loguniform`` (float with
``log: true``), ``int`` (``low``, ``high``, optional ``step``/``log``), ``categorical`` (``choices``:
numbers, strings, booleans or null).

Choices made here, and why:

* **Same code path as ``distill fit``.** A trial sets ``sys.argv`` to ``distill fit --config ...``
  with the sampled values as flags and ``--run_name sweeps/<study>/trial_<n>``, then calls
  :func:`distill.cli.main` in-process, which parses it exactly as the console script does. A trial is
  therefore an ordinary run directory (``config.yaml``, logs, checkpoints, ``results.json``) that
  ``distill report`` and TensorBoard read. Patching ``sys.argv`` rather than passing ``args`` matters
  for multi-GPU trials: Lightning's DDP launcher starts the other ranks by re-running ``sys.argv``, and
  they must run the trial's ``fit``, not the sweep (not tested here: no GPUs).
* **Objective: ``best_val_acc``** (the best validation accuracy of the run). Model selection never
  looks at the test split; ``results.json`` still carries the test accuracy of each trial's
  best-validation checkpoint for the final report.
* **Storage.** Default: an SQLite file next to the study's runs, ``<root>/sweeps/<study>/study.db``.
  ``--storage`` takes any Optuna RDB URL (``postgresql://...``, ``mysql://...``) so workers on many
  machines share one study; the run directories must then be on a shared file system if one place
  should hold them all.
* **Resuming** is re-running the same command: the study is loaded by name, finished trials
  (complete or pruned) count towards ``--trials``; a trial interrupted by Ctrl-C, or left ``RUNNING``
  by a process that no longer exists, is marked failed and its parameters are queued again. On one machine that is decided
  from the host name and process id recorded in each trial; trials of other machines are failed by
  Optuna's heartbeat once they have been silent for ``--grace-period`` seconds.
* **Several trials at once on one machine** (``--jobs N``): N worker processes, each a ``distill sweep`` on the
  same study (the mechanism several machines use), so they share one GPU or the CPU's cores (one torch thread
  each unless ``OMP_NUM_THREADS`` is set). The remaining trials are split between them, so the study ends with
  exactly ``--trials`` finished ones; each worker's sampler is seeded ``--seed + k`` so that workers starting
  together do not draw the same values (a parallel study is therefore not the same study as a serial one with
  that seed). Their output goes to ``<root>/sweeps/<study>/worker<k>.log``; a worker that fails is named with
  its log and the command exits non-zero after the others finish.
* **Pruning** (``--prune``): a median pruner on the validation accuracy reported after each epoch by
  :class:`OptunaPruning`. A pruned trial stops training early but still ends like any run (tested,
  ``results.json`` written), so its directory is complete.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import socket
import sys
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import yaml
from lightning.pytorch.callbacks import Callback

from distill.errors import ConfigError

DISTRIBUTIONS = ("float", "loguniform", "int", "categorical")
#: What each trial records (``trial.user_attrs``) besides Optuna's own fields.
ATTR_WORKER, ATTR_RUN_NAME, ATTR_RUN_DIR, ATTR_RESULTS = "worker", "run_name", "run_dir", "results_json"
STUDY_DB = "study.db"


# ----------------------------------------------------------------------------------- search space
def load_space(path: str | Path) -> dict[str, dict[str, Any]]:
    """Reads and checks a search-space file; every problem is a one-line :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space file {path} does not exist")
    try:
        space = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(err).split())[:200]}") from None
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{path} must map config keys to distributions, e.g. "
                          "`model.init_args.temperature: {type: float, low: 1, high: 20}`")
    for key, spec in space.items():
        check_distribution(str(key), spec, path)
    return {str(k): dict(v) for k, v in space.items()}


def check_distribution(key: str, spec: Any, path: Path | str = "space") -> None:
    where = f"{path}: {key}"
    if not isinstance(spec, dict) or spec.get("type") not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: expected {{type: {'|'.join(DISTRIBUTIONS)}, ...}}, got {spec!r}")
    kind = spec["type"]
    allowed = {"type", "choices"} if kind == "categorical" else {"type", "low", "high", "step", "log"}
    if extra := set(spec) - allowed:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(extra))} for type {kind}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: categorical needs a non-empty list `choices`")
        if bad := [c for c in choices if not (c is None or isinstance(c, (bool, int, float, str)))]:
            raise ConfigError(f"{where}: choices must be numbers, strings, booleans or null, got {bad[0]!r}")
        return
    low, high = spec.get("low"), spec.get("high")
    numbers = (int,) if kind == "int" else (int, float)
    if not all(isinstance(v, numbers) and not isinstance(v, bool) for v in (low, high)):
        raise ConfigError(f"{where}: {kind} needs numeric `low` and `high`" + (" (integers)" if kind == "int" else ""))
    if not low < high:
        raise ConfigError(f"{where}: low ({low}) must be below high ({high})")
    if (kind == "loguniform" or spec.get("log")) and low <= 0:
        raise ConfigError(f"{where}: a log scale needs low > 0, got {low}")
    if spec.get("log") and spec.get("step") is not None:
        raise ConfigError(f"{where}: `step` and `log` cannot be combined")


def suggest(trial: Any, key: str, spec: dict[str, Any]) -> Any:
    kind = spec["type"]
    if kind == "categorical":
        return trial.suggest_categorical(key, spec["choices"])
    if kind == "int":
        return trial.suggest_int(key, spec["low"], spec["high"], step=spec.get("step") or 1,
                                 log=bool(spec.get("log")))
    return trial.suggest_float(key, float(spec["low"]), float(spec["high"]), step=spec.get("step"),
                               log=kind == "loguniform" or bool(spec.get("log")))


def flag(key: str, value: Any) -> str:
    """``--key=value`` as jsonargparse reads it (YAML scalars)."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    else:
        text = str(value)
    return f"--{key}={text}"


# ----------------------------------------------------------------------------------- pruning
#: The trial whose fit runs in this process (set by the sweep around each in-process fit).
_ACTIVE_TRIAL: Any = None


class OptunaPruning(Callback):
    """Reports ``monitor`` to the active Optuna trial after each validation epoch and stops a bad trial.

    The sweep adds it as ``--trainer.callbacks+=distill.tools.sweep.OptunaPruning``, so it appears in the
    trial's ``config.yaml``; outside a sweep (re-running that config, DDP worker ranks) there is no
    active trial and it only takes part in rank 0's decision. Instead of raising inside the training
    loop it sets ``trainer.should_stop``: the run then ends like any other (best checkpoint tested,
    ``results.json`` written) and the sweep marks the trial pruned afterwards.
    """

    def __init__(self, monitor: str = "val/acc") -> None:
        self.monitor = monitor
        self.pruned_at_epoch: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        prune = False
        trial = _ACTIVE_TRIAL
        if trainer.is_global_zero and trial is not None:
            value = trainer.callback_metrics.get(self.monitor)
            if value is not None and math.isfinite(float(value)):
                trial.report(float(value), step=trainer.current_epoch)
                prune = trial.should_prune()
        # every rank must stop together
        prune = trainer.strategy.broadcast(prune, src=0)
        if prune:
            self.pruned_at_epoch = trainer.current_epoch
            trainer.should_stop = True


# ----------------------------------------------------------------------------------- the sweep
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill sweep",
        description="Optuna study over config values; each trial is a `distill fit` run directory. "
                    "Flags after `--` go to every trial's `distill fit`.",
        allow_abbrev=False,
    )
    parser.add_argument("--config", required=True, help="the `distill fit` config every trial starts from")
    parser.add_argument("--space", required=True, help="search-space YAML: dotted config key → distribution")
    parser.add_argument("--trials", type=int, required=True,
                        help="finished trials (complete or pruned) the study should have; re-running resumes")
    parser.add_argument("--study", default=None, help="study name (default: <config run_name>-<space file name>)")
    parser.add_argument("--storage", default=None,
                        help="Optuna RDB URL, e.g. postgresql://user:pass@host/db (default: SQLite file "
                             "<root>/sweeps/<study>/study.db)")
    parser.add_argument("--root", default=None,
                        help="runs root, i.e. trainer.default_root_dir (default: the config's, else runs)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the TPE sampler")
    parser.add_argument("--direction", choices=("maximize", "minimize"), default="maximize",
                        help="of best_val_acc (default maximize)")
    parser.add_argument("--prune", action="store_true",
                        help="stop unpromising trials early (median pruner on val/acc per epoch)")
    parser.add_argument("--grace-period", type=int, default=600,
                        help="seconds without heartbeat after which another machine's RUNNING trial is "
                             "failed and retried (RDB storage heartbeat; default 600)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="run up to N trials at once on this machine, each worker a subprocess on the same "
                             "study with its log in <root>/sweeps/<study>/worker<k>.log (default 1)")
    # A worker of --jobs runs its share of the remaining trials, no more: the study ends at --trials exactly.
    parser.add_argument("--worker-trials", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(err).split())[:200]}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} is not a `distill fit` config (a YAML mapping)")
    return config


def _read_config(path: Path) -> dict[str, Any]:
    """The config file over the recipe it names (``recipe: recipe.yaml``), as ``distill fit --config`` reads it."""
    from distill.cli import config_lines  # resolves the recipe's path, or one ConfigError naming it

    _read_yaml(path)  # a missing or malformed file: this command's own one-line error
    return config_lines(path)


def default_study_name(config: dict[str, Any], config_path: Path, space_path: Path) -> str:
    base = str(config.get("run_name") or config_path.stem).strip("/").replace("/", "-")
    return f"{base}-{space_path.stem}"


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def fail_orphaned_trials(study: Any, retry: Any) -> list[int]:
    """Marks RUNNING trials of dead processes on this host failed and queues their parameters again.

    A trial is orphaned when the sweep running it was killed (Ctrl-C, out of memory, a node reboot).
    Trials whose recorded worker is another host are left to the heartbeat: they may be alive.
    """
    import optuna

    host = socket.gethostname()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = str(trial.user_attrs.get(ATTR_WORKER, ""))
        trial_host, _, pid = worker.rpartition(":")
        if trial_host != host or not pid.isdigit() or _process_alive(int(pid)):
            continue
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        failed.append(trial.number)
        retry(study, study.get_trials(deepcopy=False)[trial.number])
    return failed


@contextlib.contextmanager
def _trial_process_state(trial: Any, fit_argv: list[str]) -> Iterator[None]:
    global _ACTIVE_TRIAL
    saved_argv = sys.argv[:]
    sys.argv = [saved_argv[0] if saved_argv else "distill", *fit_argv]
    _ACTIVE_TRIAL = trial
    try:
        yield
    finally:
        _ACTIVE_TRIAL = None
        sys.argv = saved_argv


def make_objective(config_path: Path, space: dict[str, dict[str, Any]], study_name: str, root: str,
                   fit_extra: list[str], prune: bool):
    import optuna

    from distill.cli import main as distill_main

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr(ATTR_WORKER, worker_id())
        overrides = [flag(key, suggest(trial, key, spec)) for key, spec in space.items()]
        run_name = f"sweeps/{study_name}/trial_{trial.number}"
        trial.set_user_attr(ATTR_RUN_NAME, run_name)
        fit_argv = ["fit", "--config", str(config_path), *fit_extra, *overrides,
                    f"--trainer.default_root_dir={root}", f"--run_name={run_name}"]
        if prune:
            fit_argv.append("--trainer.callbacks+=distill.tools.sweep.OptunaPruning")
        print(f"\n[sweep {study_name}] trial {trial.number}: {' '.join(overrides)}", flush=True)
        try:
            with _trial_process_state(trial, fit_argv):
                cli = distill_main()  # reads the patched sys.argv, exactly as the console script does
        except SystemExit as exit_:
            if exit_.code == 2:  # distill already printed the one-line reason
                raise ConfigError(f"trial {trial.number} was refused by `distill fit` (see the error above); "
                                  "fix the config, space or flags") from None
            # Lightning turns Ctrl-C into SystemExit(1); let Optuna record the trial as failed
            raise KeyboardInterrupt from None
        results = cli.results if cli is not None else None
        if not results or results.get("best_val_acc") is None:
            raise RuntimeError(f"trial {trial.number} produced no validation accuracy (is validation disabled?)")
        run_dir = Path(results["run_dir"])
        trial.set_user_attr(ATTR_RUN_DIR, str(run_dir))
        trial.set_user_attr(ATTR_RESULTS, str(run_dir / "results.json"))
        trial.set_user_attr("test_acc", results.get("test_acc"))
        pruning = next((c for c in cli.trainer.callbacks if isinstance(c, OptunaPruning)), None)
        if pruning is not None and pruning.pruned_at_epoch is not None:
            raise optuna.TrialPruned(f"pruned after epoch {pruning.pruned_at_epoch}")
        return float(results["best_val_acc"])

    return objective


def open_study(name: str, storage_url: str, direction: str, seed: int | None, prune: bool,
               grace_period: int, identity: dict[str, Any]):
    import optuna
    from optuna.storages import RDBStorage, RetryFailedTrialCallback

    retry = RetryFailedTrialCallback(max_retry=2)
    try:
        storage = RDBStorage(storage_url, heartbeat_interval=max(1, grace_period // 4), grace_period=grace_period,
                             failed_trial_callback=retry)
    except Exception as err:  # bad URL, missing driver (psycopg2), unreachable server
        raise ConfigError(f"cannot open Optuna storage {storage_url}: {' '.join(str(err).split())[:300]}") from None
    sampler = optuna.samplers.TPESampler(seed=seed)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1) if prune else optuna.pruners.NopPruner()
    try:
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                    direction=direction, load_if_exists=True)
    except ValueError as err:
        raise ConfigError(f"study {name!r}: {err}") from None
    if study.direction.name.lower() != direction:
        raise ConfigError(f"study {name!r} was created with direction {study.direction.name.lower()}; "
                          f"use --direction {study.direction.name.lower()} or another --study name")
    # A study is one question: resuming it with another config, space or flags would mix answers.
    stored = study.user_attrs.get("identity")
    if stored is None:
        study.set_user_attr("identity", identity)
    elif stored != identity:
        changed = sorted(k for k in set(stored) | set(identity) if stored.get(k) != identity.get(k))
        raise ConfigError(f"study {name!r} exists with a different {', '.join(changed)}; "
                          "re-run it with the original arguments or choose another --study name")
    return study, retry


def finished(study: Any) -> int:
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def report_best(study: Any) -> dict[str, Any] | None:
    """Prints and returns the best trial: its parameters, validation accuracy and run directory."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    counts = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,))) for s in optuna.trial.TrialState}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    print(f"\nStudy {study.study_name}: {summary or 'no trials'}")
    if not complete:
        print("No complete trial yet.")
        return None
    best = study.best_trial
    info = {"number": best.number, "params": best.params, "best_val_acc": best.value,
            "test_acc": best.user_attrs.get("test_acc"), "run_dir": best.user_attrs.get(ATTR_RUN_DIR),
            "results_json": best.user_attrs.get(ATTR_RESULTS)}
    print(f"Best trial {best.number}: val acc {best.value:.4f}")
    for key, value in best.params.items():
        print(f"  {key}: {value}")
    print(f"  run directory: {info['run_dir']}")
    return info


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """``distill sweep``; returns the best trial's summary (for tests and notebooks)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    fit_extra: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, fit_extra = argv[:split], argv[split + 1:]
    args = build_parser().parse_args(argv)
    try:
        import optuna
    except ImportError:
        raise ConfigError("`distill sweep` needs Optuna: pip install 'distill[optuna]' (or pip install optuna)") from None
    if args.trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {args.trials}")
    if args.grace_period < 10:
        raise ConfigError(f"--grace-period must be at least 10 seconds, got {args.grace_period}")
    if args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs}: give 1 (trials one after another) or more (trials at once)")

    config_path = Path(args.config)
    config = _read_config(config_path)
    space_path = Path(args.space)
    space = load_space(space_path)
    name = args.study or default_study_name(config, config_path, space_path)
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"--study must be a plain name (no '/'), got {name!r}")
    root = args.root or (config.get("trainer") or {}).get("default_root_dir") or "runs"
    storage_url = args.storage
    if storage_url is None:
        study_dir = Path(root) / "sweeps" / name
        study_dir.mkdir(parents=True, exist_ok=True)
        storage_url = f"sqlite:///{(study_dir / STUDY_DB).resolve()}"
    identity = {"config": str(config_path.resolve()), "space": space, "fit_flags": fit_extra, "root": str(root),
                "prune": args.prune}

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own one line per trial
    study, retry = open_study(name, storage_url, args.direction, args.seed, args.prune, args.grace_period,
                              identity)
    if orphans := fail_orphaned_trials(study, retry):
        print(f"[sweep {name}] trial(s) {', '.join(map(str, orphans))} were interrupted: marked failed and "
              "queued again", flush=True)
    done = finished(study)
    remaining = args.trials - done
    print(f"[sweep {name}] storage {_redact(storage_url)}; {done} finished trial(s), "
          f"{max(remaining, 0)} to run", flush=True)
    if args.worker_trials is not None:
        remaining = min(remaining, args.worker_trials)
    if remaining > 0 and args.jobs > 1:
        failures = run_workers(args, name, storage_url, str(root), fit_extra, remaining)
        best = report_best(study)
        if failures:
            print(f"[sweep {name}] " + "; ".join(failures), file=sys.stderr)
            raise SystemExit(1)
        return best
    if remaining > 0:
        objective = make_objective(config_path, space, name, str(root), fit_extra, args.prune)
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        first_new = len(study.get_trials(deepcopy=False))
        try:
            # MaxTrialsCallback stops this worker once the *study* has enough, whoever ran them
            study.optimize(objective, n_trials=remaining,
                           callbacks=[optuna.study.MaxTrialsCallback(args.trials, states=states)])
        except KeyboardInterrupt:
            # Optuna has marked the interrupted trial failed; queue its parameters for the next run.
            for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
                if trial.user_attrs.get(ATTR_WORKER) == worker_id() and trial.number >= first_new:
                    retry(study, trial)
            print(f"\n[sweep {name}] interrupted; run the same command again to resume.", file=sys.stderr)
            report_best(study)
            raise SystemExit(130) from None
    return report_best(study)


def worker_shares(remaining: int, jobs: int) -> list[int]:
    """How many of the remaining trials each worker runs: as even as can be, no worker without one."""
    workers = min(jobs, remaining)
    return [remaining // workers + (k < remaining % workers) for k in range(workers)]


def run_workers(args: argparse.Namespace, name: str, storage_url: str, root: str, fit_extra: list[str],
                remaining: int) -> list[str]:
    """Runs the remaining trials in ``--jobs`` worker subprocesses on the same study; returns their failures."""
    import signal
    import subprocess

    from distill.run import child_environment

    log_dir = Path(root) / "sweeps" / name
    log_dir.mkdir(parents=True, exist_ok=True)
    workers: list[tuple[subprocess.Popen, Path]] = []
    try:
        for k, share in enumerate(worker_shares(remaining, args.jobs)):
            command = [sys.executable, "-m", "distill.tools.main", "sweep", "--config", args.config, "--space", args.space,
                       "--trials", str(args.trials), "--study", name, "--storage", storage_url, "--root", root,
                       "--direction", args.direction, "--grace-period", str(args.grace_period),
                       "--worker-trials", str(share)]
            if args.seed is not None:
                command += ["--seed", str(args.seed + k)]
            if args.prune:
                command.append("--prune")
            command += ["--", *fit_extra]
            log = log_dir / f"worker{k}.log"
            with log.open("w") as handle:  # the child keeps its own copy of the handle
                workers.append((subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT,
                                                 env=child_environment()), log))
            print(f"[sweep {name}] worker {k}: {share} trial(s), log {log}", flush=True)
        codes = [process.wait() for process, _ in workers]
    finally:  # interrupted (Ctrl-C) or failed here: no worker goes on unattended
        for process, _ in workers:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)  # a worker interrupted so queues its trial again
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
    return [f"worker {k} exited with code {code}, log {log}"
            for k, (code, (_, log)) in enumerate(zip(codes, workers)) if code != 0]


def _redact(url: str) -> str:
    """The storage URL without its password, for printing."""
    head, sep, tail = url.partition("://")
    if sep and "@" in tail:
        credentials, _, host = tail.rpartition("@")
        user = credentials.split(":", 1)[0]
        return f"{head}://{user}:***@{host}" if ":" in credentials else url
    return url


if __name__ == "__main__":
    main()
