"""The README and the docs pages link only to files and headings that exist, as GitHub resolves them.

``make docs`` (mkdocs --strict) checks the site; this checks what GitHub shows: the README lies outside the
site, and a link that works in one place must work in the other.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _hooks():
    spec = importlib.util.spec_from_file_location("cellm_docs_hooks", DOCS / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a ``# comment`` in a shell block is no heading)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def github_slug(heading: str) -> str:
    """GitHub's id for a heading: inline markup dropped, lower case, punctuation removed, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = path.read_text()
    hooks = _hooks()
    if hooks.MARKER in text:  # the generated reference's headings are part of the page on the site
        text = text.replace(hooks.MARKER, hooks.config_reference())
    seen: dict[str, int] = {}
    out = set()
    for line in _prose_lines(text):
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(path: Path) -> list[str]:
    return [m.group(1) for line in _prose_lines(path.read_text()) for m in LINK.finditer(line)]


PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_a_file_and_heading_that_exist(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with id '{anchor}' in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_slug_rule_matches_githubs_ids_for_headings_with_punctuation() -> None:
    assert github_slug("Robust aggregation: one bad client cannot take the model") == (
        "robust-aggregation-one-bad-client-cannot-take-the-model")
    assert github_slug("The demo's result") == "the-demos-result"
    assert github_slug("What is the same, what differs from `cellm run`") == (
        "what-is-the-same-what-differs-from-cellm-run")
    assert github_slug("BBC + MiniLM-L6") == "bbc--minilm-l6"


def test_a_link_to_a_missing_heading_is_reported(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# Title\n\n## Known part\n\n```\n# not a heading\n```\n")
    assert anchors(tmp_path / "a.md") == {"title", "known-part"}
    assert "not-a-heading" not in anchors(tmp_path / "a.md")


def test_the_readme_keeps_the_two_setup_commands_and_ci_runs_them_then_the_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make demo    # set up .venv from nothing" in readme
    assert "make test    # set up .venv from nothing (if needed)" in readme
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert ci.index("make test") < ci.index("make docs")
