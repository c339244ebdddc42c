"""On-disk cache of tokenized federated data, so a second run with the same settings skips parsing and
tokenizing (chit-chat takes seconds to tokenize; a run's first round should not wait for it).

One safetensors file per setting, named by a hash of everything that changes the result plus a format
version. Client splits are stored concatenated with their sizes; names and labels go in the file's JSON
metadata. Files are written to a temporary name in the same folder and renamed, so a crash or a concurrent
run never leaves a half-written file under the final name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cellm.data.types import FederatedData, Split

FORMAT_VERSION = 1
"""Bump whenever parsing, tokenizing, splitting or the file layout changes: old files then stop matching."""

log = logging.getLogger(__name__)


def cache_key(fields: dict[str, Any]) -> str:
    """Stable short hash of the settings (JSON with sorted keys, plus FORMAT_VERSION)."""
    blob = json.dumps({"format": FORMAT_VERSION, **fields}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cache_path(cache_dir: str | os.PathLike[str], name: str, fields: dict[str, Any]) -> Path:
    return Path(cache_dir) / f"{name}-{cache_key(fields)}.safetensors"


def save(path: Path, data: FederatedData, fields: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, then os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    train = Split.concat(data.clients)
    tensors = {
        "train.input_ids": train.input_ids,
        "train.attention_mask": train.attention_mask,
        "train.labels": train.labels,
        "test.input_ids": data.test.input_ids,
        "test.attention_mask": data.test.attention_mask,
        "test.labels": data.test.labels,
    }
    meta = {
        "format": FORMAT_VERSION,
        "fields": fields,
        "task": data.task,
        "num_labels": data.num_labels,
        "label_names": data.label_names,
        "client_names": data.client_names,
        "client_sizes": data.client_sizes(),
        "test_names": data.test_names,
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                  metadata={"cellm": json.dumps(meta, default=str)})
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a cache is as readable as any other output
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path) -> FederatedData:
    """Read a file written by :func:`save`. Raises on a missing, corrupt or foreign file."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {})["cellm"])
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: cache format {meta.get('format')} != {FORMAT_VERSION}")
    t = load_file(str(path))
    train = Split(t["train.input_ids"], t["train.attention_mask"], t["train.labels"])
    offsets = [0]
    for size in meta["client_sizes"]:
        offsets.append(offsets[-1] + int(size))
    if offsets[-1] != len(train):
        raise ValueError(f"{path}: client sizes add up to {offsets[-1]}, file holds {len(train)} examples")
    return FederatedData(
        task=meta["task"],
        num_labels=meta["num_labels"],
        label_names=meta["label_names"],
        clients=[_rows(train, a, b) for a, b in zip(offsets[:-1], offsets[1:], strict=True)],
        client_names=list(meta["client_names"]),
        test=Split(t["test.input_ids"], t["test.attention_mask"], t["test.labels"]),
        test_names=list(meta.get("test_names", [])),
    )


def _rows(split: Split, start: int, stop: int) -> Split:
    return Split(split.input_ids[start:stop], split.attention_mask[start:stop], split.labels[start:stop])


def load_or_build(
    cache_dir: str | os.PathLike[str] | None,
    name: str,
    fields: dict[str, Any],
    build: Callable[[], FederatedData],
) -> FederatedData:
    """The cached data for (name, fields) if present and readable, else ``build()`` (then cached).

    ``cache_dir`` None disables caching. An unreadable file is rebuilt and overwritten, with a warning.
    """
    if cache_dir is None:
        return build()
    path = cache_path(cache_dir, name, fields)
    if path.exists():
        try:
            return load(path)
        except Exception as exc:  # corrupt/foreign file: rebuilding is always safe
            log.warning("ignoring unreadable data cache %s (%s); rebuilding", path, exc)
    data = build()
    save(path, data, fields)
    return data
