"""The claims section of a results page: computed gaps and verdicts, hand-written rows, and bad claims refused."""

from __future__ import annotations

import math

import pytest

from distill.errors import ConfigError
from distill.tools import claims
from distill.tools.claims import check_claims, claims_section, order_verdict, verdict


def test_verdict_follows_the_two_standard_error_rule():
    base = [60.0, 61.0, 62.0]  # mean 61, sample std 1
    clear = [64.0, 65.0, 66.0]  # mean 65, std 1: d = 4, SE = sqrt(1/3 + 1/3)
    gap, se, said = verdict(base, clear, paper_gap=2.0)
    assert gap == pytest.approx(4.0) and se == pytest.approx(math.sqrt(2 / 3))
    assert said == "**reproduced**"
    assert verdict(base, clear, paper_gap=-1.0)[2] == "**not reproduced, the opposite holds**"
    close = [61.5, 62.0, 62.5]  # mean 62, std 0.5: d = 1 < 2 SE = 2 sqrt(1/3 + 0.25/3) = 1.29
    gap, se, said = verdict(base, close, paper_gap=0.5)
    assert gap == pytest.approx(1.0) and 2 * se == pytest.approx(2 * math.sqrt(1 / 3 + 0.25 / 3))
    assert said == "**same direction, within noise**"
    assert verdict(close, base, paper_gap=0.5)[2] == "**not reproduced, within noise**"
    gap, se, said = verdict([60.0], [61.0], paper_gap=1.0)
    assert se is None and said == "same direction (one seed each: no noise estimate)"


def test_order_verdict_needs_every_neighbour_pair():
    high, middle, low = [64.0, 65.0, 66.0], [61.0, 62.0, 63.0], [58.0, 59.0, 60.0]  # steps of 3 > 2 SE = 1.63
    assert order_verdict([high, middle, low]) == "**reproduced**"
    assert order_verdict([high, [63.5, 64.0, 64.5], low]) == "**same order, within noise**"  # 65 vs 64: 1 < 2 SE
    assert order_verdict([high, low, middle]) == "**not reproduced**"
    assert order_verdict([[61.0], [60.0]]) == "**same order, within noise**"  # one seed each: the sign only


def _run(test_acc, stages=None):
    run = {"test_acc": test_acc}
    if stages:
        run["stages"] = [{"stage": name, "test_acc": acc} for name, acc in stages.items()]
    return run


def test_section_computes_rows_from_runs_and_stages_and_keeps_hand_rows():
    runs = {
        "scratch": [_run(0.60), _run(0.61), _run(0.62)],
        "kd": [_run(0.64), _run(0.65), _run(0.66)],
        "m1": [_run(0.55, {"student": 0.50, "student_assistant": 0.55}),
               _run(0.56, {"student": 0.52, "student_assistant": 0.56})],
    }
    spec = [
        {"claim": "KD beats scratch", "paper": "70.16 → 72.57", "paper_gap": 2.41, "baseline": "scratch",
         "method": "kd", "note": "tau untuned"},
        {"claim": "S+A beats S", "paper": "not given", "paper_gap": "+", "baseline": "m1@student",
         "method": "m1@student_assistant"},
        {"claim": "CNN-4 is the best TA", "paper": "73.51 / 73.15", "ours": "64.0 / 63.6", "verdict": "same order"},
        {"claim": "KD above M.1 above scratch", "paper": "a > b > c", "order": ["kd", "m1", "scratch"]},
        {"claim": "not run", "paper": "1 → 2", "paper_gap": 1.0, "baseline": "scratch", "method": "missing"},
    ]
    lines = claims_section(spec, runs)
    assert lines[0] == "## Claims"
    table = lines[2].splitlines()
    assert table[2] == ("| KD beats scratch | 70.16 → 72.57 | scratch: 61.00 ± 1.00 (n 3) → kd: 65.00 ± 1.00 (n 3) | "
                        f"+2.41 / +4.00 (2 SE {2 * math.sqrt(2 / 3):.2f}) | **reproduced**: tau untuned |")
    # the stage rows: S 50, 52 -> S+A 55, 56, paired by nothing but the seeds' spread
    assert "m1@student: 51.00 ± 1.41 (n 2) → m1@student_assistant: 55.50 ± 0.71 (n 2)" in table[3]
    assert table[3].endswith(f"| + / +4.50 (2 SE {2 * math.sqrt(2 / 2 + 0.5 / 2):.2f}) | **reproduced** |")
    assert table[4] == "| CNN-4 is the best TA | 73.51 / 73.15 | 64.0 / 63.6 | – | same order |"
    assert table[5] == ("| KD above M.1 above scratch | a > b > c | kd: 65.00 ± 1.00 (n 3) > m1: 55.50 ± 0.71 (n 2) > "
                        "scratch: 61.00 ± 1.00 (n 3) | – | **not reproduced** |")
    assert table[6].endswith("| +1.00 / – | not run yet |")
    assert lines[4] == claims.RULE
    worse = claims_section([{"claim": "KD hurts", "paper": "lower", "paper_gap": "-", "baseline": "scratch",
                             "method": "kd"}], runs)[2].splitlines()[2]
    assert worse.endswith("| - / +4.00 (2 SE 1.63) | **not reproduced, the opposite holds** |")


BAD = {
    "unknown run": ({"claim": "c", "paper": "p", "paper_gap": 1, "baseline": "a", "method": "nope"}, "no run is named 'nope'"),
    "unknown stage entry": ({"claim": "c", "paper": "p", "paper_gap": 1, "baseline": "x@student", "method": "a"},
                            "no run is named 'x'"),
    "a word for a gap": ({"claim": "c", "paper": "p", "paper_gap": "up", "baseline": "a", "method": "a"},
                         "non-zero `paper_gap`"),
    "a zero gap": ({"claim": "c", "paper": "p", "paper_gap": 0, "baseline": "a", "method": "a"}, "non-zero `paper_gap`"),
    "no paper gap": ({"claim": "c", "paper": "p", "baseline": "a", "method": "a"}, "non-zero `paper_gap`"),
    "hand verdict on a comparison": ({"claim": "c", "paper": "p", "paper_gap": 1, "baseline": "a", "method": "a",
                                      "verdict": "yes"}, "come from the runs"),
    "neither kind": ({"claim": "c", "paper": "p"}, "either `baseline`"),
    "no paper": ({"claim": "c", "ours": "o", "verdict": "v"}, "needs `claim` and `paper`"),
    "order of one": ({"claim": "c", "paper": "p", "order": ["a"]}, "two or more runs"),
    "order and verdict": ({"claim": "c", "paper": "p", "order": ["a", "a"], "verdict": "v"}, "two or more runs"),
    "order of an unknown run": ({"claim": "c", "paper": "p", "order": ["a", "b"]}, "no run is named 'b'"),
    "typo": ({"claim": "c", "paper": "p", "ours": "o", "verdict": "v", "paper_gpa": 1}, "unknown keys paper_gpa"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_claims_are_one_error(case):
    claim, message = BAD[case]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        check_claims("exp.yaml", [claim], ["a"])
    check_claims("exp.yaml", None, ["a"])  # an experiment without claims is fine
