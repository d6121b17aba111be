"""`distill claims-index`: the README's summary of every results page's Claims table, and its check."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.errors import ConfigError
from distill.tools import claims_index
from distill.tools.claims import claims_section

ROOT = Path(__file__).resolve().parents[1]

PAGE = """# Someone et al. 2030, toy data: a subtitle

Produced by ...

## Claims

| claim | paper | ours (test %, mean ± std, n) | gap, paper / ours (points) | verdict |
|---|---|---|---:|---|
| A beats B | 1 → 2 | b: 50.00 ± 1.00 (n 3) → a: 60.00 ± 1.00 (n 3) | +1.00 / +10.00 (2 SE 1.63) | **reproduced** |
| ranks x \\| y | 3 > 2 | x: 1.00 (n 1) > y: 0.50 (n 1) | – | **same order, within noise**: a note |

Verdicts of the comparisons ...

## Runs

| method | teacher |
|---|---|
| BaselineKD | resnet8 |
"""

README = f"""# A project

Some text.

{claims_index.START}
an old summary
{claims_index.END}

More text.
"""


@pytest.fixture
def project(tmp_path) -> Path:
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "toy.md").write_text(PAGE)
    (tmp_path / "results" / "grid.md").write_text("# A grid without claims\n\n## Runs\n\n| a |\n|---|\n| 1 |\n")
    (tmp_path / "README.md").write_text(README)
    return tmp_path


def _args(project: Path, *extra: str) -> list[str]:
    return ["--results", str(project / "results"), "--readme", str(project / "README.md"), *extra]


def test_the_summary_lists_every_claim_of_every_page_with_its_verdict_and_page(project):
    assert claims_index.main(_args(project)) == 0
    text = (project / "README.md").read_text()
    assert text.startswith("# A project\n\nSome text.\n\n") and text.endswith("\nMore text.\n")
    assert "an old summary" not in text
    summary = text.split(claims_index.START + "\n")[1].split(claims_index.END)[0].splitlines()
    assert summary == [
        "| paper | claim | paper's number | ours (test %, mean ± std, n) | gap, paper / ours | verdict | page |",
        "|---|---|---|---|---|---|---|",
        "| Someone et al. 2030, toy data | A beats B | 1 → 2 | b: 50.00 ± 1.00 (n 3) → a: 60.00 ± 1.00 (n 3) | "
        "+1.00 / +10.00 (2 SE 1.63) | **reproduced** | [toy](results/toy.md) |",
        "|  | ranks x \\| y | 3 > 2 | x: 1.00 (n 1) > y: 0.50 (n 1) | – | **same order, within noise**: a note | "
        "[toy](results/toy.md) |",
    ]  # the page without a Claims table adds no row
    assert claims_index.main(_args(project, "--check")) == 0


def test_a_page_written_by_repro_is_read_back_cell_for_cell(tmp_path):
    claims = [{"claim": "m beats b | really", "paper": "1 → 2", "paper_gap": 1.0, "baseline": "b", "method": "m"}]
    runs = {"b": [{"test_acc": 0.5}, {"test_acc": 0.52}], "m": [{"test_acc": 0.6}, {"test_acc": 0.61}]}
    page = tmp_path / "p.md"
    page.write_text("\n".join(["# P: x", "", *claims_section(claims, runs)]))
    title, rows = claims_index.page_claims(page)
    assert title == "P" and len(rows) == 1
    assert rows[0][0] == "m beats b | really" and rows[0][4] == "**reproduced**"
    assert rows[0][2] == "b: 51.00 ± 1.41 (n 2) → m: 60.50 ± 0.71 (n 2)"


def test_check_fails_when_a_page_changed_and_writes_nothing(project, capsys):
    claims_index.main(_args(project))
    written = (project / "README.md").read_text()
    page = project / "results" / "toy.md"
    page.write_text(page.read_text().replace("| **reproduced** |", "| **same direction, within noise** |"))
    with pytest.raises(SystemExit) as stopped:
        claims_index.main(_args(project, "--check"))
    assert stopped.value.code == 1
    assert "run `distill claims-index`" in capsys.readouterr().err
    assert (project / "README.md").read_text() == written


def test_a_readme_without_its_markers_is_one_error_and_is_left_alone(project):
    (project / "README.md").write_text("# A project\n")
    with pytest.raises(ConfigError, match="needs the two marker lines"):
        claims_index.main(_args(project))
    assert (project / "README.md").read_text() == "# A project\n"


def test_a_claims_row_with_missing_cells_is_one_error_naming_the_page(project):
    page = project / "results" / "toy.md"
    page.write_text(page.read_text().replace("| – | **same order", "| **same order"))
    with pytest.raises(ConfigError, match="toy.md: a Claims row has 4 cells instead of 5"):
        claims_index.main(_args(project))


def test_the_readme_summary_is_the_committed_pages_claims():
    """The README's table is the results pages' Claims tables: a regenerated page needs `distill claims-index`."""
    assert claims_index.main(["--results", str(ROOT / "results"), "--readme", str(ROOT / "README.md"),
                              "--check"]) == 0
