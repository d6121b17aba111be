"""``distill report``: a Markdown table and plots of finished runs, and the helpers notebooks use.

    distill report runs/mnist5k                     # every finished run below runs/mnist5k
    distill report runs/mnist5k/kd/version_0 runs/mnist5k/scratch --out reports/mnist5k
    distill report runs --metrics val/acc val/kl train/loss_epoch

A run is a directory with the ``results.json`` that :func:`distill.run.finish_fit` writes at the end
of ``distill fit``; its ``metrics.csv`` (Lightning's CSV log) gives the learning curves and its
``model.safetensors`` (the best-validation network) the per-class accuracies. Everything here only
reads run directories: a report never changes a run.

Python API (what ``main`` and the notebooks use):

* :func:`load_runs` — run dicts from run directories or from folders searched for ``results.json``;
* :func:`summary_table` — the Markdown table, repeats of one config over seeds folded into mean ± std;
* :func:`stage_table` — one row per stage of staged runs (TeacherAssistantKD's path);
* :func:`plot_curves` — a logged metric against epoch, one line per run, as a PNG;
* :func:`per_class_accuracy`, :func:`per_class_table`, :func:`plot_per_class` — test accuracy per class
  of each run's exported network.

Plots are drawn on a bare :class:`matplotlib.figure.Figure` with the Agg canvas rather than through
``pyplot``: that needs no display, opens no windows and leaves the backend of a notebook (inline
plots) or of any other caller untouched.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import statistics
import sys
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from distill.errors import ConfigError, DistillError
from distill.run import EXPORT_FILE, RESULTS_FILE

#: Curves ``distill report`` plots unless ``--metrics`` says otherwise (a metric no run logged is skipped).
DEFAULT_METRICS = ("val/acc", "val/agreement")
METRICS_FILE = "metrics.csv"

#: Config entries that do not change what a run computes, beyond the seed. Runs whose configs differ
#: only here (and in the seed) are repeats of one experiment and share a table row.
BOOKKEEPING_KEYS = (
    ("seed_everything",),
    ("seed",),
    ("run_name",),
    ("ckpt_path",),
    ("trainer", "default_root_dir"),
    ("trainer", "logger"),
    ("trainer", "enable_progress_bar"),
    ("trainer", "enable_model_summary"),
)

DASH = "–"


# --------------------------------------------------------------------------------------- loading
def _natural_key(path: Path) -> list[Any]:
    # version_10 after version_9, not after version_1
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def _find_run_dirs(root: Path) -> list[Path]:
    """Directories holding ``results.json`` at or below ``root``, at any depth (a stray ``results.json`` in
    a folder of runs hides none of them); ``latest`` symlinks are not followed (they point at a version that
    the walk finds anyway)."""
    found = []
    for directory, _, files in os.walk(root, followlinks=False):
        if RESULTS_FILE in files:
            found.append(Path(directory))
    return sorted(found, key=_natural_key)


def _read_results(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RESULTS_FILE
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DistillError(f"cannot read {path}: {err}; is the run still being written?") from None
    if not isinstance(results, dict):
        raise DistillError(f"{path} is not a results file of `distill fit` (expected a JSON object).")
    return results


def load_runs(paths: str | Path | Iterable[str | Path]) -> list[dict[str, Any]]:
    """Reads the ``results.json`` of finished runs.

    Each path is either a run directory (it holds ``results.json``) or a folder searched recursively
    for run directories, e.g. ``runs/`` or ``runs/mnist5k/kd``. Runs still in progress (no
    ``results.json`` yet) are skipped silently in a search, but a path that yields no run at all is a
    one-line :class:`~distill.errors.DistillError`, as is a path that does not exist. A run reached
    twice (say through ``latest`` and through its ``version_N``) is loaded once.

    Returns the results dicts, in the order of ``paths`` and naturally sorted inside each folder,
    each with one added key ``"dir"``: the directory it was read from. The ``run_dir`` recorded in the
    file is relative to wherever the run was started, so ``dir`` is what to read its files from.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    runs: list[dict[str, Any]] = []
    seen: set[Path] = set()
    for given in paths:
        path = Path(given).expanduser()
        if path.name == RESULTS_FILE and path.is_file():  # tab completion often ends there
            path = path.parent
        if not path.exists():
            raise ConfigError(f"{path} does not exist; give run directories (runs/<name>/version_N) "
                              "or a folder of runs.")
        run_dirs = _find_run_dirs(path) if path.is_dir() else []
        if not run_dirs:
            raise DistillError(
                f"no finished run in {path}: no {RESULTS_FILE} there or below it (a run writes it when "
                "`distill fit` ends); give run directories (runs/<name>/version_N) or a folder of runs."
            )
        for run_dir in run_dirs:
            resolved = run_dir.resolve()
            if resolved in seen:
                continue
            seen.add(resolved)
            runs.append({**_read_results(run_dir), "dir": str(run_dir)})
    return runs


def read_metric(run: Mapping[str, Any] | str | Path, metric: str) -> list[tuple[int, float]]:
    """``(epoch, value)`` pairs of one logged metric from a run's ``metrics.csv``, one per epoch.

    Epochs count from 1 (the value after the first epoch is at 1), unlike Lightning's 0-based
    ``epoch`` column. Where an epoch has several values (a metric logged per step, or validation
    more than once per epoch) the last one is kept: the state at the end of that epoch. A run
    without ``metrics.csv`` (another logger) or without the metric gives ``[]``.

    Staged methods (TeacherAssistantKD) log each stage under its own prefix (``ta1/val/acc``,
    ``student/val/acc``); for such a run the curve follows the whole path, each epoch taking the
    value of the stage that trained then.
    """
    run_dir = Path(run["dir"] if isinstance(run, Mapping) else run)
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    stages = (run.get("stages") or []) if isinstance(run, Mapping) else []
    columns = [metric] + [f"{stage['stage']}/{metric}" for stage in stages if stage.get("stage")]
    by_epoch: dict[int, float] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            value = next((row[c] for c in columns if row.get(c) not in (None, "")), None)
            epoch = row.get("epoch")
            if value in (None, "") or epoch in (None, ""):
                continue
            by_epoch[int(float(epoch)) + 1] = float(value)
    return sorted(by_epoch.items())


# --------------------------------------------------------------------------------------- the table
def teacher_name(run: Mapping[str, Any]) -> str | None:
    teacher = run.get("teacher")
    if isinstance(teacher, Mapping):
        return teacher.get("model") or (Path(teacher["path"]).name if teacher.get("path") else None)
    return None


def agreement(run: Mapping[str, Any]) -> float | None:
    """Teacher–student top-1 agreement of a run, ``None`` for runs without a teacher.

    The test-split agreement of the best-validation checkpoint comes first: it describes the same
    network as ``test_acc``. Runs whose ``results.json`` lacks it fall back to the last
    ``val/agreement`` in ``metrics.csv`` (the last epoch's network, on the validation split).
    """
    test = run.get("test") or {}
    if test.get("test/agreement") is not None:
        return float(test["test/agreement"])
    if run.get("teacher") is None:
        return None
    curve = read_metric(run, "val/agreement")
    return curve[-1][1] if curve else None


def _without(config: Any, keys: Sequence[tuple[str, ...]]) -> Any:
    if not isinstance(config, Mapping):
        return config
    config = json.loads(json.dumps(config, default=str))  # a deep copy with JSON-comparable values
    for key in keys:
        parent = config
        for part in key[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if isinstance(parent, dict):
            parent.pop(key[-1], None)
    return config


def config_key(run: Mapping[str, Any]) -> str:
    """What makes two runs the same experiment: method, networks and config, minus seed and bookkeeping.

    The seed (``seed_everything``) and the entries of :data:`BOOKKEEPING_KEYS` (where logs go,
    progress bars, the run name, a resume checkpoint) are left out; everything else in the recorded
    config must match, so a changed temperature, epoch count or batch limit makes a separate row.
    The teacher counts by its config entry (path and model), not its file hash: students of one
    config distilled from teachers retrained with other seeds are seed repeats too.
    """
    return json.dumps(
        {
            "method": run.get("method"),
            "student": run.get("student"),
            "teacher": teacher_name(run),
            "config": _without(run.get("config"), BOOKKEEPING_KEYS),
        },
        sort_keys=True,
        default=str,
    )


def group_runs(runs: Sequence[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """Runs grouped by :func:`config_key`, groups in order of their first run."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for run in runs:
        groups.setdefault(config_key(run), []).append(run)
    return list(groups.values())


def one_run_per_seed(group: Sequence[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """``(counted, repeats)``: the runs of one experiment with one run per seed, the newest (the last given; runs come
    in run-directory order), and the others. A second run of a seed (the same command again, a copy of a run) is no
    second sample: on one machine it gives the same numbers, and counting it would shrink the spread. Runs with no
    recorded seed all count."""
    newest = {run.get("seed") if run.get("seed") is not None else ("no seed", index): id(run)
              for index, run in enumerate(group)}
    kept = set(newest.values())
    return [run for run in group if id(run) in kept], [run for run in group if id(run) not in kept]


def _runs_cell(names: Mapping[int, str], counted: Sequence[Mapping[str, Any]],
               repeats: Sequence[Mapping[str, Any]]) -> str:
    cell = ", ".join(names[id(run)] for run in counted)
    if repeats:
        cell += f" (not counted, a seed counted already: {', '.join(names[id(run)] for run in repeats)})"
    return cell


def mean_std(values: Sequence[float | None]) -> tuple[float, float | None, int] | None:
    """Mean, sample standard deviation (n − 1; ``None`` for one value) and count of the known values."""
    known = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not known:
        return None
    return statistics.fmean(known), (statistics.stdev(known) if len(known) > 1 else None), len(known)


def format_stat(values: Sequence[float | None], scale: float = 1.0, digits: int = 2) -> str:
    """``mean ± std`` of the known values times ``scale`` (``mean`` alone for one value, ``–`` for none)."""
    stat = mean_std(values)
    if stat is None:
        return DASH
    mean, std, _ = stat
    text = f"{mean * scale:.{digits}f}"
    return text if std is None else f"{text} ± {std * scale:.{digits}f}"


def _run_names(runs: Sequence[Mapping[str, Any]]) -> dict[int, str]:
    """Run directories relative to their common folder: short and still unambiguous."""
    dirs = [Path(run["dir"]).resolve() if "dir" in run else Path(str(run.get("run_dir"))) for run in runs]
    try:
        common = Path(os.path.commonpath([str(d) for d in dirs])) if dirs else Path()
    except ValueError:  # relative and absolute paths mixed
        common = Path()
    if len(dirs) == 1:
        common = dirs[0].parent.parent  # keep <run_name>/version_N of a lone run
    names = {}
    for run, directory in zip(runs, dirs):
        try:
            names[id(run)] = str(directory.relative_to(common)) or directory.name
        except ValueError:
            names[id(run)] = str(directory)
    return names


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]], all_text: bool = False) -> str:
    """A Markdown table; the first three columns and the last (run names) left-aligned, numbers right, or every
    column left-aligned with ``all_text``. A "|" inside a cell is escaped."""
    align = ["---" if all_text or i < 3 or i == len(columns) - 1 else "---:" for i in range(len(columns))]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


TABLE_COLUMNS = ("method", "teacher", "student", "n", "seeds", "val acc (%)", "test acc (%)",
                 "agreement (%)", "epochs", "wall time (s)", "images/s", "runs")


def summary_table(runs: Sequence[Mapping[str, Any]]) -> str:
    """One Markdown table row per experiment; repeats over seeds give ``mean ± std`` with their ``n``.

    Columns: method, teacher network, student network, n, seeds, best validation accuracy, test
    accuracy of the best-validation checkpoint, teacher–student agreement (see :func:`agreement`),
    epochs trained, wall time of the whole fit (test included), training images per second, and
    the run directories. Accuracies are shown in percent with two decimals; ``std`` is the sample
    standard deviation (n − 1), the usual choice for a handful of seeds. Runs are grouped by
    :func:`config_key`, with one run per seed (:func:`one_run_per_seed`; the others are named, not counted).
    """
    names = _run_names(runs)
    rows = []
    for group in group_runs(runs):
        group, repeats = one_run_per_seed(group)
        first = group[0]
        seeds = [run.get("seed") for run in group]
        cells = [
            str(first.get("method") or DASH),
            teacher_name(first) or DASH,
            str(first.get("student") or DASH),
            str(len(group)),
            ", ".join(DASH if s is None else str(s) for s in seeds),
            format_stat([run.get("best_val_acc") for run in group], 100),
            format_stat([run.get("test_acc") for run in group], 100),
            format_stat([agreement(run) for run in group], 100),
            str(first.get("epochs")) if _all_equal(group, "epochs")
            else format_stat([run.get("epochs") for run in group], digits=1),
            format_stat([run.get("wall_time_s") for run in group], digits=1),
            format_stat([run.get("train_images_per_s") for run in group], digits=0),
            _runs_cell(names, group, repeats),
        ]
        rows.append(cells)
    return markdown_table(TABLE_COLUMNS, rows)


STAGE_COLUMNS = ("method", "stage", "network", "n", "epochs", "val acc (%)", "test acc (%)", "agreement (%)", "runs")


def _stage_agreement(stage: Mapping[str, Any]) -> float | None:
    test = stage.get("test") or {}
    value = test.get(f"{stage.get('stage')}/test/agreement")
    return None if value is None else float(value)


def stage_table(runs: Sequence[Mapping[str, Any]]) -> str:
    """One row per stage of each staged experiment (TeacherAssistantKD's path, for instance).

    A staged run's ``results.json`` lists its ``stages`` in order, the last one being the network the
    run delivers (that is the row of :func:`summary_table`). Here every stage gets its own row: the
    network it trained, its epochs, its best validation accuracy, the test accuracy and agreement
    with the network that taught it. Seed repeats are folded into ``mean ± std`` as in the summary.
    Returns ``""`` when no run has stages.
    """
    names = _run_names(runs)
    rows = []
    for group in group_runs(runs):
        staged, repeats = one_run_per_seed([run for run in group if run.get("stages")])
        if not staged:
            continue
        for position, first_stage in enumerate(staged[0]["stages"]):
            stages = [run["stages"][position] for run in staged if len(run["stages"]) > position]
            cells = [
                str(staged[0].get("method") or DASH),
                str(first_stage.get("stage") or position),
                str(first_stage.get("model") or DASH),
                str(len(stages)),
                str(first_stage.get("epochs") if first_stage.get("epochs") is not None else DASH),
                format_stat([stage.get("best_val_acc") for stage in stages], 100),
                format_stat([stage.get("test_acc") for stage in stages], 100),
                format_stat([_stage_agreement(stage) for stage in stages], 100),
                _runs_cell(names, staged, repeats),
            ]
            rows.append(cells)
    return markdown_table(STAGE_COLUMNS, rows) if rows else ""


def _all_equal(group: Sequence[Mapping[str, Any]], key: str) -> bool:
    return len({run.get(key) for run in group}) == 1


# --------------------------------------------------------------------------------------- plots
def _figure(width: float = 7.0, height: float = 4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, out_png: str | Path) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    # the saved area grows to whatever was drawn, so a legend is never cut at the figure's edge
    figure.savefig(out, format="png", bbox_inches="tight", pad_inches=0.1)
    return out


#: Characters per legend line: longer run labels wrap, so that a legend is no wider than its plot.
LEGEND_LINE = 64


def _legend_below(figure, labels: Sequence[str], ncols: int) -> None:
    """The legend under the axes (an inner legend hides curves), in up to ``ncols`` columns, as many as fit."""
    wrapped = [textwrap.fill(label, LEGEND_LINE) for label in labels]
    longest = max((len(line) for label in wrapped for line in label.splitlines()), default=1)
    ncols = max(1, min(ncols, len(labels), int(1.5 * LEGEND_LINE) // (longest + 4)))
    handles = [h for axes in figure.axes for h in axes.get_legend_handles_labels()[0]]
    figure.legend(handles, wrapped, loc="outside lower center", ncols=ncols, fontsize="small", frameon=False)


def run_colours(runs: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """One colour per experiment (:func:`config_key`), in the order the runs come: a report passes the same map
    to every plot, so a run has one colour everywhere, also in plots where other runs are missing."""
    return {key: f"C{index % 10}" for index, key in enumerate(dict.fromkeys(config_key(run) for run in runs))}


def run_label(run: Mapping[str, Any]) -> str:
    """A legend entry: method, student, teacher and seed."""
    label = f"{run.get('method')} {run.get('student')}"
    if teacher_name(run):
        label += f" ← {teacher_name(run)}"
    if run.get("seed") is not None:
        label += f", seed {run['seed']}"
    return label


def plot_curves(runs: Sequence[Mapping[str, Any]], out_png: str | Path, metric: str = "val/acc",
                colours: Mapping[str, str] | None = None) -> Path | None:
    """Plots ``metric`` from each run's ``metrics.csv`` against epoch (1 = after the first epoch).

    One line per run; runs of one experiment (see :func:`config_key`) share a colour (``colours``, by
    default :func:`run_colours` of ``runs``) and differ in line style, so seed spread is visible at a
    glance. Accuracy-like metrics (values in [0, 1]) are drawn in percent. Returns the PNG's path, or
    ``None`` (and writes nothing) when no run logged ``metric``, e.g. ``val/agreement`` for runs without a
    teacher.
    """
    figure = curves_figure(runs, metric, colours)
    return None if figure is None else _save(figure, out_png)


def curves_figure(runs: Sequence[Mapping[str, Any]], metric: str, colours: Mapping[str, str] | None = None):
    """The figure :func:`plot_curves` saves, or None when no run logged ``metric``."""
    colours = colours if colours is not None else run_colours(runs)
    curves = [(run, read_metric(run, metric)) for run in runs]
    curves = [(run, curve) for run, curve in curves if curve]
    if not curves:
        return None
    from matplotlib.ticker import MaxNLocator

    values = [v for _, curve in curves for _, v in curve]
    fraction = metric.split("/")[-1] in ("acc", "agreement", "acc_top5", "acc_best")
    percent = fraction and 0 <= min(values) <= max(values) <= 1
    styles = ("-", "--", ":", "-.")
    seen_in_group: dict[str, int] = {}
    figure = _figure()
    axes = figure.add_subplot()
    for run, curve in curves:
        key = config_key(run)
        member = seen_in_group.get(key, 0)
        seen_in_group[key] = member + 1
        epochs = [e for e, _ in curve]
        ys = [v * 100 if percent else v for _, v in curve]
        axes.plot(epochs, ys, color=colours.get(key, "0.5"), linestyle=styles[member % len(styles)],
                  marker="o" if len(curve) <= 30 else None, markersize=4, label=run_label(run))
    axes.set_xlabel("epoch")
    axes.set_ylabel(f"{metric} (%)" if percent else metric)
    axes.set_title(metric)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    _legend_below(figure, [run_label(run) for run, _ in curves], ncols=1 if len(curves) <= 3 else 2)
    return figure


# --------------------------------------------------------------------------------------- per class
def per_class_accuracy(
    runs: Mapping[str, Mapping[str, Any] | str | Path] | Sequence[Mapping[str, Any] | str | Path],
    datamodule: Any,
    split: str = "test",
) -> dict[str, Any]:
    """Accuracy per class of each run's exported network on one split of ``datamodule``.

    ``runs`` are run directories or run dicts from :func:`load_runs`; pass a mapping
    ``{label: run}`` to choose the labels of the result (otherwise the run directories). Each run's
    ``model.safetensors`` — the best-validation network, the one ``test_acc`` describes — is loaded
    with :func:`distill.teachers.load_network`, which reads the architecture from the file and
    checks it against the data's classes and channels. Evaluation is on the CPU, in eval mode,
    batch by batch from ``datamodule``'s ``{split}_dataloader``.

    Returns ``{label: numpy array of num_classes accuracies}`` (fractions; ``nan`` for a class
    absent from the split). The class-count-weighted mean of an array is the run's ``test_acc``.
    """
    import numpy as np
    import torch

    from distill.teachers import load_network

    items = list(runs.items()) if isinstance(runs, Mapping) else [(None, run) for run in runs]
    datamodule.setup("test")
    loader = getattr(datamodule, f"{split}_dataloader")()
    num_classes = int(datamodule.num_classes)
    image_size = getattr(datamodule, "image_size", None)
    in_channels = int(getattr(datamodule, "in_channels", 3))
    result: dict[str, Any] = {}
    for label, run in items:
        run_dir = Path(run["dir"]) if isinstance(run, Mapping) else Path(run)
        path = run_dir / EXPORT_FILE
        if not path.is_file():
            raise DistillError(f"{run_dir} has no {EXPORT_FILE}; per-class accuracy needs a finished run.")
        network = load_network(path, None, num_classes=num_classes, in_channels=in_channels,
                               image_size=image_size).network.eval()
        correct = torch.zeros(num_classes, dtype=torch.long)
        total = torch.zeros(num_classes, dtype=torch.long)
        with torch.inference_mode():
            for batch in loader:
                images, labels = batch[0], batch[1]
                hits = (network(images).argmax(dim=-1) == labels).long()
                total += torch.bincount(labels, minlength=num_classes)
                correct += torch.bincount(labels, weights=hits, minlength=num_classes).long()
        with np.errstate(invalid="ignore", divide="ignore"):
            result[label if label is not None else str(run_dir)] = correct.numpy() / total.numpy()
    return result


def _class_names(count: int, class_names: Sequence[str] | None) -> list[str]:
    return [str(name) for name in class_names] if class_names is not None else [str(i) for i in range(count)]


def per_class_table(accuracies: Mapping[str, Any], class_names: Sequence[str] | None = None) -> str:
    """Markdown table of :func:`per_class_accuracy` results: one row per class, one column per run (%)."""
    labels = list(accuracies)
    count = len(next(iter(accuracies.values()))) if accuracies else 0
    names = _class_names(count, class_names)
    lines = ["| class | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for i, name in enumerate(names):
        cells = [DASH if math.isnan(float(accuracies[label][i])) else f"{100 * float(accuracies[label][i]):.1f}"
                 for label in labels]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_per_class(accuracies: Mapping[str, Any], out_png: str | Path,
                   class_names: Sequence[str] | None = None, title: str = "test accuracy per class",
                   colours: Mapping[str, str] | None = None) -> Path:
    """Grouped bars: one group per class, one bar per entry of ``accuracies`` (e.g. teacher, scratch, KD), coloured
    by ``colours`` (entry → colour, e.g. each run's from :func:`run_colours`) or in order."""
    labels = list(accuracies)
    count = len(next(iter(accuracies.values()))) if accuracies else 0
    names = _class_names(count, class_names)
    # wide enough for many classes: a quarter inch per bar, never narrower than the curve plots
    figure = _figure(max(7.0, 0.25 * count * max(1, len(labels))), 4.5)
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(labels))
    lowest = 100.0
    for j, label in enumerate(labels):
        heights = [100 * float(v) for v in accuracies[label]]
        lowest = min([lowest] + [h for h in heights if not math.isnan(h)])
        axes.bar([i - 0.4 + width * (j + 0.5) for i in range(count)], heights, width=width,
                 label=label, color=(colours or {}).get(label, f"C{j % 10}"))
    axes.set_xticks(range(count), names, rotation=0 if count <= 20 else 90)
    axes.set_xlabel("class")
    axes.set_ylabel("accuracy (%)")
    # start the axis a little below the weakest class: differences of a few points stay visible
    axes.set_ylim(max(0.0, min(lowest, 100.0) - 5.0), 100.5)
    axes.set_title(title)
    axes.grid(axis="y", alpha=0.3)
    _legend_below(figure, labels, ncols=4)
    return _save(figure, out_png)


# --------------------------------------------------------------------------------------- command
def _metric_file(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", metric) + ".png"


def write_report(runs: Sequence[Mapping[str, Any]], out_dir: str | Path,
                 metrics: Sequence[str] = DEFAULT_METRICS) -> tuple[Path, str]:
    """Writes ``report.md`` (the table, the plots, the run directories) and one PNG per metric.

    Returns the path of ``report.md`` and the table.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = summary_table(runs)
    sections = ["# distill report", "", f"{len(runs)} run(s). Accuracies in percent; rows that differ only in "
                "the seed show mean ± sample standard deviation over their n runs. Test accuracy is that of "
                "the best-validation checkpoint; agreement is the teacher–student top-1 agreement on the "
                "test split (last validation value for runs that did not record it).", "", table, ""]
    stages = stage_table(runs)
    if stages:
        sections += ["## Stages", "", "Staged methods, one row per stage (the last stage is the run's row above); "
                     "agreement is with the network that taught that stage.", "", stages, ""]
    colours = run_colours(runs)  # one colour per experiment in every plot
    for metric in metrics:
        png = plot_curves(runs, out / _metric_file(metric), metric, colours)
        if png is not None:
            sections += [f"## {metric}", "", f"![{metric}]({png.name})", ""]
    sections += ["## Runs", ""] + [f"- `{run['dir']}`: {run_label(run)}" for run in runs] + [""]
    report = out / "report.md"
    report.write_text("\n".join(sections))
    return report, table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill report",
        description="Summarise finished runs: a Markdown table (printed, and in OUT/report.md) and "
                    "learning-curve plots (OUT/*.png).",
    )
    parser.add_argument("paths", nargs="+", metavar="RUN_DIR",
                        help="run directories (runs/<name>/version_N) or folders searched for them")
    parser.add_argument("--out", default="reports", help="folder for report.md and the plots (default: reports)")
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), metavar="METRIC",
                        help="metrics.csv columns to plot against epoch (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> Path:
    """``distill report RUN_DIR... [--out DIR] [--metrics M...]``; returns the path of ``report.md``.

    User errors raise :class:`~distill.errors.DistillError`, which the ``distill`` console script
    prints as one line (exit status 2).
    """
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    runs = load_runs(args.paths)
    report, table = write_report(runs, args.out, args.metrics)
    print(table)
    print(f"\nReport: {report}")
    return report


if __name__ == "__main__":
    try:
        main()
    except DistillError as err:
        print(f"distill: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
