"""Validation, once per load: every field's declared choices and bounds, then the rules that tie fields together.

Each error is a one-line :class:`ConfigError` naming the field and what would fix it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import fields
from typing import Any

from cellm.config.derived import file_spec, known_clients, task_of
from cellm.config.schema import CellmConfig, DataConfig, bounds_text
from cellm.core.codec.spec import ROTATED_VALUES
from cellm.errors import ConfigError
from cellm.models.registry import MODELS

FILES_ONLY = ("path", "test_path", "text_column", "label_column", "prompt_column", "response_column",
              "messages_column", "client_column")
"""The data.* fields that describe the user's files: empty for a packaged dataset."""


def _check(ok: bool, field_name: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config field '{field_name}' {msg}")


def _within(value: float, bounds: dict[str, float]) -> bool:
    return (value >= bounds.get("ge", -math.inf) and value > bounds.get("gt", -math.inf)
            and value <= bounds.get("le", math.inf) and value < bounds.get("lt", math.inf))


def _check_declared(cfg: Any, prefix: str) -> None:
    """Every field's declared choices and bounds (the field metadata): each rule in one place."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            _check_declared(value, f"{prefix}{f.name}.")
        elif "choices" in f.metadata:
            choices = f.metadata["choices"]
            _check(value in choices, prefix + f.name, f"must be one of {', '.join(choices)}; got {value!r}")
        elif "bounds" in f.metadata:
            b = f.metadata["bounds"]
            _check(_within(value, b), prefix + f.name, f"must be {bounds_text(b)}; got {value!r}")


def _validate_files(d: DataConfig) -> None:
    _check(bool(d.path), "data.path", "is empty: data.name = 'files' reads your .jsonl/.csv/.parquet file from it")
    spec = file_spec(d)
    spec.format  # noqa: B018 - raises a ConfigError for an inconsistent set of columns
    kind = spec.partition_kind
    if kind == "natural":
        _check(bool(d.client_column), "data.client_column", "is empty: data.partition = 'natural' needs the "
               "column naming each row's client")
    if kind in ("dirichlet", "shard"):
        _check(bool(d.label_column), "data.label_column", f"is empty: data.partition = '{kind}' splits over the "
               "classes of a label column")


def _validate_clients(cfg: CellmConfig) -> None:
    """fl.clients_per_round against the clients the data loads, where the config tells the number (with 0 and a
    natural partition of files, the run checks it once the data is loaded)."""
    f, d = cfg.fl, cfg.data
    n = known_clients(cfg)
    if n is None:
        return
    if d.num_clients:
        _check(f.clients_per_round <= n, "fl.clients_per_round",
               f"({f.clients_per_round}) must not exceed data.num_clients ({n})")
    else:
        _check(f.clients_per_round <= n, "fl.clients_per_round",
               f"({f.clients_per_round}) must not exceed the {n} clients that data.num_clients = 0 (auto) loads "
               f"here; set data.num_clients")


def _validate_slora(cfg: CellmConfig) -> None:
    s = cfg.slora
    if not s.stage1_rounds:
        return
    _check(s.stage1_rounds < cfg.rounds, "slora.stage1_rounds",
           f"({s.stage1_rounds}) must be below rounds ({cfg.rounds}): stage 2 needs at least one round")
    why = "with slora.stage1_rounds > 0 (stage 2's start is the SVD of stage 1, which clients cannot rebuild)"
    _check(not cfg.comm.init_relative, "comm.init_relative", f"must be false {why}")
    _check(cfg.comm.download_mode == "weights", "comm.download_mode", "must be 'weights' with slora.stage1_rounds > 0")
    _check(cfg.comm.freeze_mask_after == 0, "comm.freeze_mask_after", "must be 0 with slora.stage1_rounds > 0")
    _check(cfg.hetero.mode == "none", "hetero.mode", "must be 'none' with slora.stage1_rounds > 0")
    _check(not cfg.model.freeze_a, "model.freeze_a", f"must be false {why}")


def _validate_rotated(cfg: CellmConfig) -> None:
    k = cfg.comm
    rotated = [f"comm.{f}" for f in ("codec_down", "codec_up") if getattr(k, f) in ROTATED_VALUES]
    b = k.int8_block
    _check(not rotated or b & (b - 1) == 0, "comm.int8_block",
           f"({b}) must be a power of two with {' and '.join(rotated)} rotated (chunks are Hadamard-rotated)")


def _validate_adapter(cfg: CellmConfig) -> None:
    """Features built on LoRA's A and B (their ranks, A alone, an SVD of B A) have no meaning for other adapters."""
    a = cfg.model.adapter
    if a == "lora":
        return
    why = f"with model.adapter = '{a}' (it needs LoRA's A and B matrices)"
    _check(not cfg.model.freeze_a, "model.freeze_a", f"must be false {why}")
    _check(cfg.hetero.mode != "rank", "hetero.mode", f"must not be 'rank' {why}")
    _check(not cfg.slora.stage1_rounds, "slora.stage1_rounds", f"must be 0 {why}")


def _validate_up_support(cfg: CellmConfig) -> None:
    """comm.up_support: the combinations where a shared upload support means something."""
    k = cfg.comm
    if k.up_support_head:
        _check(k.up_support != "topk", "comm.up_support_head", "adds the head to a shared upload support; with "
               "comm.up_support = 'topk' each client picks its own entries: set comm.up_support or leave it false")
        _check(not cfg.slora.stage1_rounds, "comm.up_support_head", "must be false with slora.stage1_rounds > 0 "
               "(the adapter's layout, and so the head's positions, change at the switch)")
    if k.up_support == "server":
        _check(k.download_mode == "weights", "comm.download_mode", "must be 'weights' with comm.up_support = "
               "'server' (the server's choice travels in the one download every client gets)")
    if k.client_freeze:
        _check(k.up_support in ("topk", "download"), "comm.up_support",
               f"must be 'topk' or 'download' with comm.client_freeze (clients train on the download's mask only, "
               f"so a support outside it carries nothing new); got {k.up_support!r}")


def _validate_topk_block(cfg: CellmConfig) -> None:
    """comm.topk_block > 1: block top-k in both directions, where every message's positions are whole blocks."""
    b = cfg.comm.topk_block
    if b == 1:
        return
    _check(not cfg.secagg.enabled, "comm.topk_block", f"({b}) must be 1 with secagg.enabled: secure aggregation "
           "needs a shared upload support, sent as values only")
    _check(cfg.comm.up_support == "topk", "comm.topk_block",
           f"({b}) needs comm.up_support = 'topk' (got {cfg.comm.up_support!r}): a shared support is sent as values "
           "only and is not made of blocks; set comm.topk_block = 1")
    _check(cfg.hetero.mode != "rank", "comm.topk_block",
           f"({b}) needs hetero.mode other than 'rank': a rank tier's entries are not whole blocks; set "
           "comm.topk_block = 1")


def _validate_secagg(cfg: CellmConfig) -> None:
    """secagg.enabled: what the server can no longer do once it sees only the round's sum."""
    if not cfg.secagg.enabled:
        return
    why = "with secagg.enabled (the server sees only the round's sum, never a single upload)"
    _check(cfg.comm.up_support != "topk", "comm.up_support", "must be a shared support (random, download or "
           "download+random) with secagg.enabled: masked vectors add up only over the same positions")
    _check(cfg.fl.clients_per_round >= 2, "fl.clients_per_round", "must be >= 2 with secagg.enabled")
    rb = cfg.robust
    _check(rb.clip_factor == 0 and rb.max_norm == 0, "robust.clip_factor",
           f"and robust.max_norm must be 0 {why}: clients clip each value to secagg.clip instead")
    _check(rb.aggregator == "mean" and rb.min_cosine == -1, "robust.aggregator",
           f"must be 'mean' (and robust.min_cosine -1) {why}")
    _check(cfg.faults.norm_factor == 0, "faults.norm_factor", f"must be 0 {why}")
    _check(cfg.faults.byzantine == 0, "faults.byzantine", f"must be 0 {why}")
    _check(cfg.fl.aggregation == "mean", "fl.aggregation", f"must be 'mean' {why}")
    _check(cfg.dp.noise_multiplier == 0, "dp.noise_multiplier", f"must be 0 {why}: central DP clips each upload "
           "on the server (clipping on the clients before masking is not built yet)")
    _check(cfg.hetero.mode == "none", "hetero.mode", f"must be 'none' {why}: tiers give clients different supports")
    _check(cfg.comm.download_mode == "weights" or cfg.comm.up_support == "random", "comm.download_mode",
           "must be 'weights' with secagg.enabled and a download-based support (delta downloads differ per client)")
    _check(not cfg.slora.stage1_rounds, "slora.stage1_rounds", f"must be 0 {why} (not built for SLoRA's stage 1)")
    k = cfg.secagg.neighbours
    _check(k == 0 or k >= 2, "secagg.neighbours", f"must be 0 (everyone) or >= 2; got {k}")


def validate(cfg: CellmConfig) -> None:
    """Declared choices and bounds, then the rules that tie fields together. Raises ConfigError naming the field."""
    _check_declared(cfg, "")
    m, d, f = cfg.model, cfg.data, cfg.fl
    if d.name == "files":
        _validate_files(d)
    else:
        for name in FILES_ONLY:
            _check(not getattr(d, name), f"data.{name}", f"applies to data.name = 'files' only (data.name is "
                   f"'{d.name}'); leave it empty")
    want = task_of(cfg)
    if not m.path:
        _check(m.name in MODELS, "model.name",
               f"must be one of {', '.join(MODELS)} (or set model.path); got {m.name!r}")
        task = MODELS[m.name].task
        _check(task == want, "data.name",
               f"'{d.name}' is {want} data but model '{m.name}' is a {task} model; pick a matching pair")
    _validate_clients(cfg)
    _validate_slora(cfg)
    _validate_adapter(cfg)
    _validate_rotated(cfg)
    _validate_up_support(cfg)
    _validate_topk_block(cfg)
    _validate_secagg(cfg)
    fa = cfg.faults
    _check(fa.norm_factor == 0 or fa.norm_factor >= 1, "faults.norm_factor",
           f"must be 0 (off) or >= 1; got {fa.norm_factor}")
    rb = cfg.robust
    _check(rb.clip_factor == 0 or rb.clip_factor >= 1, "robust.clip_factor",
           f"must be 0 (off) or >= 1 (below 1 even the median upload would be cut); got {rb.clip_factor}")
    if rb.aggregator != "mean":
        _check(f.aggregation == "mean", "fl.aggregation", f"must be 'mean' with robust.aggregator = "
               f"'{rb.aggregator}' (example-count weights apply to the mean only)")
        _check(cfg.dp.noise_multiplier == 0, "robust.aggregator", "must be 'mean' with differential privacy "
               "(dp.noise_multiplier > 0): the noise is calibrated to a sum of clipped uploads")
    h = cfg.hetero
    if h.mode == "rank":
        _check(m.lora_rank >= 4 ** (h.num_tiers - 1), "hetero.num_tiers",
               f"needs model.lora_rank >= 4^(num_tiers-1) = {4 ** (h.num_tiers - 1)}; got rank {m.lora_rank}")
        _check(cfg.comm.download_mode == "weights", "comm.download_mode",
               "must be 'weights' with hetero.mode = 'rank'")
