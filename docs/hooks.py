"""mkdocs build hook: the configuration reference is generated from the config schema, never written by hand.

``configuration.md`` holds the marker below; at build time it is replaced by one table per config table, made
from :func:`cellm.config.describe_fields` (the rows ``cellm config --fields`` prints), so a field added,
renamed or re-documented in the schema shows up in the site without anyone editing the page.
"""

from __future__ import annotations

import ast
from typing import Any

MARKER = "<!-- config-reference -->"
PAGE = "configuration.md"
TOP = "top level"


def _toml_value(default: str) -> str:
    """A default as it would be written in a TOML config (``"bbc"``, ``false``, ``[]``), or as given."""
    try:
        value = ast.literal_eval(default)
    except (ValueError, SyntaxError):
        return default
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return default


def _cell(text: str) -> str:
    """Text that stays inside one Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def config_reference(rows: list[tuple[str, str, str]] | None = None) -> str:
    """The reference as Markdown: a heading and a (key, default, meaning) table per config table."""
    if rows is None:
        from cellm.config import describe_fields

        rows = describe_fields()
    groups: dict[str, list[tuple[str, str, str]]] = {}
    for key, default, help_ in rows:
        groups.setdefault(key.split(".", 1)[0] if "." in key else TOP, []).append((key, default, help_))
    out = []
    for name, members in groups.items():
        out.append(f"### {name}\n")
        out.append("| key | default | meaning |\n|---|---|---|")
        for key, default, help_ in members:
            out.append(f"| `{_cell(key)}` | `{_cell(_toml_value(default))}` | {_cell(help_)} |")
        out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, *, page: Any, config: Any, files: Any) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"{PAGE} lost its marker {MARKER!r}: the config reference would be missing")
    return markdown.replace(MARKER, config_reference())
