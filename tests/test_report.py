"""`distill report` on real (tiny) runs: table rows and numbers, seed grouping, plots, errors."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from distill.tools import report
from distill.data import DistillDataModule
from distill.errors import DistillError
from distill.methods import BaselineKD, Supervised
from distill.run import finish_fit, run_loggers

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_fit(root: Path, name: str, method: type, seed: int, augment: str = "none", **kwargs) -> dict:
    """One real run through the classes the CLI builds: 2 epochs of 4 batches on mnist5k."""
    L.seed_everything(seed)
    data = DistillDataModule(dataset="mnist5k", batch_size=64, augment=augment)
    model = method(num_classes=10, in_channels=1, image_size=28, **kwargs)
    trainer = L.Trainer(max_epochs=2, limit_train_batches=4, limit_val_batches=2, accelerator="cpu", devices=1,
                        logger=run_loggers(root, f"mnist5k/{name}"), enable_progress_bar=False,
                        enable_model_summary=False)
    started = time.time()
    trainer.fit(model, datamodule=data)
    # a config shaped like the CLI's, so that grouping sees the seed where `distill fit` records it
    config = {"seed_everything": seed, "model": dict(model.hparams), "data": dict(data.hparams),
              "trainer": {"max_epochs": 2, "limit_train_batches": 4, "default_root_dir": str(root)}}
    return finish_fit(trainer, model, data, config=config, seed=seed, started=started)


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    """A teacher, two seeds of a from-scratch student and one KD student."""
    root = tmp_path_factory.mktemp("report") / "runs"
    teacher = tiny_fit(root, "teacher", Supervised, 0, augment="jitter", student="mlp_1200_1200")
    tiny_fit(root, "scratch", Supervised, 0, student="mlp_800_800")
    tiny_fit(root, "scratch", Supervised, 1, student="mlp_800_800")
    tiny_fit(root, "kd", BaselineKD, 0, student="mlp_800_800", teacher=teacher["model_file"])
    return root


def results_of(root: Path, name: str) -> list[dict]:
    return [json.loads((d / "results.json").read_text())
            for d in sorted((root / "mnist5k" / name).glob("version_*"))]


def table_rows(table: str) -> list[dict[str, str]]:
    lines = [line for line in table.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert set(lines[1].replace("|", "").replace("-", "").replace(":", "")) <= {""}
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


def pct(value: float) -> str:
    return f"{100 * value:.2f}"


def test_report_table_plots_and_markdown(runs_root, tmp_path, capsys):
    out = tmp_path / "out"
    report.main([str(runs_root), "--out", str(out)])
    printed = capsys.readouterr().out
    markdown = (out / "report.md").read_text()
    rows = {(r["method"], r["student"]): r for r in table_rows(printed)}
    assert table_rows(markdown) == list(rows.values())  # the printed table is the report's
    assert len(rows) == 3  # teacher, scratch (two seeds, one row), KD

    (teacher,) = results_of(runs_root, "teacher")
    row = rows["Supervised", "mlp_1200_1200"]
    assert (row["n"], row["seeds"], row["teacher"], row["agreement (%)"]) == ("1", "0", "–", "–")
    assert row["val acc (%)"] == pct(teacher["best_val_acc"]) and row["test acc (%)"] == pct(teacher["test_acc"])
    assert row["epochs"] == "2" and row["runs"] == "teacher/version_0"
    assert row["wall time (s)"] == f"{teacher['wall_time_s']:.1f}"
    assert row["images/s"] == f"{teacher['train_images_per_s']:.0f}"

    (kd,) = results_of(runs_root, "kd")
    row = rows["BaselineKD", "mlp_800_800"]
    assert row["teacher"] == "mlp_1200_1200" and row["n"] == "1"
    assert row["test acc (%)"] == pct(kd["test_acc"])
    assert row["agreement (%)"] == pct(kd["test"]["test/agreement"])

    # two seeds of one config: one row, mean ± sample std, computed here independently
    scratch = results_of(runs_root, "scratch")
    assert [r["seed"] for r in scratch] == [0, 1]
    assert scratch[0]["test_acc"] != scratch[1]["test_acc"]  # the seeds really differ
    row = rows["Supervised", "mlp_800_800"]
    assert (row["n"], row["seeds"]) == ("2", "0, 1")
    for column, key in (("test acc (%)", "test_acc"), ("val acc (%)", "best_val_acc")):
        values = [100 * r[key] for r in scratch]
        assert row[column] == f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
    assert row["runs"] == "scratch/version_0, scratch/version_1"

    for name in ("val_acc.png", "val_agreement.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        assert f"]({name})" in markdown


def test_load_runs_run_dir_latest_link_and_dedup(runs_root):
    kd_dir = runs_root / "mnist5k" / "kd" / "version_0"
    runs = report.load_runs([kd_dir, runs_root / "mnist5k" / "kd", runs_root / "mnist5k" / "kd" / "latest"])
    assert len(runs) == 1 and runs[0]["dir"] == str(kd_dir) and runs[0]["method"] == "BaselineKD"
    assert len(report.load_runs(runs_root)) == 4


def test_curves_follow_metrics_csv(runs_root, tmp_path):
    (kd,) = report.load_runs(runs_root / "mnist5k" / "kd")
    curve = report.read_metric(kd, "val/acc")
    assert [epoch for epoch, _ in curve] == [1, 2]
    assert max(value for _, value in curve) == pytest.approx(kd["best_val_acc"])
    teacher = report.load_runs(runs_root / "mnist5k" / "teacher")
    assert report.plot_curves(teacher, tmp_path / "agreement.png", "val/agreement") is None  # no teacher
    assert not (tmp_path / "agreement.png").exists()


def test_per_class_accuracy_matches_test_acc(runs_root, tmp_path):
    runs = report.load_runs(runs_root / "mnist5k")
    named = {run["method"] + " " + run["student"] + f" {run['seed']}": run for run in runs}
    datamodule = DistillDataModule(dataset="mnist5k", batch_size=250)
    accuracies = report.per_class_accuracy(named, datamodule)
    labels = torch.cat([batch[1] for batch in datamodule.test_dataloader()])
    counts = torch.bincount(labels, minlength=10).tolist()
    for label, run in named.items():
        per_class = accuracies[label]
        assert per_class.shape == (10,) and ((0 <= per_class) & (per_class <= 1)).all()
        # model.safetensors is the best-validation network: its class-weighted mean is test_acc
        weighted = sum(a * n for a, n in zip(per_class, counts)) / sum(counts)
        assert weighted == pytest.approx(run["test_acc"], abs=1e-6)
    table = report.per_class_table(accuracies, datamodule.class_names)
    assert len(table.splitlines()) == 2 + 10
    png = report.plot_per_class(accuracies, tmp_path / "per_class.png", datamodule.class_names)
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_grouping_ignores_only_seed_and_bookkeeping():
    base = {"method": "BaselineKD", "student": "s", "teacher": {"model": "t"}, "seed": 0,
            "config": {"seed_everything": 0, "trainer": {"max_epochs": 2, "default_root_dir": "a"},
                       "model": {"init_args": {"temperature": 4.0}}}}
    other_seed = json.loads(json.dumps(base))
    other_seed["seed"] = other_seed["config"]["seed_everything"] = 1
    other_seed["config"]["trainer"]["default_root_dir"] = "b"
    other_temperature = json.loads(json.dumps(base))
    other_temperature["config"]["model"]["init_args"]["temperature"] = 8.0
    groups = report.group_runs([base, other_seed, other_temperature])
    assert [len(g) for g in groups] == [2, 1]
    assert report.format_stat([0.5]) == "0.50" and report.format_stat([None]) == "–"
    assert report.format_stat([0.1, 0.3], 100) == f"20.00 ± {statistics.stdev([10.0, 30.0]):.2f}"


def test_errors_are_one_line(tmp_path):
    (tmp_path / "empty" / "version_0").mkdir(parents=True)
    with pytest.raises(DistillError, match="no finished run in .*empty"):
        report.main([str(tmp_path / "empty")])
    with pytest.raises(DistillError, match="does not exist"):
        report.load_runs(tmp_path / "missing")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{not json")
    with pytest.raises(DistillError, match="cannot read"):
        report.load_runs(tmp_path / "broken")


def test_console_script_error(tmp_path, monkeypatch, capsys):
    """`distill report EMPTY` through the console script's entry point (in-process: no 10 s of imports)."""
    from distill.tools.main import entry_point

    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(sys, "argv", ["distill", "report", str(tmp_path / "empty")])
    with pytest.raises(SystemExit) as exit_info:
        entry_point()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("distill: error: no finished run in")


def test_stage_table_one_row_per_stage_with_seed_statistics(tmp_path):
    def staged_run(seed: int, ta_acc: float, student_acc: float) -> dict:
        stages = [
            {"stage": "ta1", "model": "mlp_300_300", "epochs": 2, "best_val_acc": ta_acc + 0.01,
             "test_acc": ta_acc, "test": {"ta1/test/acc": ta_acc, "ta1/test/agreement": 0.9}},
            {"stage": "student", "model": "mlp_30_30", "epochs": 3, "best_val_acc": student_acc + 0.01,
             "test_acc": student_acc, "test": {"student/test/acc": student_acc, "student/test/agreement": 0.8}},
        ]
        return {"method": "TeacherAssistantKD", "student": "mlp_30_30", "teacher": {"model": "mlp_1200_1200"},
                "seed": seed, "test_acc": student_acc, "best_val_acc": student_acc + 0.01, "stages": stages,
                "dir": str(tmp_path / f"takd/version_{seed}"),
                "config": {"seed_everything": seed, "model": {"init_args": {"assistants": ["mlp_300_300"]}}}}

    plain = {"method": "Supervised", "student": "mlp_30_30", "seed": 0, "dir": str(tmp_path / "scratch/version_0"),
             "config": {"seed_everything": 0}}
    runs = [staged_run(0, 0.90, 0.80), staged_run(1, 0.94, 0.84), plain]
    rows = table_rows(report.stage_table(runs))
    assert [(r["stage"], r["network"], r["n"], r["epochs"]) for r in rows] == [
        ("ta1", "mlp_300_300", "2", "2"), ("student", "mlp_30_30", "2", "3")]
    assert rows[0]["test acc (%)"] == f"92.00 ± {statistics.stdev([90.0, 94.0]):.2f}"
    assert rows[1]["val acc (%)"] == f"83.00 ± {statistics.stdev([81.0, 85.0]):.2f}"
    assert rows[1]["agreement (%)"] == "80.00 ± 0.00"
    assert report.stage_table([plain]) == ""
    markdown = report.write_report(runs, tmp_path / "out", metrics=())[0].read_text()
    assert "## Stages" in markdown and "| TeacherAssistantKD | ta1 | mlp_300_300 |" in markdown


def test_a_results_file_in_a_folder_of_runs_hides_none_of_them(runs_root):
    """A stray results.json above real runs (once written by fast_dev_run into runs/) hides nothing below it."""
    (runs_root / "results.json").write_text((runs_root / "mnist5k" / "kd" / "version_0" / "results.json").read_text())
    assert len(report.load_runs(runs_root)) == 5  # the four runs and the stray file's folder


def test_a_run_has_one_colour_in_every_plot_even_where_other_runs_are_missing(runs_root):
    runs = sorted(report.load_runs(runs_root), key=lambda run: run["teacher"] is not None)
    assert runs[0]["method"] == "Supervised" and runs[-1]["method"] == "BaselineKD"  # first: runs without agreement
    colours = report.run_colours(runs)
    by_plot = {}
    for metric in ("val/acc", "val/agreement"):
        figure = report.curves_figure(runs, metric, colours)
        by_plot[metric] = {line.get_label(): line.get_color() for line in figure.axes[0].get_lines()}
    kd_label = next(report.run_label(r) for r in runs if r["method"] == "BaselineKD")
    assert set(by_plot["val/agreement"]) == {kd_label}
    assert by_plot["val/agreement"][kd_label] == by_plot["val/acc"][kd_label] == colours[report.config_key(
        next(r for r in runs if r["method"] == "BaselineKD"))]
    assert len(set(by_plot["val/acc"].values())) == 3  # teacher, scratch (both seeds), KD
    # the default, without a shared map, colours by the runs given: the same as the map of all of them
    assert {line.get_color() for line in report.curves_figure(runs, "val/acc").axes[0].get_lines()} == \
        set(by_plot["val/acc"].values())


def test_long_run_labels_wrap_and_the_legend_fits_in_the_saved_image(runs_root, tmp_path):
    runs = report.load_runs(runs_root)
    long = [{**run, "method": run["method"] + "WithAVeryLongExperimentName" * 4} for run in runs]
    figure = report.curves_figure(long, "val/acc")
    renderer = figure.canvas.get_renderer()
    figure.draw(renderer)
    (legend,) = figure.legends
    lines = [line for text in legend.get_texts() for line in text.get_text().splitlines()]
    assert len(lines) > len(runs) and max(map(len, lines)) <= report.LEGEND_LINE  # wrapped, not cut
    tight = figure.get_tightbbox(renderer)  # what _save writes (bbox_inches="tight"), in inches
    box = legend.get_window_extent(renderer).transformed(figure.dpi_scale_trans.inverted())
    assert tight.x0 <= box.x0 and box.x1 <= tight.x1 and tight.y0 <= box.y0
    assert box.width <= figure.get_figwidth()  # no wider than the plot
    png = report.plot_curves(long, tmp_path / "long.png", "val/acc")
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_a_seed_run_twice_counts_once_and_the_repeat_is_named(tmp_path):
    """The same command run again (or a copy of a run) is no second sample: n counts seeds, the statistics use the
    newest run of each seed, and the runs column names the repeats it left out."""
    def run(seed: int, test_acc: float, version: int) -> dict:
        return {"method": "BaselineKD", "student": "s", "teacher": {"model": "t"}, "seed": seed, "test_acc": test_acc,
                "best_val_acc": test_acc, "dir": str(tmp_path / f"kd/version_{version}"),
                "config": {"seed_everything": seed}}

    runs = [run(0, 0.90, 0), run(0, 0.90, 1), run(1, 0.94, 2), run(0, 0.92, 3)]
    (row,) = table_rows(report.summary_table(runs))
    assert row["n"] == "2" and row["seeds"] == "1, 0"
    assert row["test acc (%)"] == f"93.00 ± {statistics.stdev([94.0, 92.0]):.2f}"  # seed 0's newest run: 92
    assert row["runs"] == "version_2, version_3 (not counted, a seed counted already: version_0, version_1)"
    no_seed = [{**run(0, 0.90, 4), "seed": None}, {**run(0, 0.80, 5), "seed": None}]
    assert table_rows(report.summary_table(no_seed))[0]["n"] == "2"
