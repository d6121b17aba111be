"""``distill repro EXPERIMENT.yaml``: run one reproduction experiment and write ``results/<name>.md``.

    distill repro experiments/hinton_mnist.yaml                  # every run, then the results page
    distill repro experiments/hinton_mnist.yaml --only teacher   # some runs only
    distill repro experiments/hinton_mnist.yaml --report-only    # the page from the runs there are
    distill repro experiments/hinton_mnist.yaml --jobs 2         # up to 2 runs at once, as subprocesses

An experiment file lists *runs* (a config from ``configs/``, the seeds, and overrides of single
values) and *analyses* that turn finished runs into tables and plots. The driver runs each
(config, seed) with ``distill fit`` under ``<runs-root>/<experiment>/<run name>/version_N``, skips
pairs that already finished (so an interrupted experiment continues where it stopped), and writes
the page through the report code: the summary table (mean ± std over seeds, model selection on
validation, test accuracy of the best-validation checkpoint measured once), per-stage rows,
learning curves, the analyses, the total wall time and the machine.

Experiment file::

    name: hinton_mnist
    title: Hinton et al. 2015, MNIST
    setup: data, subset, epochs ...            # free text, printed on the page
    paper: what the paper reports ...          # free text, printed on the page
    runs:
      - name: teacher
        config: configs/mnist5k/teacher.yaml
        seeds: [0]
      - name: kd_t20
        config: configs/mnist5k/kd.yaml
        seeds: [0, 1, 2]
        set: {model.init_args.temperature: 20, model.init_args.teacher: "{model:teacher}"}
    analyses:
      - {kind: sweep, title: ..., x_label: temperature, runs: [kd_t1, kd_t4], x: [1, 4]}
      - {kind: class_bias, runs: [kd_no3], class_index: 3}

Two optional top-level keys apply to every run: ``overlays``, config files given after each run's own
(``distill fit --config RUN --config OVERLAY``; ``configs/overlays/gpu.yaml`` for the GPU experiments under
``experiments/gpu/``), and ``set``, overrides that a run's own ``set`` may override in turn.

``{model:NAME}`` in a value is the exported network (``model.safetensors``) of the lowest-seed
finished run ``NAME``, which must come earlier in the list. ``{model:EXPERIMENT/NAME}`` is run ``NAME`` of
another experiment (under the same runs root), which must have finished first: one teacher can then serve
several experiments without being trained twice.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from distill.errors import ConfigError
from distill.tools.claims import check_claims, claims_section
from distill.tools.report import (
    format_stat,
    load_runs,
    markdown_table,
    plot_curves,
    stage_table,
    summary_table,
)
from distill.run import RESULTS_FILE, child_environment

REFERENCE = re.compile(r"\{model:([A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)?)\}")
RUN_KEYS = {"name", "config", "seeds", "set"}
ANALYSIS_KINDS = ("sweep", "class_bias")


# --------------------------------------------------------------------------------------- the spec
def load_spec(path: str | Path) -> dict[str, Any]:
    """Reads and checks an experiment file; every mistake is one :class:`ConfigError` before any run."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file {path} does not exist; see experiments/ for the experiments there are.")
    spec = yaml.safe_load(path.read_text()) or {}
    for key in ("name", "title", "runs"):
        if key not in spec:
            raise ConfigError(f"{path}: the experiment needs `{key}`.")
    for overlay in spec.get("overlays") or []:
        if not Path(overlay).is_file():
            raise ConfigError(f"{path}: overlay {overlay} does not exist (run from the repository root).")
    shared = spec.get("set") or {}
    if not isinstance(shared, dict) or any(REFERENCE.search(str(value)) for value in shared.values()):
        raise ConfigError(f"{path}: the experiment's `set` must map keys to plain values (a {{model:...}} reference "
                          f"belongs in a run's own `set`), got {shared!r}.")
    names: list[str] = []
    for entry in spec["runs"]:
        unknown = set(entry) - RUN_KEYS
        if unknown or "name" not in entry or "config" not in entry:
            raise ConfigError(f"{path}: run {entry.get('name', entry)} needs `name` and `config` and may have "
                              f"`seeds` and `set` only (unknown: {', '.join(sorted(unknown)) or 'none'}).")
        if entry["name"] in names:
            raise ConfigError(f"{path}: two runs are named {entry['name']!r}; names must be unique.")
        if not Path(entry["config"]).is_file():
            raise ConfigError(f"{path}: run {entry['name']!r} names config {entry['config']}, which does not exist "
                              "(run from the repository root).")
        _check_recipe(path, entry)
        for reference in _references(entry):
            if "/" not in reference and reference not in names:
                raise ConfigError(f"{path}: run {entry['name']!r} uses {{model:{reference}}}, but no earlier run "
                                  f"is named {reference!r}.")
        entry.setdefault("seeds", [0])
        names.append(entry["name"])
    check_claims(path, spec.get("claims"), names)
    for analysis in spec.get("analyses") or []:
        if analysis.get("kind") not in ANALYSIS_KINDS:
            raise ConfigError(f"{path}: analysis kind {analysis.get('kind')!r} is not one of {', '.join(ANALYSIS_KINDS)}.")
        missing = [name for name in analysis.get("runs", []) if name not in names]
        if missing:
            raise ConfigError(f"{path}: analysis {analysis.get('title', analysis['kind'])!r} names unknown runs "
                              f"{', '.join(missing)}.")
        if analysis["kind"] == "sweep" and len(analysis.get("x", [])) != len(analysis.get("runs", [])):
            raise ConfigError(f"{path}: sweep {analysis.get('title')!r} needs one `x` value per run.")
        stray = [name for group in (analysis.get("series") or {}).values() for name in group
                 if name not in analysis.get("runs", [])]
        if stray:
            raise ConfigError(f"{path}: sweep {analysis.get('title')!r} has series runs {', '.join(stray)} that are "
                              "not in its `runs` (each needs an `x` there).")
    return spec


def _check_recipe(path: Path, entry: Mapping[str, Any]) -> None:
    """A run's config that builds on a recipe (``recipe: recipe.yaml``) whose file is missing: one error before any run."""
    from distill.cli import recipe_of

    try:
        recipe_of(entry["config"])
    except ConfigError as err:
        raise ConfigError(f"{path}: run {entry['name']!r}: {err}") from None


# --------------------------------------------------------------------------------------- running
def finished_runs(runs_root: Path, experiment: str, name: str) -> dict[int, dict[str, Any]]:
    """Finished runs of one entry, by seed (the newest version where a seed ran twice)."""
    found: dict[int, dict[str, Any]] = {}
    folder = runs_root / experiment / name
    if not folder.is_dir():
        return found
    for run in load_runs(folder) if any(folder.glob(f"version_*/{RESULTS_FILE}")) else []:
        found[run.get("seed")] = run
    return found


def lowest_seed_model(runs_root: Path, experiment: str, name: str) -> str | None:
    """The exported network of run ``name``'s lowest-seed finished run (what ``{model:name}`` means), if any."""
    done = finished_runs(runs_root, experiment, name)
    return done[min(done)]["model_file"] if done else None


def _references(entry: Mapping[str, Any]) -> list[str]:
    """The ``{model:...}`` references in a run's overrides, in order."""
    return [ref for value in (entry.get("set") or {}).values() for ref in REFERENCE.findall(str(value))]


def _model_file(reference: str, models: Mapping[str, str], runs_root: Path) -> str:
    """The exported network a ``{model:...}`` reference names (see the module docstring)."""
    if "/" not in reference:
        return models[reference]
    experiment, name = reference.split("/")
    model = lowest_seed_model(runs_root, experiment, name)
    if model is None:
        raise ConfigError(f"{{model:{reference}}} names run {name!r} of experiment {experiment!r}, which has no "
                          f"finished run under {runs_root}; run `distill repro experiments/{experiment}.yaml "
                          f"--only {name}` first.")
    return model


def _override(key: str, value: Any, models: Mapping[str, str], runs_root: Path) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    text = REFERENCE.sub(lambda match: _model_file(match.group(1), models, runs_root), text)
    return f"--{key}={text}"


def _check_other_experiments(spec: Mapping[str, Any], runs_root: Path, only: Sequence[str] | None) -> None:
    """Resolves every ``{model:EXPERIMENT/NAME}``: a missing one stops before any run."""
    for entry in spec["runs"]:
        if only is None or entry["name"] in only:
            for reference in _references(entry):
                if "/" in reference:
                    _model_file(reference, {}, runs_root)


def _fit_args(spec: Mapping[str, Any], entry: Mapping[str, Any], seed: int, models: Mapping[str, str],
              runs_root: Path) -> list[str]:
    """The ``distill fit`` arguments of one (entry, seed), with its ``{model:...}`` references resolved."""
    args = ["fit", "--config", entry["config"]]
    for overlay in spec.get("overlays") or []:
        args += ["--config", overlay]
    args += [f"--seed_everything={seed}", f"--run_name={spec['name']}/{entry['name']}",
             f"--trainer.default_root_dir={runs_root}", "--trainer.enable_progress_bar=false",
             "--trainer.enable_model_summary=false"]
    overrides = {**(spec.get("set") or {}), **(entry.get("set") or {})}
    return args + [_override(key, value, models, runs_root) for key, value in overrides.items()]


def run_experiment(spec: Mapping[str, Any], runs_root: Path, only: Sequence[str] | None = None,
                   jobs: int = 1) -> list[str]:
    """Runs every (config, seed) of the experiment that has not finished yet; returns the failed runs.

    With ``jobs == 1`` the runs go one after another in this process, in file order, and a failure stops
    the experiment (the list returned is then always empty). With more, see :func:`run_parallel`.
    """
    _check_other_experiments(spec, runs_root, only)
    if jobs > 1:
        return run_parallel(spec, runs_root, only, jobs)
    from distill.cli import main as distill_main

    models: dict[str, str] = {}
    for entry in spec["runs"]:
        done = finished_runs(runs_root, spec["name"], entry["name"])
        if only is None or entry["name"] in only:
            for seed in entry["seeds"]:
                if seed in done:
                    continue
                args = _fit_args(spec, entry, seed, models, runs_root)
                print(f"[repro] {entry['name']} seed {seed}: distill {' '.join(args)}", flush=True)
                argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it sees other arguments too
                try:
                    distill_main(args)
                finally:
                    sys.argv = argv
        model = lowest_seed_model(runs_root, spec["name"], entry["name"])
        if model is not None:
            models[entry["name"]] = model
    return []


# --------------------------------------------------------------------------------------- parallel runs
class _Job:
    """One (entry, seed) running as ``distill fit`` in a subprocess, its output in a log beside its run."""

    def __init__(self, spec: Mapping[str, Any], entry: Mapping[str, Any], seed: int, models: Mapping[str, str],
                 runs_root: Path):
        self.name, self.seed = entry["name"], seed
        args = _fit_args(spec, entry, seed, models, runs_root)
        self.log = runs_root / spec["name"] / entry["name"] / f"seed{seed}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("w") as log:  # closing ours is fine: the child has its own copy of the handle
            log.write(f"distill {' '.join(args)}\n")
            log.flush()
            self.process = subprocess.Popen([sys.executable, "-m", "distill.cli", *args], stdout=log,
                                            stderr=subprocess.STDOUT, env=child_environment())
        self.started = time.time()
        print(f"[repro] {self.name} seed {seed}: started, log {self.log}", flush=True)

    def error(self) -> str:
        """The run's own last line of error (``distill: error: ...``, or a traceback's last line) from its log."""
        lines = [line.strip() for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        said = [line for line in lines if line.startswith("distill: error: ")]
        return (said or lines[-1:] or ["no output"])[-1]

    def finished(self) -> int | None:
        """The exit code once the run is over (and its line printed), else None."""
        code = self.process.poll()
        if code is not None:
            took = f"{time.time() - self.started:.1f} s"
            print(f"[repro] {self.name} seed {self.seed}: " + (f"finished in {took}" if code == 0 else
                  f"FAILED with exit code {code} after {took}; log {self.log}"), flush=True)
        return code


def run_parallel(spec: Mapping[str, Any], runs_root: Path, only: Sequence[str] | None, jobs: int) -> list[str]:
    """Runs the pending (entry, seed) pairs as up to ``jobs`` subprocesses at once; returns the failed runs.

    An entry starts only once every entry it names in ``{model:NAME}`` is settled (all its runs over), so the
    model it gets is the same lowest-seed model as in a run one after another. An entry with a failed run,
    or that names one without a finished run, is failed: its dependents are skipped, the rest go on.
    """
    pending: dict[str, list[int]] = {}
    for entry in spec["runs"]:
        done = finished_runs(runs_root, spec["name"], entry["name"])
        selected = only is None or entry["name"] in only
        pending[entry["name"]] = [seed for seed in entry["seeds"] if seed not in done] if selected else []
    entries = {entry["name"]: entry for entry in spec["runs"]}
    models: dict[str, str] = {}
    settled: set[str] = set()  # entries with no run left to start or wait for
    failed: set[str] = set()  # entries with a failed or skipped run: their dependents are skipped
    failures: list[str] = []
    running: list[_Job] = []

    def settle(name: str) -> None:
        settled.add(name)
        model = lowest_seed_model(runs_root, spec["name"], name)
        if model is not None:
            models[name] = model

    def ready(name: str) -> bool:
        """Whether a pending entry's references are settled; marks it failed when one of them cannot teach."""
        local = [ref for ref in _references(entries[name]) if "/" not in ref]
        if any(ref not in settled for ref in local):
            return False
        blocked = [ref for ref in local if ref in failed or ref not in models]
        if blocked:
            failed.add(name)
            why = f"skipped: needs {', '.join(blocked)}, which did not finish"
            failures.append(f"{name} ({why})")
            print(f"[repro] {name}: {why}", flush=True)
            pending[name] = []
        return True

    try:
        while len(settled) < len(entries):
            for name in entries:  # file order: earlier entries usually teach later ones
                if name in settled or (pending[name] and not ready(name)):
                    continue
                while pending[name] and len(running) < jobs:
                    running.append(_Job(spec, entries[name], pending[name].pop(0), models, runs_root))
                if not pending[name] and not any(job.name == name for job in running):
                    settle(name)
            for job in list(running):
                code = job.finished()
                if code is None:
                    continue
                running.remove(job)
                if code != 0:
                    failed.add(job.name)
                    failures.append(f"{job.name} seed {job.seed} (exit code {code}: {job.error()}; log {job.log})")
            if running:
                time.sleep(0.1)
    finally:  # on an interrupt or error here, no run goes on unattended
        for job in running:
            job.process.terminate()
            job.process.wait()
    return failures


# --------------------------------------------------------------------------------------- analyses
def _sweep(analysis: Mapping[str, Any], runs: Mapping[str, list[dict]], out: Path) -> list[str]:
    """Test accuracy (mean ± std over seeds) against a swept value, as a table and an error-bar plot.

    With ``series: {label: [run, ...]}`` the runs form several lines in one plot (e.g. one per method, against
    the epoch budget); every run still takes its ``x`` from the ``runs``/``x`` lists.
    """
    metric = analysis.get("metric", "test_acc")
    x_of = dict(zip(analysis["runs"], analysis["x"]))
    series = analysis.get("series") or {"": list(analysis["runs"])}
    rows, lines_to_plot = [], []
    for label, names in series.items():
        points = []
        for name in names:
            values = [run.get(metric) for run in runs[name]]
            rows.append(([label] if label else []) + [str(x_of[name]), name, str(len(values)),
                        format_stat(values, 100), format_stat([run.get("best_val_acc") for run in runs[name]], 100)])
            known = [v for v in values if v is not None]
            if known:
                mean = sum(known) / len(known)
                spread = (sum((v - mean) ** 2 for v in known) / (len(known) - 1)) ** 0.5 if len(known) > 1 else 0.0
                points.append((float(x_of[name]), mean * 100, spread * 100))
        if points:
            lines_to_plot.append((label, points))
    lines = [f"### {analysis.get('title', 'sweep')}", ""]
    header = (["series"] if "" not in series else []) + [analysis.get("x_label", "x"), "run", "n", f"{metric} (%)",
                                                          "val acc (%)"]
    lines.append(markdown_table(header, rows))
    if lines_to_plot:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        figure = Figure(figsize=(6, 3.8), layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        for label, points in lines_to_plot:
            xs, ys, errors = zip(*points)
            axes.errorbar(xs, ys, yerr=errors, marker="o", capsize=4,
                          label=f"{label + ': ' if label else ''}{metric}, mean ± std over seeds")
        if analysis.get("log_x"):
            axes.set_xscale("log")
        axes.set_xlabel(analysis.get("x_label", "x"))
        axes.set_ylabel(f"{metric} (%)")
        axes.set_title(analysis.get("title", "sweep"))
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
        png = out / (re.sub(r"[^A-Za-z0-9]+", "_", analysis.get("title", "sweep")).strip("_").lower() + ".png")
        figure.savefig(png, dpi=110)
        lines += ["", f"![{analysis.get('title', 'sweep')}]({out.name}/{png.name})"]
    return lines + [""]


def _class_bias(analysis: Mapping[str, Any], runs: Mapping[str, list[dict]], out: Path) -> list[str]:
    """Hinton §3: a student that never saw class c in its transfer set, with and without a bias on c."""
    from distill.tools.class_bias import bias_correction

    class_index = int(analysis.get("class_index", 3))
    grid = analysis.get("grid", [0.25 * i for i in range(41)])
    lines = [f"### {analysis.get('title', f'class {class_index} bias correction')}", ""]
    rows = []
    for name in analysis["runs"]:
        for run in runs[name]:
            result = bias_correction(run, class_index, grid)
            rows.append([name, str(run.get("seed")), f"{result['bias']:+.2f}",
                         f"{result['test_errors_before']} ({result['test_class_errors_before']} on {class_index}s)",
                         f"{result['test_errors_after']} ({result['test_class_errors_after']} on {class_index}s)",
                         f"{result['test_size']} ({result['test_class_size']})"])
    lines.append(markdown_table(["run", "seed", "bias (chosen on val)", "test errors, no correction",
                                 "test errors, corrected", "test images (of the class)"], rows))
    return lines + [""]


ANALYSES = {"sweep": _sweep, "class_bias": _class_bias}


# --------------------------------------------------------------------------------------- the page
def _machine() -> str:
    import torch

    threads = torch.get_num_threads()
    # the runs of `--jobs N` are subprocesses with OMP_NUM_THREADS=1 (unless set), not this process's count
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{threads} thread{'s' if threads != 1 else ''} (the page's process; `--jobs` runs default to 1 each), "
            f"Python {platform.python_version()}")


def run_processors(runs: Sequence[Mapping[str, Any]]) -> str:
    """Which processors the runs trained on (results.json's ``machine``): the same config and seed can land a few
    tenths of a point apart on another one, so a page says where its numbers came from."""
    machines = [run.get("machine") or {} for run in runs]
    counts = Counter(machine.get("accelerator") or machine.get("cpu") for machine in machines)
    known = [f"{name} ({count} run{'s' if count != 1 else ''})" for name, count in counts.items() if name]
    unknown = counts.get(None, 0)
    said = f"Runs trained on: {'; '.join(known)}" if known else "The runs do not record their processor"
    return said + (f"; {unknown} from before runs recorded it." if known and unknown else ".")


def concurrency(runs: Sequence[Mapping[str, Any]]) -> str | None:
    """What running several runs at once (``--jobs``) bought: the runs' training images over the elapsed time
    they covered (the union of their wall-clock spans), against the same images over their summed wall time.
    None when no two runs overlapped, or the runs predate ``started_at`` in results.json."""
    spans = sorted((run["started_at"], run["finished_at"], run["train_images"]) for run in runs
                   if all(run.get(key) is not None for key in ("started_at", "finished_at", "train_images")))
    events = sorted([(end, -1) for _, end, _ in spans] + [(start, 1) for start, _, _ in spans])  # ends first
    at_once = most = 0
    for _, change in events:
        at_once += change
        most = max(most, at_once)
    if most < 2:
        return None
    elapsed, covered_to = 0.0, float("-inf")
    for start, end, _ in spans:
        if end > covered_to:
            elapsed += end - max(start, covered_to)
            covered_to = end
    summed = sum(end - start for start, end, _ in spans)
    images = sum(count for _, _, count in spans)
    return (f"Up to {most} runs at once: {images:,} training images in {elapsed / 60:.1f} min of elapsed time, "
            f"{images / elapsed:,.0f} images/s in all, {summed / elapsed:.2f}× the {images / summed:,.0f} "
            f"images/s of the same runs' summed wall time ({len(spans)} runs with timestamps).")


def write_page(spec: Mapping[str, Any], runs_root: Path, results_dir: Path, command: str) -> Path:
    """``results/<name>.md`` (and its plots under ``results/<name>/``) from the finished runs."""
    runs = {entry["name"]: [done for _, done in sorted(finished_runs(runs_root, spec["name"], entry["name"]).items())]
            for entry in spec["runs"]}
    everything = [run for entry in spec["runs"] for run in runs[entry["name"]]]
    if not everything:
        raise ConfigError(f"no finished run of {spec['name']} under {runs_root}; run the experiment first.")
    out = results_dir / spec["name"]
    out.mkdir(parents=True, exist_ok=True)
    missing = [f"{entry['name']} seed {seed}" for entry in spec["runs"] for seed in entry["seeds"]
               if seed not in {run.get("seed") for run in runs[entry["name"]]}]
    wall = sum(run.get("wall_time_s") or 0.0 for run in everything)
    lines = [f"# {spec['title']}", "", f"Produced by `{command}` from {len(everything)} runs under "
             f"`{runs_root / spec['name']}`; total training wall time {wall / 60:.1f} min on {_machine()}. "
             f"{run_processors(everything)}", ""]
    overlap = concurrency(everything)
    if overlap:
        lines += [overlap, ""]
    if missing:
        lines += [f"**Incomplete**: not yet run: {', '.join(missing)}.", ""]
    if spec.get("setup"):
        lines += ["## Setup", "", str(spec["setup"]).strip(), ""]
    if spec.get("paper"):
        lines += ["## What the paper reports", "", str(spec["paper"]).strip(), ""]
    if spec.get("claims"):
        lines += claims_section(spec["claims"], runs)
    lines += ["## Runs", "", "Accuracies in percent, mean ± sample std over the n seeds; model selection on the "
              "validation split, test accuracy of the best-validation checkpoint, measured once.", "",
              summary_table(everything), ""]
    stages = stage_table(everything)
    if stages:
        lines += ["### Stages", "", stages, ""]
    if spec.get("analyses"):
        lines += ["## Analyses", ""]
        for analysis in spec["analyses"]:
            lines += ANALYSES[analysis["kind"]](analysis, runs, out)
    png = plot_curves(everything, out / "val_acc.png", "val/acc")
    if png is not None:
        lines += ["## Validation accuracy against epoch", "", f"![val/acc]({out.name}/{png.name})", ""]
    page = results_dir / f"{spec['name']}.md"
    page.write_text("\n".join(lines))
    return page


# --------------------------------------------------------------------------------------- command
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill repro", description="Run a reproduction experiment "
                                     "(experiments/*.yaml) and write results/<name>.md.")
    parser.add_argument("experiment", help="the experiment file, e.g. experiments/hinton_mnist.yaml")
    parser.add_argument("--runs-root", default="runs/repro", help="where the runs go (default: %(default)s)")
    parser.add_argument("--results", default="results", help="where the page goes (default: %(default)s)")
    parser.add_argument("--only", nargs="+", metavar="RUN", help="run only these entries (the page covers all)")
    parser.add_argument("--report-only", action="store_true", help="write the page from finished runs, run nothing")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="run up to N runs at once, each a subprocess with its log beside its run "
                             "(default: %(default)s, one after another in this process)")
    return parser


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs}: give 1 (runs one after another) or more (runs at once).")
    spec = load_spec(args.experiment)
    runs_root = Path(args.runs_root)
    started = time.time()
    failures = [] if args.report_only else run_experiment(spec, runs_root, args.only, args.jobs)
    # the command that makes every run of the page (not --only/--report-only, which redo part of it)
    command = f"distill repro {args.experiment}" + (f" --runs-root {runs_root}" if args.runs_root != "runs/repro" else "")
    if failures and not any(finished_runs(runs_root, spec["name"], entry["name"]) for entry in spec["runs"]):
        # no page to write: the failures are the news
        raise SystemExit(f"[repro] no run finished; {len(failures)} failed: " + "; ".join(failures))
    page = write_page(spec, runs_root, Path(args.results), command)
    print(f"[repro] {spec['name']}: {page} ({(time.time() - started) / 60:.1f} min); "
          "`distill claims-index` carries its Claims table into the README's summary")
    if failures:  # after the page, which shows what did finish
        raise SystemExit(f"[repro] {len(failures)} failed: " + "; ".join(failures))
    return page


if __name__ == "__main__":
    main()
