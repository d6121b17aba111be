"""`distill repro`: an experiment file runs each (config, seed) once, resumes, and writes its page."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch
import yaml

from distill.tools import repro
from distill.tools.class_bias import choose_bias, shifted_predictions
from distill.errors import ConfigError
from distill.run import cpu_model, data_arguments

CONFIG = """
trainer: {max_epochs: 2, limit_train_batches: 2, limit_val_batches: 1, limit_test_batches: 1}
data: {dataset: fake, num_classes: 4, in_channels: 3, image_size: 16, fake_sizes: [64, 32, 32], batch_size: 16}
model:
  class_path: distill.methods.%s
  init_args: {student: %s}
"""


@pytest.fixture
def experiment(tmp_path) -> Path:
    Path("configs").mkdir()
    Path("configs/teacher.yaml").write_text(CONFIG % ("Supervised", "resnet8"))
    Path("configs/kd.yaml").write_text(CONFIG % ("BaselineKD", "mlp_30_30"))
    spec = {
        "name": "tiny", "title": "A tiny experiment", "setup": "fake data, 2 epochs", "paper": "nothing",
        "runs": [
            {"name": "teacher", "config": "configs/teacher.yaml", "seeds": [0]},
            {"name": "kd_t1", "config": "configs/kd.yaml", "seeds": [0, 1],
             "set": {"model.init_args.teacher": "{model:teacher}", "model.init_args.temperature": 1}},
            {"name": "kd_t4_no0", "config": "configs/kd.yaml", "seeds": [0],
             "set": {"model.init_args.teacher": "{model:teacher}", "model.init_args.temperature": 4,
                     "data.exclude_classes": [0]}},
        ],
        "analyses": [
            {"kind": "sweep", "title": "accuracy against temperature", "x_label": "τ",
             "runs": ["kd_t1", "kd_t4_no0"], "x": [1, 4]},
            {"kind": "class_bias", "runs": ["kd_t4_no0"], "class_index": 0, "grid": [0.0, 1.0, 2.0]},
            {"kind": "sweep", "title": "two series", "x_label": "τ", "runs": ["kd_t1", "kd_t4_no0"], "x": [1, 4],
             "series": {"all classes": ["kd_t1"], "without 0": ["kd_t4_no0"]}},
        ],
        "claims": [{"claim": "a lower temperature helps", "paper": "1 → 2", "paper_gap": 1.0,
                    "baseline": "kd_t4_no0", "method": "kd_t1"}],
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_experiment_runs_resumes_and_writes_its_page(experiment, capsys):
    page = repro.main([str(experiment)])
    text = page.read_text()
    runs = repro.finished_runs(Path("runs/repro"), "tiny", "kd_t1")
    assert sorted(runs) == [0, 1]
    teacher = repro.finished_runs(Path("runs/repro"), "tiny", "teacher")[0]
    assert all(run["teacher"]["path"] == teacher["model_file"] for run in runs.values())
    assert runs[0]["config"]["model"]["init_args"]["temperature"] == 1
    no0 = repro.finished_runs(Path("runs/repro"), "tiny", "kd_t4_no0")[0]
    assert data_arguments(no0["config"])["exclude_classes"] == [0]
    assert "# A tiny experiment" in text and "## What the paper reports" in text
    assert "| BaselineKD | resnet8 | mlp_30_30 | 2 | 0, 1 |" in text
    assert "### accuracy against temperature" in text and "test errors, corrected" in text
    assert (page.parent / "tiny" / "accuracy_against_temperature.png").is_file()
    assert "| series | τ | run |" in text and "| all classes | 1 | kd_t1 | 2 |" in text
    assert "| without 0 | 4 | kd_t4_no0 | 1 |" in text and (page.parent / "tiny" / "two_series.png").is_file()
    assert "Incomplete" not in text
    t1 = [100 * run["test_acc"] for run in runs.values()]
    assert "## Claims" in text and f"kd_t1: {statistics.fmean(t1):.2f} ± {statistics.stdev(t1):.2f} (n 2)" in text
    # one after another: no line about runs at once; each run says when it ran and what it trained on
    assert "runs at once" not in text
    assert runs[0]["train_images"] == 2 * 2 * 16  # max_epochs × limit_train_batches × batch_size
    assert runs[0]["started_at"] < runs[0]["finished_at"] <= runs[1]["started_at"]
    assert runs[0]["machine"]["cpu"] == cpu_model() and runs[0]["machine"]["accelerator"] is None
    assert f"Runs trained on: {cpu_model()} (4 runs)." in text  # teacher, kd_t1 × 2, kd_t4_no0
    # a second call finds every (config, seed) finished and runs nothing
    capsys.readouterr()
    repro.main([str(experiment)])
    assert "[repro] kd_t1" not in capsys.readouterr().out
    assert len(list(Path("runs/repro/tiny/kd_t1").glob("version_*"))) == 2


def test_a_page_names_the_processors_its_runs_trained_on():
    runs = [{"machine": {"cpu": "AMD EPYC", "accelerator": None}}] * 2 + [
        {"machine": {"cpu": "AMD EPYC", "accelerator": "NVIDIA H200"}}, {"seed": 0}]
    assert repro.run_processors(runs) == ("Runs trained on: AMD EPYC (2 runs); NVIDIA H200 (1 run); "
                                          "1 from before runs recorded it.")
    assert repro.run_processors([{"seed": 0}]) == "The runs do not record their processor."


def test_report_only_marks_missing_runs(experiment):
    repro.main([str(experiment), "--only", "teacher"])
    text = Path("results/tiny.md").read_text()
    assert "**Incomplete**: not yet run: kd_t1 seed 0, kd_t1 seed 1, kd_t4_no0 seed 0." in text


@pytest.mark.parametrize("change, message", [
    (lambda s: s["runs"].append(dict(s["runs"][0])), "two runs are named"),
    (lambda s: s["runs"][0].update(config="configs/missing.yaml"), "does not exist"),
    (lambda s: s["runs"][1]["set"].update({"model.init_args.teacher": "{model:nobody}"}), "no earlier run"),
    (lambda s: s["analyses"][0].update(x=[1]), "one `x` value per run"),
    (lambda s: s["analyses"][1].update(kind="magic"), "analysis kind"),
    (lambda s: s["analyses"][2]["series"].update(extra=["teacher"]), "series runs teacher"),
    (lambda s: s["runs"][0].update(sed=[1]), "unknown: sed"),
    (lambda s: s["claims"][0].update(method="kd_t9"), "no run is named 'kd_t9'"),
])
def test_bad_experiment_files_fail_before_any_run(experiment, change, message):
    spec = yaml.safe_load(experiment.read_text())
    change(spec)
    experiment.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=message):
        repro.main([str(experiment)])
    assert not Path("runs").exists()


def test_overlays_and_the_experiments_own_set_reach_every_run(experiment):
    """`overlays` are read after each run's config; the experiment's `set` applies to every run and a run's own
    `set` wins over it."""
    Path("configs/overlay.yaml").write_text("trainer: {max_epochs: 1}\ndata: {batch_size: 8}\n")
    spec = yaml.safe_load(experiment.read_text())
    spec.update(overlays=["configs/overlay.yaml"], set={"data.batch_size": 32, "model.init_args.student_kwargs": {}})
    spec["runs"][1]["set"]["data.batch_size"] = 4
    experiment.write_text(yaml.safe_dump(spec))
    repro.main([str(experiment), "--only", "teacher", "kd_t1"])
    teacher = repro.finished_runs(Path("runs/repro"), "tiny", "teacher")[0]["config"]
    kd = repro.finished_runs(Path("runs/repro"), "tiny", "kd_t1")[0]["config"]
    assert teacher["trainer"]["max_epochs"] == 1 and kd["trainer"]["max_epochs"] == 1  # the overlay's
    assert data_arguments(teacher)["batch_size"] == 32 and data_arguments(kd)["batch_size"] == 4  # experiment's, run's
    spec["set"] = {"model.init_args.teacher": "{model:teacher}"}
    experiment.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="plain values"):
        repro.load_spec(experiment)


def test_bias_choice_fixes_a_suppressed_class():
    torch.manual_seed(0)
    labels = torch.arange(4).repeat(25)
    logits = torch.nn.functional.one_hot(labels, 4).float() * 3 + torch.randn(100, 4) * 0.3
    logits[:, 2] -= 4.0  # class 2 never wins before the correction
    assert (shifted_predictions(logits, 2, 0.0) == 2).sum() == 0
    bias = choose_bias(logits, labels, 2, [0.0, 2.0, 4.0, 6.0, 20.0])
    assert bias in (4.0, 6.0)
    assert (shifted_predictions(logits, 2, bias) == labels).float().mean() > 0.95
    assert choose_bias(logits, labels, 2, [20.0]) == 20.0


def test_every_shipped_experiment_file_is_valid(monkeypatch):
    from conftest import REPO

    monkeypatch.chdir(REPO)  # experiment files name configs relative to the repository root
    files = sorted((REPO / "experiments").rglob("*.yaml"))
    assert files and any(path.parent.name == "gpu" for path in files)
    for path in files:
        spec = repro.load_spec(path)
        assert spec["name"] == path.stem and spec.get("setup") and spec.get("paper")


def test_a_run_of_another_experiment_teaches(experiment, tmp_path):
    """``{model:tiny/teacher}`` reuses another experiment's finished teacher; before it exists, one clear error."""
    other = {"name": "other", "title": "Another experiment", "runs": [
        {"name": "kd", "config": "configs/kd.yaml", "seeds": [0],
         "set": {"model.init_args.teacher": "{model:tiny/teacher}"}}]}
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(other))
    with pytest.raises(ConfigError, match="run 'teacher' of experiment 'tiny'.*--only teacher"):
        repro.main([str(path)])
    assert not Path("runs/repro/other").exists()
    repro.main([str(experiment), "--only", "teacher"])
    repro.main([str(path)])
    teacher = repro.finished_runs(Path("runs/repro"), "tiny", "teacher")[0]
    student = repro.finished_runs(Path("runs/repro"), "other", "kd")[0]
    assert student["teacher"]["path"] == teacher["model_file"]


def _small_experiment(experiment: Path, runs: list[dict]) -> Path:
    """The fixture's experiment with other runs and no analyses or claims: a few subprocesses keep the tests short."""
    spec = yaml.safe_load(experiment.read_text())
    spec.update(runs=runs, analyses=[], claims=[])
    experiment.write_text(yaml.safe_dump(spec))
    return experiment


TEACHER = {"name": "teacher", "config": "configs/teacher.yaml", "seeds": [0]}
STUDENT = {"name": "kd_t1", "config": "configs/kd.yaml", "seeds": [0, 1],
           "set": {"model.init_args.teacher": "{model:teacher}", "model.init_args.temperature": 1}}


def _printed(lines: list[str], event: str) -> int:
    """The index of the driver's line that starts with ``event``, e.g. ``teacher seed 0: finished``."""
    return next(i for i, line in enumerate(lines) if line.startswith(f"[repro] {event}"))


def test_jobs_run_at_once_after_their_teacher_and_match_one_after_another(experiment, capsys):
    # fits of about 4 s each, far longer than the gap between the two processes' start-ups: the fit spans overlap,
    # so the page must say what running them at once bought (with 2-epoch fits of ~1 s they need not overlap)
    long_fits = {**STUDENT, "set": {**STUDENT["set"], "trainer.max_epochs": 100}}
    path = _small_experiment(experiment, [TEACHER, long_fits])
    repro.main([str(path), "--runs-root", "one"])
    capsys.readouterr()
    repro.main([str(path), "--runs-root", "two", "--jobs", "2"])
    lines = capsys.readouterr().out.splitlines()
    for name, seeds in (("teacher", [0]), ("kd_t1", [0, 1])):
        one, two = (repro.finished_runs(Path(root), "tiny", name) for root in ("one", "two"))
        assert sorted(one) == sorted(two) == seeds
        for seed in seeds:  # seeded and single-threaded: the same numbers in a subprocess
            assert one[seed]["test_acc"] == two[seed]["test_acc"]
            assert one[seed]["best_val_acc"] == two[seed]["best_val_acc"]
    teacher = repro.finished_runs(Path("two"), "tiny", "teacher")[0]
    students = repro.finished_runs(Path("two"), "tiny", "kd_t1").values()
    assert all(run["teacher"]["path"] == teacher["model_file"] for run in students)
    assert _printed(lines, "teacher seed 0: finished") < _printed(lines, "kd_t1 seed 0: started")
    assert _printed(lines, "kd_t1 seed 1: started") < _printed(lines, "kd_t1 seed 0: finished")  # both at once
    assert Path("two/tiny/kd_t1/seed1.log").read_text().startswith("distill fit --config configs/kd.yaml")
    assert "Up to 2 runs at once" in Path("results/tiny.md").read_text()


def test_the_page_says_what_runs_at_once_bought():
    def run(start, end, images=100):
        return {"started_at": start, "finished_at": end, "train_images": images}

    # 0-10 and 5-15 overlap, 20-30 alone: 25 s elapsed for 30 s of summed wall time, 300 images
    line = repro.concurrency([run(20, 30), run(0, 10), run(5, 15)])
    assert line == ("Up to 2 runs at once: 300 training images in 0.4 min of elapsed time, 12 images/s in all, "
                    "1.20× the 10 images/s of the same runs' summed wall time (3 runs with timestamps).")
    assert repro.concurrency([run(0, 10), run(10, 20)]) is None  # one after another, touching
    assert repro.concurrency([run(0, 10), {"wall_time_s": 10.0}]) is None  # runs from before the timestamps


def test_a_failed_job_skips_its_dependents_only(experiment, capsys):
    bad_teacher = {**TEACHER, "set": {"trainer.max_epochs": "many"}}  # distill fit rejects it: exit code 2
    solo = {"name": "solo", "config": "configs/teacher.yaml", "seeds": [1]}
    path = _small_experiment(experiment, [bad_teacher, {**STUDENT, "seeds": [0]}, solo])
    with pytest.raises(SystemExit, match="teacher seed 0 .exit code 2: distill: error: .*max_epochs.*; "
                                         "log .*teacher/seed0.log") as stopped:
        repro.main([str(path), "--jobs", "2"])
    assert stopped.value.code != 0
    out = capsys.readouterr().out
    assert "[repro] teacher seed 0: FAILED with exit code 2" in out and "teacher/seed0.log" in out
    assert "[repro] kd_t1: skipped: needs teacher" in out and "kd_t1 seed 0: started" not in out
    assert sorted(repro.finished_runs(Path("runs/repro"), "tiny", "solo")) == [1]
    assert "max_epochs" in Path("runs/repro/tiny/teacher/seed0.log").read_text()
    assert "**Incomplete**: not yet run: teacher seed 0, kd_t1 seed 0." in Path("results/tiny.md").read_text()


def test_an_experiment_whose_every_run_failed_says_why_rather_than_that_it_has_no_run(experiment):
    bad_teacher = {**TEACHER, "set": {"trainer.max_epochs": "many"}}
    path = _small_experiment(experiment, [bad_teacher])
    with pytest.raises(SystemExit, match=r"^\[repro\] no run finished; 1 failed: teacher seed 0 .exit code 2: "
                                         "distill: error: .*max_epochs"):
        repro.main([str(path), "--jobs", "2"])


def test_jobs_below_one_is_one_error_before_any_run(experiment):
    with pytest.raises(ConfigError, match="--jobs 0"):
        repro.main([str(experiment), "--jobs", "0"])
    assert not Path("runs").exists()
