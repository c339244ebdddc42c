"""The configuration page's reference is generated from the config schema at build time (docs/hooks.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

from cellm.config import describe_fields

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _hooks():
    spec = importlib.util.spec_from_file_location("cellm_docs_hooks_ref", DOCS / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _page(src_uri: str) -> SimpleNamespace:
    return SimpleNamespace(file=SimpleNamespace(src_uri=src_uri))


def test_every_schema_field_is_a_row_of_the_reference_with_its_default() -> None:
    reference = _hooks().config_reference()
    rows = [line for line in reference.splitlines() if line.startswith("| `")]
    keys = [key for key, _, _ in describe_fields()]
    assert [row.split("`")[1] for row in rows] == keys
    assert "| `rounds` | `30` |" in reference
    assert '| `model.name` | `"minilm-l6"` |' in reference
    assert "| `comm.error_feedback_up` | `false` |" in reference
    assert "### robust\n" in reference and "### top level\n" in reference


def test_a_pipe_in_a_help_text_stays_inside_its_table_cell() -> None:
    reference = _hooks().config_reference([("comm.x", "1.0", "top-k of |w|"), ("seed", "0", "plain")])
    row = next(line for line in reference.splitlines() if line.startswith("| `comm.x`"))
    assert row == "| `comm.x` | `1.0` | top-k of \\|w\\| |"
    assert row.replace("\\|", "").count("|") == 4


def test_the_hook_fills_the_configuration_page_and_leaves_other_pages_alone() -> None:
    hooks = _hooks()
    page = (DOCS / "configuration.md").read_text()
    built = hooks.on_page_markdown(page, page=_page("configuration.md"), config=None, files=None)
    assert hooks.MARKER not in built and "| `robust.clip_factor` |" in built
    other = "# Other\n" + hooks.MARKER
    assert hooks.on_page_markdown(other, page=_page("usage.md"), config=None, files=None) == other


def test_a_configuration_page_without_the_marker_fails_the_build() -> None:
    with pytest.raises(ValueError, match="marker"):
        _hooks().on_page_markdown("# Configuration\n", page=_page("configuration.md"), config=None, files=None)


def test_the_api_page_names_each_config_table_by_its_dataclass() -> None:
    import dataclasses
    import re

    import cellm.config as config_module
    from cellm.config import CellmConfig

    api = (DOCS / "api.md").read_text()
    listed = dict(re.findall(r"^\| `cellm\.config\.(\w+)` \| `(\w+)` \|", api, flags=re.M))
    tables = {f.name: type(getattr(CellmConfig(), f.name)) for f in dataclasses.fields(CellmConfig)
              if dataclasses.is_dataclass(getattr(CellmConfig(), f.name))}
    assert sorted(listed.values()) == sorted(tables)
    for cls_name, table in listed.items():
        assert getattr(config_module, cls_name) is tables[table], (cls_name, table)


def test_every_top_level_name_of_cellm_is_in_the_api_reference() -> None:
    import re

    import cellm

    api = (DOCS / "api.md").read_text()
    documented = set(re.findall(r"^::: ([\w.]+)", api, flags=re.M))
    missing = [name for name, module in cellm._EXPORTS.items()
               if f"{module}.{name}" not in documented and module not in documented]
    assert not missing, f"docs/api.md documents neither these names nor their modules: {missing}"
