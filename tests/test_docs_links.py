"""Every relative link in README.md and docs/*.md reaches an existing file, and every ``#anchor`` a heading of
its page under GitHub's slug rules (the heading's text without markup, lower-cased, characters other than
letters, marks, numbers, ``_``, spaces and hyphens removed, spaces made hyphens, repeats numbered)."""

from __future__ import annotations

import os
import re
import unicodedata

from conftest import REPO

LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def strip_fences(lines: list[str]) -> list[tuple[int, str]]:
    out, fenced = [], False
    for number, line in enumerate(lines, 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, line))
    return out


def rendered(text: str) -> str:
    text = LINK.sub(lambda m: m.group(1), text)        # [text](url) -> text
    text = re.sub(r"`([^`]*)`", r"\1", text)           # `code` -> code
    text = re.sub(r"(\*\*|__|\*|_)(\S(?:.*?\S)?)\1", r"\2", text)  # emphasis
    return text.strip()


def slug(heading: str) -> str:
    keep = []
    for ch in rendered(heading).lower():
        cat = unicodedata.category(ch)
        if ch in " -" or cat[0] in "LMN" or cat == "Pc":
            keep.append(ch)
    return "".join(keep).replace(" ", "-")


def anchors(path: str) -> set[str]:
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    seen: dict[str, int] = {}
    out = set()
    for _, line in strip_fences(lines):
        m = re.match(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        out.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
        # explicit HTML anchors are not used in these pages
    return out



def broken_links(pages: list[str], root=REPO) -> tuple[int, list[str]]:
    cache: dict[str, set[str]] = {}
    checked, broken = 0, []
    for page in pages:
        with open(page, encoding="utf-8") as f:
            lines = f.read().splitlines()
        for number, line in strip_fences(lines):
            scan = re.sub(r"(?<!\[)`[^`]*`(?!\])", "``", line)  # code spans are not links; [`code`](x) is
            for m in LINK.finditer(scan):
                target = m.group(2)
                if re.match(r"^(https?:|mailto:)", target):
                    continue
                checked += 1
                file_part, _, anchor = target.partition("#")
                full = page if not file_part else os.path.normpath(os.path.join(os.path.dirname(page), file_part))
                where = f"{os.path.relpath(page, root)}:{number}: {target}"
                if os.path.relpath(full, root).split(os.sep)[0] == ".." or not os.path.exists(full):
                    broken.append(f"{where} (no such file or folder in the repository)")
                elif anchor:
                    if full not in cache:
                        cache[full] = anchors(full) if full.endswith(".md") else set()
                    if anchor not in cache[full]:
                        broken.append(f"{where} (no heading #{anchor})")
    return checked, broken


def test_every_relative_link_and_anchor_in_the_docs_resolves():
    pages = [str(REPO / "README.md"), *sorted(str(p) for p in (REPO / "docs").glob("*.md"))]
    checked, broken = broken_links(pages)
    assert checked > 50 and not broken, "\n".join(broken)


def test_the_checker_finds_a_broken_file_and_a_broken_anchor(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A heading\n\n[ok](#a-heading) [gone](#no-such) [file](missing.md)\n")
    _, broken = broken_links([str(page)], tmp_path)
    assert len(broken) == 2 and "#no-such" in broken[0] and "missing.md" in broken[1]
