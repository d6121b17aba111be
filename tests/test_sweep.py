"""`distill sweep`: a tiny Optuna study on mnist5k, its resumption, pruning and its input checks."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

optuna = pytest.importorskip("optuna")

from conftest import REPO, fake_datamodule, tiny_trainer, write_teacher  # noqa: E402
from distill.tools import sweep  # noqa: E402
from distill.errors import ConfigError  # noqa: E402
from distill.methods import Supervised  # noqa: E402

KD = str(REPO / "configs" / "mnist5k" / "kd.yaml")
SPACE = str(REPO / "configs" / "sweeps" / "kd_temperature.yaml")
STUDY = "tiny"
FAST = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=5", "--trainer.limit_val_batches=2",
        "--trainer.limit_test_batches=2", "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.fixture
def kd_flags(tmp_path) -> list[str]:
    teacher = write_teacher(tmp_path / "teacher.safetensors", model="mlp_1200_1200", in_channels=1, image_size=28)
    return ["--", f"--model.init_args.teacher={teacher}", *FAST]


def run_sweep(trials: int, flags: list[str], *extra: str, space: str = SPACE):
    return sweep.main(["--config", KD, "--space", space, "--trials", str(trials), "--study", STUDY,
                       "--seed", "0", *extra, *flags])


def load_study():
    return optuna.load_study(study_name=STUDY, storage=f"sqlite:///{Path('runs/sweeps/tiny/study.db').resolve()}")


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_tiny_study_runs_resumes_and_reports_the_best_trial(kd_flags, capsys):
    best = run_sweep(2, kd_flags)
    out = capsys.readouterr().out
    assert "0 finished trial(s), 2 to run" in out and "Best trial" in out
    study = load_study()
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert [t.number for t in trials] == [0, 1]
    for trial in trials:
        # an ordinary run directory, the objective is its best validation accuracy
        run_dir = Path(trial.user_attrs["run_dir"])
        assert run_dir == Path(f"runs/sweeps/{STUDY}/trial_{trial.number}/version_0")
        results = json.loads(Path(trial.user_attrs["results_json"]).read_text())
        assert results["run_dir"] == str(run_dir) and trial.value == results["best_val_acc"]
        assert results["test_acc"] is not None and trial.user_attrs["test_acc"] == results["test_acc"]
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["model"]["init_args"]["temperature"] == pytest.approx(trial.params["model.init_args.temperature"])
        assert config["model"]["init_args"]["alpha"] == pytest.approx(trial.params["model.init_args.alpha"])
        assert 1.0 <= trial.params["model.init_args.temperature"] <= 20.0
    assert best["number"] == study.best_trial.number and best["best_val_acc"] == study.best_value
    assert best["run_dir"] == study.best_trial.user_attrs["run_dir"]
    assert f"run directory: {best['run_dir']}" in out

    # A sweep killed during trial 2: the trial stays RUNNING, owned by a process that no longer exists.
    study.enqueue_trial({"model.init_args.temperature": 3.0, "model.init_args.alpha": 0.6})
    crashed = study.ask()
    crashed.set_user_attr("worker", f"{socket.gethostname()}:{dead_pid()}")
    assert crashed.number == 2

    # Re-running with --trials 3 resumes: the crashed trial is failed and retried with its parameters,
    # and only that one trial runs (the 2 finished ones count).
    run_sweep(3, kd_flags)
    out = capsys.readouterr().out
    assert "trial(s) 2 were interrupted" in out and "2 finished trial(s), 1 to run" in out
    study = load_study()
    states = {t.number: t.state for t in study.trials}
    assert states == {0: optuna.trial.TrialState.COMPLETE, 1: optuna.trial.TrialState.COMPLETE,
                      2: optuna.trial.TrialState.FAIL, 3: optuna.trial.TrialState.COMPLETE}
    assert study.trials[3].params == {"model.init_args.temperature": 3.0, "model.init_args.alpha": 0.6}
    assert sorted(p.name for p in Path(f"runs/sweeps/{STUDY}").iterdir()) == \
        ["study.db", "trial_0", "trial_1", "trial_3"]

    # The trials are ordinary runs for `distill report`: one row per trial configuration.
    from distill.tools.report import load_runs, summary_table
    runs = load_runs(f"runs/sweeps/{STUDY}")
    assert sorted(Path(r["dir"]).parent.name for r in runs) == ["trial_0", "trial_1", "trial_3"]
    assert summary_table(runs).count("BaselineKD") == 3

    # Nothing left to do; a different space under the same study name is refused.
    run_sweep(3, kd_flags)
    assert "0 to run" in capsys.readouterr().out and len(load_study().trials) == 4
    other_space = Path("space.yaml")
    other_space.write_text("model.init_args.alpha: {type: float, low: 0.1, high: 0.2}\n")
    with pytest.raises(ConfigError, match="different space"):
        run_sweep(4, kd_flags, space=str(other_space))


def test_jobs_run_trials_at_once_and_end_at_the_trial_count(kd_flags, capsys):
    best = run_sweep(3, kd_flags, "--jobs", "2")
    out = capsys.readouterr().out
    assert "worker 0: 2 trial(s)" in out and "worker 1: 1 trial(s)" in out
    study = load_study()
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3  # not one more
    by_worker: dict[str, list] = {}
    for trial in study.trials:
        by_worker.setdefault(trial.user_attrs["worker"], []).append(trial)
    assert sorted(len(trials) for trials in by_worker.values()) == [1, 2]  # two processes, their shares
    (alone,), pair = sorted(by_worker.values(), key=len)
    assert any(alone.datetime_start < other.datetime_complete and other.datetime_start < alone.datetime_complete
               for other in pair), "the two workers' trials did not run at the same time"
    # seeded apart: the workers' first trials did not draw the same values
    assert alone.params != pair[0].params
    for trial in study.trials:
        assert Path(trial.user_attrs["run_dir"]) == Path(f"runs/sweeps/{STUDY}/trial_{trial.number}/version_0")
    assert best["number"] == study.best_trial.number and best["best_val_acc"] == study.best_value
    for k in (0, 1):
        assert "[sweep tiny] trial" in Path(f"runs/sweeps/{STUDY}/worker{k}.log").read_text()


def test_a_failing_worker_is_named_with_its_log_and_fails_the_command(kd_flags, capsys):
    broken = [*kd_flags, "--model.init_args.teacher=no/such/teacher.safetensors"]
    with pytest.raises(SystemExit) as exit_:
        run_sweep(2, broken, "--jobs", "2")
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    for k in (0, 1):
        log = Path(f"runs/sweeps/{STUDY}/worker{k}.log")
        assert f"worker {k} exited with code 2, log {log}" in err
        assert "no/such/teacher.safetensors" in log.read_text()


def test_worker_shares_split_the_remaining_trials_evenly():
    assert sweep.worker_shares(3, 2) == [2, 1]
    assert sweep.worker_shares(2, 4) == [1, 1]
    assert sweep.worker_shares(8, 4) == [2, 2, 2, 2]
    with pytest.raises(ConfigError, match="--jobs 0"):
        run_sweep(1, [], "--jobs", "0")


def test_pruning_callback_stops_the_run_and_reports_each_epoch(monkeypatch):
    class Trial:  # the two calls OptunaPruning makes on an optuna.Trial
        def __init__(self):
            self.reports = []

        def report(self, value, step):
            self.reports.append((step, value))

        def should_prune(self):
            return len(self.reports) >= 2

    trial = Trial()
    monkeypatch.setattr(sweep, "_ACTIVE_TRIAL", trial)
    pruning = sweep.OptunaPruning()
    trainer = tiny_trainer(Path("runs"), max_epochs=5, callbacks=[pruning], limit_train_batches=1)
    trainer.fit(Supervised(student="mlp_30_30", num_classes=10, in_channels=3, image_size=16),
                datamodule=fake_datamodule())
    assert [step for step, _ in trial.reports] == [0, 1] and pruning.pruned_at_epoch == 1
    assert trainer.current_epoch == 2  # stopped after the second epoch instead of five
    assert all(0.0 <= value <= 1.0 for _, value in trial.reports)


def test_pruned_sweep_adds_the_callback_to_each_trial(kd_flags):
    run_sweep(1, kd_flags, "--prune")
    trial = load_study().trials[0]
    config = yaml.safe_load((Path(trial.user_attrs["run_dir"]) / "config.yaml").read_text())
    assert any(c["class_path"] == "distill.tools.sweep.OptunaPruning" for c in config["trainer"]["callbacks"])
    assert len(trial.intermediate_values) == 1  # val/acc of its one epoch


BAD_SPACES = {
    "unknown type": ("a.b: {type: normal, low: 0, high: 1}", "expected {type"),
    "low above high": ("a.b: {type: float, low: 2, high: 1}", "must be below high"),
    "log of zero": ("a.b: {type: loguniform, low: 0, high: 1}", "low > 0"),
    "int with floats": ("a.b: {type: int, low: 0.5, high: 3}", "integers"),
    "empty choices": ("a.b: {type: categorical, choices: []}", "non-empty"),
    "unknown field": ("a.b: {type: float, low: 0, high: 1, scale: 2}", "unknown field(s) scale"),
    "not a mapping": ("- 1\n- 2", "must map config keys"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPACES))
def test_bad_space_is_a_one_line_error(case):
    text, expected = BAD_SPACES[case]
    Path("space.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        sweep.load_space("space.yaml")
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_unknown_config_key_stops_the_sweep(kd_flags, capsys):
    Path("space.yaml").write_text("model.init_args.temprature: {type: float, low: 1, high: 2}\n")
    with pytest.raises(ConfigError, match="refused by `distill fit`"):
        run_sweep(2, kd_flags, space="space.yaml")
    assert "temprature" in capsys.readouterr().err
    assert [t.state for t in load_study().trials] == [optuna.trial.TrialState.FAIL]  # not left RUNNING


def test_console_script_errors_and_example_spaces():
    distill = Path(sys.executable).with_name("distill")
    result = subprocess.run([str(distill), "sweep", "--config", "missing.yaml", "--space", SPACE, "--trials", "1"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip() == "distill: error: config file missing.yaml does not exist"
    for space in sorted((REPO / "configs" / "sweeps").glob("*.yaml")):
        assert sweep.load_space(space)
    ta = sweep.load_space(REPO / "configs" / "sweeps" / "ta_size_mnist5k.yaml")
    assert ta["model.init_args.student"]["type"] == "categorical"


def test_flags_and_redaction():
    assert sweep.flag("model.init_args.student", "mlp_30_30") == "--model.init_args.student=mlp_30_30"
    assert sweep.flag("a", None) == "--a=null" and sweep.flag("a", True) == "--a=true"
    assert sweep._redact("postgresql://me:secret@db/optuna") == "postgresql://me:***@db/optuna"
    assert sweep._redact("sqlite:///runs/sweeps/x/study.db") == "sqlite:///runs/sweeps/x/study.db"


def test_ctrl_c_fails_the_trial_and_queues_it_again(kd_flags, monkeypatch, capsys):
    import distill.cli

    def interrupted(args=None):
        raise SystemExit(1)  # what Lightning turns Ctrl-C during fit into

    monkeypatch.setattr(distill.cli, "main", interrupted)
    with pytest.raises(SystemExit) as info:
        run_sweep(2, kd_flags)
    assert info.value.code == 130 and "run the same command again to resume" in capsys.readouterr().err
    trials = load_study().trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING]
    assert trials[1].params == trials[0].params  # the next run starts with the interrupted parameters
