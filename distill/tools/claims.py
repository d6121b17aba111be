"""The claims section of a results page: for every claim of the paper an experiment tests, the paper's number,
ours (mean ± std over seeds, n), the gap, and the verdict.

An experiment file lists its claims (``experiments/*.yaml``)::

    claims:
      - claim: KD beats training the student alone
        paper: "70.16 → 72.57"
        paper_gap: 2.41               # the paper's method − baseline in points ("+" or "-": a direction without a number)
        baseline: nokd_cnn2           # a run entry, or entry@stage for one stage of a staged run
        method: kd_cnn10_cnn2
      - claim: TA = CNN-4 is the best TA size
        paper: "73.51 / 73.15 / 72.75"
        order: [takd_cnn4, takd_cnn6, takd_cnn8]   # the paper's ranking, best first
      - claim: a fixed teacher overfits
        paper: "peaks, then degrades"
        ours: "still improving at the longest budget"   # neither: ours and the verdict by hand
        verdict: not seen at these budgets

A comparison's or an order's verdict is computed from the runs by one rule (:func:`verdict`, :func:`order_verdict`),
so a rerun that changes the numbers changes the verdict; a ``note`` adds a remark after it. Claims that are
neither (a curve's shape) carry ``ours`` and ``verdict`` written from the page's tables.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from distill.errors import ConfigError
from distill.tools.report import markdown_table, mean_std

CLAIM_KEYS = {"claim", "paper", "paper_gap", "baseline", "method", "order", "ours", "verdict", "note"}
COLUMNS = ["claim", "paper", "ours (test %, mean ± std, n)", "gap, paper / ours (points)", "verdict"]
RULE = ("Verdicts of the comparisons, from the runs: d = mean(method) − mean(baseline) in test accuracy, SE its "
        "standard error over seeds, √(s₁²/n₁ + s₂²/n₂); **reproduced**: d has the paper's sign and "
        "|d| > 2 SE; **same direction, within noise**: the paper's sign, |d| ≤ 2 SE; **not reproduced, within "
        "noise**: the other sign, |d| ≤ 2 SE; **not reproduced, the opposite holds**: the other sign, |d| > 2 SE. "
        "A row of one seed adds nothing to SE; with one seed on both sides there is no SE and the verdict says so. "
        "An order (the paper's ranking, best first) is **reproduced** when every neighbour pair is reproduced in that "
        "sense, **same order, within noise** when every pair has the right sign, else **not reproduced**.")


def check_claims(path: Any, claims: Any, names: Sequence[str]) -> None:
    """Every claim names runs the experiment has and is either a comparison or written by hand."""
    if claims is None:
        return
    if not isinstance(claims, list):
        raise ConfigError(f"{path}: `claims` must be a list of claims, each with `claim` and `paper`.")
    for claim in claims:
        label = claim.get("claim", claim) if isinstance(claim, dict) else claim
        if not isinstance(claim, dict) or not claim.get("claim") or "paper" not in claim:
            raise ConfigError(f"{path}: claim {label!r} needs `claim` and `paper`.")
        unknown = set(claim) - CLAIM_KEYS
        if unknown:
            raise ConfigError(f"{path}: claim {label!r} has unknown keys {', '.join(sorted(unknown))} "
                              f"(known: {', '.join(sorted(CLAIM_KEYS))}).")
        compared = "baseline" in claim or "method" in claim
        if "order" in claim:
            order = claim["order"]
            if compared or "ours" in claim or "verdict" in claim or not isinstance(order, list) or len(order) < 2:
                raise ConfigError(f"{path}: claim {label!r} gives an `order`: a list of two or more runs, best first, "
                                  "and no `baseline`/`method`/`ours`/`verdict`.")
            for name in order:
                if _entry(name) not in names:
                    raise ConfigError(f"{path}: claim {label!r} orders {name!r}, but no run is named "
                                      f"{_entry(name)!r}.")
        elif compared:
            gap = claim.get("paper_gap")
            gap_ok = isinstance(gap, (int, float)) and gap != 0 or gap in ("+", "-")
            if not ("baseline" in claim and "method" in claim and gap_ok):
                raise ConfigError(f"{path}: claim {label!r} compares runs, so it needs `baseline`, `method` and a "
                                  "non-zero `paper_gap` (the paper's method − baseline, in points; \"+\" or \"-\" "
                                  "where the paper gives a direction without a number).")
            if "ours" in claim or "verdict" in claim:
                raise ConfigError(f"{path}: claim {label!r} compares runs: its `ours` and `verdict` come from the "
                                  "runs (give a `note` for a remark).")
            for side in ("baseline", "method"):
                if _entry(claim[side]) not in names:
                    raise ConfigError(f"{path}: claim {label!r} names {side} {claim[side]!r}, but no run is named "
                                      f"{_entry(claim[side])!r}.")
        elif not ("ours" in claim and "verdict" in claim):
            raise ConfigError(f"{path}: claim {label!r} needs either `baseline`/`method`/`paper_gap` (computed) or "
                              "`ours` and `verdict` (written from the page's tables).")


def _entry(name: Any) -> str:
    """The run entry a claim's ``entry`` or ``entry@stage`` refers to."""
    return str(name).partition("@")[0]


def accuracies_of(runs: Mapping[str, Sequence[Mapping[str, Any]]], name: str) -> list[float]:
    """Test accuracies in percent of an entry's finished runs, or of one stage of them (``entry@stage``)."""
    entry, _, stage = name.partition("@")
    values = []
    for run in runs.get(entry, []):
        record: Mapping[str, Any] | None = run
        if stage:
            record = next((s for s in run.get("stages") or [] if s.get("stage") == stage), None)
        if record is not None and record.get("test_acc") is not None:
            values.append(100.0 * float(record["test_acc"]))
    return values


def _outcome(baseline: Sequence[float], method: Sequence[float],
             paper_gap: float) -> tuple[float, float | None, bool, bool]:
    """The gap d, its SE (None with one seed a side), whether d has the paper's sign, whether |d| > 2 SE."""
    base, meth = mean_std(baseline), mean_std(method)
    if base is None or meth is None:
        raise ValueError("a verdict needs finished runs on both sides")
    gap = meth[0] - base[0]
    variances = [std ** 2 / n for _, std, n in (base, meth) if std is not None]
    se = math.sqrt(sum(variances)) if variances else None
    agrees = (gap > 0) == (paper_gap > 0) and gap != 0
    return gap, se, agrees, se is not None and abs(gap) > 2 * se


def verdict(baseline: Sequence[float], method: Sequence[float], paper_gap: float) -> tuple[float, float | None, str]:
    """The gap d (method − baseline), its standard error over seeds (None with one seed a side) and the verdict."""
    gap, se, agrees, beyond = _outcome(baseline, method, paper_gap)
    if se is None:
        return gap, None, ("same direction" if agrees else "not reproduced") + " (one seed each: no noise estimate)"
    if agrees:
        return gap, se, "**reproduced**" if beyond else "**same direction, within noise**"
    return gap, se, "**not reproduced, the opposite holds**" if beyond else "**not reproduced, within noise**"


def order_verdict(rows: Sequence[Sequence[float]]) -> str:
    """Whether rows listed best first keep that order: every neighbour pair beyond noise, in sign only, or not."""
    # each row should beat the next: the next is the baseline, this one the method, the paper's gap positive
    pairs = [_outcome(lower, higher, 1.0) for higher, lower in zip(rows, rows[1:])]
    if all(agrees and beyond for _, _, agrees, beyond in pairs):
        return "**reproduced**"
    if all(agrees for _, _, agrees, _ in pairs):
        return "**same order, within noise**"
    return "**not reproduced**"


def _stat(values: Sequence[float]) -> str:
    stat = mean_std(values)
    if stat is None:
        return "–"
    mean, std, n = stat
    return f"{mean:.2f} (n 1)" if std is None else f"{mean:.2f} ± {std:.2f} (n {n})"


def claims_section(claims: Sequence[Mapping[str, Any]], runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    """The page's ``## Claims`` lines: one table row per claim, then the verdict rule."""
    rows = []
    for claim in claims:
        if "baseline" in claim:
            base, meth = (accuracies_of(runs, str(claim[side])) for side in ("baseline", "method"))
            ours = f"{claim['baseline']}: {_stat(base)} → {claim['method']}: {_stat(meth)}"
            paper_gap = claim["paper_gap"]
            paper_text = paper_gap if isinstance(paper_gap, str) else f"{paper_gap:+.2f}"
            if base and meth:
                gap, se, said = verdict(base, meth, -1.0 if paper_gap == "-" else 1.0 if paper_gap == "+" else paper_gap)
                gaps = f"{paper_text} / {gap:+.2f}" + (f" (2 SE {2 * se:.2f})" if se is not None else "")
            else:
                gaps, said = f"{paper_text} / –", "not run yet"
        elif "order" in claim:
            rows_of = [accuracies_of(runs, str(name)) for name in claim["order"]]
            ours = " > ".join(f"{name}: {_stat(values)}" for name, values in zip(claim["order"], rows_of))
            gaps = "–"
            said = order_verdict(rows_of) if all(rows_of) else "not run yet"
        else:
            ours, gaps, said = str(claim["ours"]), "–", str(claim["verdict"])
        if claim.get("note"):
            said += f": {claim['note']}"
        rows.append([str(claim["claim"]), str(claim["paper"]), ours, gaps, said])
    return ["## Claims", "", markdown_table(COLUMNS, rows), "", RULE, ""]
