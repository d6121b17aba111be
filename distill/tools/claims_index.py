"""``distill claims-index``: every results page's Claims table gathered into one summary table in the README.

The summary is written between two marker lines of the README (:data:`START`, :data:`END`), so the rest of the
README stays hand-written and the summary cannot drift from the pages: it is read from the pages' own
``## Claims`` tables (written by ``distill repro`` from the runs), not from the runs, which a fresh clone lacks.

    distill claims-index                  # rewrite the README's summary from results/*.md
    distill claims-index --check          # exit 1 when the README's summary is not the pages' (for CI)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from distill.errors import ConfigError
from distill.tools.claims import COLUMNS as PAGE_COLUMNS
from distill.tools.report import markdown_table

START = "<!-- claims-index: start (written by `distill claims-index` from results/*.md; edit the pages) -->"
END = "<!-- claims-index: end -->"
COLUMNS = ["paper", "claim", "paper's number", "ours (test %, mean ± std, n)", "gap, paper / ours", "verdict", "page"]


def page_claims(page: Path) -> tuple[str, list[list[str]]]:
    """The page's subject (its title up to the first colon) and its Claims table's rows; no rows without one."""
    lines = page.read_text(encoding="utf-8").splitlines()
    title = lines[0].removeprefix("# ").split(":", 1)[0].strip() if lines else page.stem
    rows: list[list[str]] = []
    if "## Claims" not in lines:
        return title, rows
    table = [line for line in _section(lines, "## Claims") if line.startswith("|")]
    for line in table[2:]:  # after the header and its separator
        # markdown_table escapes a "|" inside a cell as "\\|", which the split on " | " leaves whole
        cells = [cell.strip().replace("\\|", "|") for cell in line.strip().strip("|").split(" | ")]
        if len(cells) != len(PAGE_COLUMNS):
            raise ConfigError(f"{page}: a Claims row has {len(cells)} cells instead of {len(PAGE_COLUMNS)} "
                              f"({' | '.join(PAGE_COLUMNS)}): {line!r}. Rewrite the page with "
                              "`distill repro EXPERIMENT --report-only`.")
        rows.append(cells)
    return title, rows


def _section(lines: list[str], heading: str) -> list[str]:
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start:end]


def summary(results: Path, link_from: Path) -> str:
    """The summary table of every page under ``results`` with a Claims table, pages in name order, links
    relative to ``link_from`` (the README's folder)."""
    rows = []
    for page in sorted(results.glob("*.md")):
        title, claims = page_claims(page)
        link = f"[{page.stem}]({Path(os.path.relpath(page.resolve(), link_from.resolve())).as_posix()})"
        for i, (claim, paper, ours, gap, said) in enumerate(claims):
            rows.append([title if i == 0 else "", claim, paper, ours, gap, said, link])
    if not rows:
        raise ConfigError(f"no results page under {results} has a Claims table: run `distill repro` on an "
                          "experiment whose file lists `claims` first.")
    return markdown_table(COLUMNS, rows, all_text=True)


def with_summary(readme_text: str, table: str, readme: Path) -> str:
    """The README's text with the table between its markers."""
    lines = readme_text.splitlines()
    if lines.count(START) != 1 or lines.count(END) != 1 or lines.index(START) > lines.index(END):
        raise ConfigError(f"{readme} needs the two marker lines, once each and in this order, where the summary "
                          f"goes:\n{START}\n{END}")
    start, end = lines.index(START), lines.index(END)
    return "\n".join(lines[:start + 1] + table.splitlines() + lines[end:]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distill claims-index", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=Path("results"), help="the pages' folder (default: results)")
    parser.add_argument("--readme", type=Path, default=Path("README.md"), help="the file to write (default: README.md)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when the summary is out of date")
    args = parser.parse_args(argv)
    if not args.readme.is_file():
        raise ConfigError(f"{args.readme} does not exist: give the file with the summary markers as --readme.")
    old = args.readme.read_text(encoding="utf-8")
    new = with_summary(old, summary(args.results, args.readme.parent), args.readme)
    if args.check:
        if new != old:
            print(f"{args.readme}: the claims summary is not the pages' Claims tables; run `distill claims-index`.",
                  file=sys.stderr)
            sys.exit(1)
        print(f"{args.readme}: the claims summary matches {args.results}/*.md")
        return 0
    if new != old:
        args.readme.write_text(new, encoding="utf-8")
    print(f"{args.readme}: claims summary {'rewritten' if new != old else 'already up to date'}")
    return 0


__all__ = ["END", "START", "main", "page_claims", "summary", "with_summary"]
