"""A run folder: config.toml, metrics.jsonl, checkpoint, adapter/ (PEFT format) and plot.png."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CONFIG, METRICS, CHECKPOINT, ADAPTER, PLOT, SUMMARY, LABELS = (
    "config.toml", "metrics.jsonl", "checkpoint.safetensors", "adapter", "plot.png", "summary.json", "labels.json")
LEGACY_CHECKPOINT = "checkpoint.pt"  # the older pickle format: refused, never unpickled
_TREE_KEY = "cellm.checkpoint"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as data: the message names the file."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_metrics(out: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite metrics.jsonl whole (atomically): after a resume it matches the checkpoint exactly."""
    atomic_write_text(out / METRICS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def read_metrics(out: Path) -> list[dict[str, Any]]:
    with open(out / METRICS) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _flatten(x: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON tree of ``x`` with every tensor replaced by a reference into ``tensors`` (dict keys that are not
    strings, and tuples, are tagged so they come back as they were: an optimizer's state is keyed by int)."""
    if isinstance(x, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = x.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(x, dict):
        if all(isinstance(k, str) for k in x) and not any(k.startswith("__") for k in x):
            return {k: _flatten(v, tensors) for k, v in x.items()}
        return {"__items__": [[_flatten(k, tensors), _flatten(v, tensors)] for k, v in x.items()]}
    if isinstance(x, tuple):
        return {"__tuple__": [_flatten(v, tensors) for v in x]}
    if isinstance(x, list):
        return [_flatten(v, tensors) for v in x]
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"cannot write {type(x).__name__} into a checkpoint")


def _unflatten(x: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(x, dict):
        if set(x) == {"__tensor__"}:
            if x["__tensor__"] not in tensors:
                raise CheckpointError(f"{where}: refers to a tensor {x['__tensor__']!r} it does not hold")
            return tensors[x["__tensor__"]]
        if set(x) == {"__items__"} and isinstance(x["__items__"], list):
            out = {}
            for pair in x["__items__"]:
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise CheckpointError(f"{where}: a malformed dict entry")
                k = _unflatten(pair[0], tensors, where)
                if not isinstance(k, (str, int, float, bool)) and k is not None:
                    raise CheckpointError(f"{where}: a dict key of type {type(k).__name__}")
                out[k] = _unflatten(pair[1], tensors, where)
            return out
        if set(x) == {"__tuple__"} and isinstance(x["__tuple__"], list):
            return tuple(_unflatten(v, tensors, where) for v in x["__tuple__"])
        return {k: _unflatten(v, tensors, where) for k, v in x.items()}
    if isinstance(x, list):
        return [_unflatten(v, tensors, where) for v in x]
    return x


def save_checkpoint(out: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (dicts, lists, tuples, scalars, strings and tensors) as one safetensors file: the tensors
    as tensors, the rest as JSON in its metadata. Atomic: a crash mid-write leaves the previous checkpoint."""
    tensors: dict[str, torch.Tensor] = {}
    tree = json.dumps(_flatten(state, tensors))
    fd, tmp = tempfile.mkstemp(prefix=f".{CHECKPOINT}.", suffix=".tmp", dir=out)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={_TREE_KEY: tree})
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out / CHECKPOINT)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def checkpoint_path(out: Path) -> Path | None:
    """The run folder's checkpoint (a legacy pickle one too, which loading refuses); None when there is none."""
    for name in (CHECKPOINT, LEGACY_CHECKPOINT):
        if (Path(out) / name).exists():
            return Path(out) / name
    return None


def load_checkpoint(out: Path) -> dict[str, Any]:
    """The checkpoint of run folder ``out``, read as data only: no code in the file can run.

    A pickle checkpoint (``checkpoint.pt``, older cellm or crafted) is refused without being opened by pickle.
    """
    path = Path(out) / CHECKPOINT
    if not path.exists() and (Path(out) / LEGACY_CHECKPOINT).exists():
        raise CheckpointError(f"refusing {Path(out) / LEGACY_CHECKPOINT}: a pickle checkpoint (written by an older "
                              "cellm, or crafted) could run code when loaded; cellm reads only "
                              f"{CHECKPOINT} (safetensors + JSON)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except FileNotFoundError:
        raise
    except Exception as exc:  # not a safetensors file: torn, foreign, or a pickle under the new name
        raise CheckpointError(f"refusing {path}: not a cellm checkpoint ({str(exc).splitlines()[0][:200]})") from None
    if _TREE_KEY not in meta:
        raise CheckpointError(f"refusing {path}: a safetensors file without cellm's checkpoint metadata")
    try:
        tree = json.loads(meta[_TREE_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"refusing {path}: its metadata is not JSON ({exc})") from None
    state = _unflatten(tree, tensors, str(path))
    if not isinstance(state, dict):
        raise CheckpointError(f"refusing {path}: its metadata is not a checkpoint")
    return state
