"""A run's torch thread count: fixed once at its start, recorded in its config, applied before any compute.

A multi-threaded CPU matmul sums in an order that depends on the number of threads, so the same run under
another thread count is a different run: its adapter drifts at rounding level, and an Adam server step turns
rounding-level pseudo-gradients into full steps. A run therefore resolves ``run.threads`` once (0 = the
``OMP_NUM_THREADS`` of the environment if set, else torch's current default), writes the number into its
``config.toml``, and every later process of the run (a resume, a Flower worker, a SuperNode's ClientApp)
applies that number, whatever its own environment says.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from cellm.config import CellmConfig
from cellm.errors import ConfigError


def resolve_threads(requested: int, environ: Mapping[str, str] | None = None) -> int:
    """``requested`` if > 0; else ``OMP_NUM_THREADS`` if set; else torch's current thread count."""
    if requested > 0:
        return requested
    env = os.environ if environ is None else environ
    raw = env.get("OMP_NUM_THREADS", "").strip()
    if raw:
        first = raw.split(",")[0].strip()  # OpenMP allows a list per nesting level; the first is ours
        if not first.isdigit() or int(first) < 1:
            raise ConfigError(f"environment variable OMP_NUM_THREADS={raw!r} is not a positive integer; "
                              "fix it or set run.threads")
        return int(first)
    return max(1, torch.get_num_threads())


def pin_threads(cfg: CellmConfig, environ: Mapping[str, str] | None = None) -> CellmConfig:
    """The same config with ``run.threads`` resolved to a number (unchanged if it already is one)."""
    n = resolve_threads(cfg.run.threads, environ)
    if n == cfg.run.threads:
        return cfg
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, threads=n))


@contextmanager
def using_threads(n: int) -> Iterator[None]:
    """Run the body with ``n`` torch threads, then give the caller back its own count."""
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n} (resolve run.threads first)")
    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
