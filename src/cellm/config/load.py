"""Loading: a preset, then a TOML file or a dict, then ``key=value`` overrides, typed against the schema.

Unknown keys and wrong types raise :class:`ConfigError` naming the key; the result is validated once.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from cellm.config.schema import CellmConfig
from cellm.config.validation import validate
from cellm.errors import ConfigError

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"  # package data: cellm/presets/*.toml


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """A TOML file as a dict; a missing or malformed file is a ConfigError naming it (``what``: config, sweep)."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{what} file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} file {path} is not valid TOML: {exc}") from None


def _coerce(path: str, value: Any, typ: Any) -> Any:
    origin = get_origin(typ)
    if origin is list:
        (inner,) = get_args(typ)
        if not isinstance(value, list):
            raise ConfigError(f"config field '{path}' must be a list of {inner.__name__}, got {value!r}")
        return [_coerce(f"{path}[{i}]", v, inner) for i, v in enumerate(value)]
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"config field '{path}' must be {typ.__name__}, got {type(value).__name__} {value!r}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config table '{prefix.rstrip('.')}' must be a table, got {data!r}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(
                f"unknown config key '{prefix}{key}' (valid keys here: {', '.join(sorted(known))})"
            )
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            kwargs[f.name] = _build(typ, data[f.name], f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _coerce(prefix + f.name, data[f.name], typ)
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects key=value (e.g. comm.up_density=0.25), got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare strings: --set data.name=bbc
    return key.split("."), value


def merge(base: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``value`` at the dotted ``path`` of a config tree, making tables on the way."""
    node = base
    for part in path[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"config key '{'.'.join(path)}': '{part}' is not a table")
        node = nxt
    node[path[-1]] = value


def _deep_update(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _deep_update(dst[key], value)
        else:
            dst[key] = value


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def preset_dict(name: str) -> dict[str, Any]:
    path = PRESET_DIR / f"{name}.toml"
    if not path.exists():
        raise ConfigError(f"unknown preset '{name}' (available: {', '.join(presets())})")
    return read_toml(path, "preset")


def load_config(
    path: str | Path | None = None,
    *,
    preset: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    data: dict[str, Any] | None = None,
) -> CellmConfig:
    """Build a validated config: preset (default 'demo' when no file or dict is given), then file, then --set."""
    tree: dict[str, Any] = {}
    if preset is not None or (path is None and data is None):
        tree = preset_dict(preset or "demo")
    layers = []
    if path is not None:
        layers.append(read_toml(Path(path), "config"))
    if data is not None:
        layers.append(data)
    for layer in layers:
        _deep_update(tree, layer)
    for item in overrides:
        keys, value = _parse_override(item)
        merge(tree, keys, value)
    cfg = _build(CellmConfig, tree)
    validate(cfg)
    return cfg
