"""A run folder: config.toml, metrics.jsonl, checkpoint, adapter/ (PEFT format) and plot.png."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

CONFIG, METRICS, CHECKPOINT, ADAPTER, PLOT, SUMMARY, LABELS = (
    "config.toml", "metrics.jsonl", "checkpoint.pt", "adapter", "plot.png", "summary.json", "labels.json")


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


def save_checkpoint(out: Path, state: dict[str, Any]) -> None:
    tmp = out / f".{CHECKPOINT}.tmp"
    torch.save(state, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, out / CHECKPOINT)


def load_checkpoint(out: Path) -> dict[str, Any]:
    return torch.load(out / CHECKPOINT, weights_only=False)
