"""``distill choose-assistant``: which teacher assistant to use, by the rule Mirzadeh et al. (2020) found.

The paper's TA-size experiments (Tables 2–3) put the best assistant where its *from-scratch* accuracy is
closest to the mean of the teacher's and the student's — not at the mean size. Given the from-scratch
runs (``Supervised``) of the teacher, the student and the candidate assistants, this ranks the
candidates by that rule and plots them::

    distill choose-assistant --teacher runs/.../teacher-cnn10 --student runs/.../nokd-cnn2 \\
        --candidates runs/.../nokd-cnn4 runs/.../nokd-cnn6 runs/.../nokd-cnn8 [--out reports/ta.png]

Accuracies are the runs' validation accuracies (``best_val_acc``): choosing by test accuracy would leak
the test split into the choice. Several runs of one architecture (seeds) are averaged.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from distill.errors import ConfigError
from distill.tools.report import _figure, _save, load_runs


def mean_accuracy_by_model(paths: Sequence[str]) -> dict[str, float]:
    """Mean ``best_val_acc`` per trained architecture over the runs found under ``paths``."""
    values: dict[str, list[float]] = defaultdict(list)
    for run in load_runs(paths):
        if run.get("best_val_acc") is not None:
            values[run["student"]].append(float(run["best_val_acc"]))
    return {model: sum(accs) / len(accs) for model, accs in values.items()}


def rank_assistants(teacher_acc: float, student_acc: float, candidates: dict[str, float]) -> list[dict[str, Any]]:
    """Candidates sorted by ``|acc − (teacher_acc + student_acc)/2|``, the best first."""
    if not candidates:
        raise ConfigError("no candidate assistants given: pass their from-scratch run directories.")
    target = (teacher_acc + student_acc) / 2
    ranked = [{"model": model, "scratch_val_acc": acc, "distance": abs(acc - target), "target": target}
              for model, acc in candidates.items()]
    return sorted(ranked, key=lambda row: (row["distance"], row["model"]))


def plot_ranking(ranked: list[dict[str, Any]], teacher_acc: float, student_acc: float, out_png: str | Path) -> Path:
    figure = _figure()
    axes = figure.subplots()
    ordered = sorted(ranked, key=lambda row: row["scratch_val_acc"])
    axes.bar([row["model"] for row in ordered], [row["scratch_val_acc"] for row in ordered],
             color=["tab:green" if row is ranked[0] else "tab:gray" for row in ordered])
    for level, label, style in ((teacher_acc, "teacher", "-"), (student_acc, "student", "-"),
                                (ranked[0]["target"], "midpoint (the paper's best TA)", "--")):
        axes.axhline(level, linestyle=style, color="black" if label != "student" else "tab:red", linewidth=1, label=label)
    low = min(student_acc, *(row["scratch_val_acc"] for row in ranked))
    axes.set_ylim(max(0.0, low - 0.05), min(1.0, teacher_acc + 0.03))
    axes.set_ylabel("from-scratch validation accuracy")
    axes.set_title("Teacher-assistant candidates (green: recommended)")
    axes.legend(loc="lower right", fontsize="small")
    return _save(figure, out_png)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="distill choose-assistant", description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", nargs="+", required=True, help="from-scratch run(s) of the teacher")
    parser.add_argument("--student", nargs="+", required=True, help="from-scratch run(s) of the student")
    parser.add_argument("--candidates", nargs="+", required=True, help="from-scratch runs of the candidate TAs")
    parser.add_argument("--out", default="reports/assistant_choice.png", help="where to write the plot")
    args = parser.parse_args(argv)
    teacher = mean_accuracy_by_model(args.teacher)
    student = mean_accuracy_by_model(args.student)
    if len(teacher) != 1 or len(student) != 1:
        raise ConfigError(f"--teacher and --student must each name runs of one architecture; got "
                          f"{sorted(teacher)} and {sorted(student)}.")
    (teacher_model, teacher_acc), (student_model, student_acc) = next(iter(teacher.items())), next(iter(student.items()))
    ranked = rank_assistants(teacher_acc, student_acc, mean_accuracy_by_model(args.candidates))
    print(f"teacher {teacher_model}: {teacher_acc:.4f}   student {student_model}: {student_acc:.4f}   "
          f"midpoint: {ranked[0]['target']:.4f}")
    print(f"{'candidate':<20}{'scratch val acc':>16}{'|acc - midpoint|':>18}")
    for row in ranked:
        print(f"{row['model']:<20}{row['scratch_val_acc']:>16.4f}{row['distance']:>18.4f}")
    print(f"recommended assistant: {ranked[0]['model']}  (plot: {plot_ranking(ranked, teacher_acc, student_acc, args.out)})")
    return ranked
