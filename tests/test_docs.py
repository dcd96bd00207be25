"""The documentation a reader follows: every link between README.md and the pages of docs/ leads to a file that
exists (and to a heading it has, where the link names one), and README links every page of docs/."""
import re
from pathlib import Path

import pytest

from conftest import REPO_ROOT

PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]

# [text](target): the target up to a space (a title may follow) or the closing parenthesis.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)[^)]*\)")


def without_code_blocks(text: str) -> str:
    # Fenced blocks hold commands and their '#' comments, neither links nor headings.
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def prose(text: str) -> str:
    """The text outside code blocks and inline code, where a [x](y) is a link and not code."""
    return re.sub(r"`[^`\n]*`", "", without_code_blocks(text))


def links(page: Path) -> list[str]:
    return LINK.findall(prose(page.read_text()))


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to hyphens, a
    repeated heading numbered."""
    found: set[str] = set()
    # A heading's inline code is part of its anchor (without the backticks).
    for heading in re.findall(r"^#{1,6} +(.+?) *$", without_code_blocks(page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        unique, count = slug, 1
        while unique in found:
            unique, count = f"{slug}-{count}", count + 1
        found.add(unique)
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO_ROOT)))
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ... (none is checked here)
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no such heading in {linked.name}")
    assert not broken, broken


def test_readme_links_every_page_of_docs():
    linked = {(REPO_ROOT / target.partition("#")[0]).resolve() for target in links(REPO_ROOT / "README.md")}
    pages = set((REPO_ROOT / "docs").glob("*.md"))
    assert pages, "docs/ has no pages"
    assert {page.resolve() for page in pages} <= linked, sorted(
        page.name for page in pages if page.resolve() not in linked)
