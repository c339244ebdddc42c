"""Which files a SuperNode reads and writes: its own choice, never the server's.

A run's cellm config reaches every SuperNode in the setup message. Were a node to obey the paths in it, a hostile
or compromised server could make the node train on any file it can read (whose content then leaks through the
uploads) and write caches and state wherever it chose. So the node takes every path from its own node config
(``flower-supernode --node-config '...'``, or the environment of its process):

====================  ===============================  ===================================================
node config key       environment fallback             what
====================  ===============================  ===================================================
``model-path``        ``CELLM_NODE_MODEL_PATH``        the model, when the run sets ``model.path``
``data-path``         ``CELLM_NODE_DATA_PATH``         the data file, when the run sets ``data.path``
``data-test-path``    ``CELLM_NODE_DATA_TEST_PATH``    the held-out file, when the run sets ``data.test_path``
``cache-dir``         ``CELLM_NODE_CACHE_DIR``         tokenized-data and model cache ("" = none; default
                                                       ``.cellm-cache`` in the node's working directory)
``state-dir``         ``CELLM_NODE_STATE_DIR``         clients' state between rounds (read by the ClientApp;
                                                       default ``<cache-dir>/node-state``)
====================  ===============================  ===================================================

On the wire, each of ``model.path``, ``data.path`` and ``data.test_path`` is either ``""`` (a packaged asset:
``model.name`` / ``data.name``) or the reference ``"node-config:<key>"`` to the node's own key above, and
``data.cache_dir`` is ``""`` or ``"node-config:cache-dir"``; :func:`for_nodes` writes the server's config that way.
A node refuses anything else (a filesystem path) with an error naming the field, which the server logs as the
node's setup refusal. The node's files must hold what the server's do (same model, same rows): every party
partitions the same data the same way.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import tomli_w

from cellm.config import CellmConfig
from cellm.errors import ConfigError

REF = "node-config:"
DEFAULT_CACHE_DIR = ".cellm-cache"
# run config field (section, name) -> the node config key that names it on the node
FIELDS: dict[tuple[str, str], str] = {("model", "path"): "model-path", ("data", "path"): "data-path",
                                      ("data", "test_path"): "data-test-path", ("data", "cache_dir"): "cache-dir"}
CACHE_FIELD = ("data", "cache_dir")
MAX_PATH_CHARS = 4096


class NodePathError(ConfigError):
    """The run's config names a path the node does not take from the server, or one its node config lacks."""


def env_name(key: str) -> str:
    """The environment variable a node reads when its node config lacks ``key`` (``model-path`` ->
    ``CELLM_NODE_MODEL_PATH``)."""
    return "CELLM_NODE_" + key.upper().replace("-", "_")


def node_value(node_config: Mapping[str, Any], key: str) -> str | None:
    """The node's own setting for ``key``: its node config, else its environment; None when neither sets it."""
    raw = node_config.get(key)
    if raw is None:
        raw = os.environ.get(env_name(key))
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise NodePathError(f"node config '{key}' must be a path (a string), got {type(raw).__name__} {raw!r}")
    if len(raw) > MAX_PATH_CHARS or "\x00" in raw:
        raise NodePathError(f"node config '{key}' is not a usable path")
    return raw


def for_nodes(cfg: CellmConfig) -> str:
    """The config TOML the server sends its nodes: every path it sets becomes a reference to the node's own key,
    so the server's paths (which mean nothing on other machines) never reach a node."""
    data = cfg.to_dict()
    for (section, name), key in FIELDS.items():
        if (section, name) == CACHE_FIELD:
            data[section][name] = REF + key  # not part of the algorithm: always the node's choice
        elif data[section][name]:
            data[section][name] = REF + key
    return tomli_w.dumps(data)


def resolve(run_config: dict[str, Any], node_config: Mapping[str, Any]) -> dict[str, Any]:
    """The run's config (parsed TOML, as the server sent it) with every path replaced by the node's own.

    Raises :class:`NodePathError`, naming the field, when the server sent a filesystem path, a reference to another
    key, or a reference to a key this node does not set. Returns a new dict; ``run_config`` is not changed.
    """
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in run_config.items()}
    for (section, name), key in FIELDS.items():
        field = f"{section}.{name}"
        table = out.get(section, {})
        if not isinstance(table, dict):
            raise NodePathError(f"the run config's '{section}' must be a table")
        sent = table.get(name, "")
        if not isinstance(sent, str):
            raise NodePathError(f"the run config's {field} must be a string, got {type(sent).__name__}")
        ref = REF + key
        if sent not in ("", ref):
            raise NodePathError(
                f"the run config's {field} names a path ({sent[:80]!r}); this node reads its files only from its "
                f"own node config: the server may send \"\" (a packaged asset) or {ref!r} "
                f"(the node's '{key}', set with flower-supernode --node-config '{key}=...')")
        own = node_value(node_config, key)
        if (section, name) == CACHE_FIELD:
            table[name] = DEFAULT_CACHE_DIR if own is None else own
        elif sent == ref:
            if not own:
                raise NodePathError(
                    f"the run's {field} is this node's '{key}', which its node config does not set: start the node "
                    f"with flower-supernode --node-config '... {key}=/path/on/this/machine' "
                    f"(or set {env_name(key)})")
            table[name] = own
        if section in out or table:
            out[section] = table
    return out
