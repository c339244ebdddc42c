"""The embedded simulator: one process, one base model in memory, clients are adapter states.

It only drives rounds: sampling, downloads, client updates, aggregation and the server step are the shared
functions of :mod:`cellm.federated`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from cellm.config import CellmConfig
from cellm.core.dp import epsilon as dp_epsilon
from cellm.data import TASKS, load_federated
from cellm.data.types import FederatedData
from cellm.federated.client import ClientReply, ClientState, client_update
from cellm.federated.faults import arrivals
from cellm.federated.server import (
    RoundOutcome,
    ServerState,
    densities,
    finish_round,
    masked_weights,
    model_weights,
    plan_round,
    tier_factor,
    tier_rank,
    train_spec,
)
from cellm.models.evaluate import evaluate
from cellm.models.flat import FlatView, rank_support
from cellm.models.registry import MODELS, LoadedModel, load_model


@dataclass
class Setup:
    """The loaded pieces of a run: model (with adapter), its flat view, and the federated data."""

    lm: LoadedModel
    flat: FlatView
    data: FederatedData
    w0: torch.Tensor  # the seeded initial adapter, as built here: what init-relative downloads are relative to


def load_setup(cfg: CellmConfig) -> Setup:
    spec = MODELS[cfg.model.name]
    m, d = cfg.model, cfg.data
    num_labels = TASKS[d.name][1]  # a classifier's head is sized by the dataset
    lm = load_model(m.name, lora_rank=m.lora_rank, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                    target_modules=m.target_modules, num_labels=num_labels, seed=cfg.seed, freeze_a=m.freeze_a)
    data = load_federated(
        d.name, lm.tokenizer, spec.tokenizer_id, num_clients=d.num_clients, seq_len=d.seq_len,
        min_client_size=d.min_client_size, dirichlet_alpha=d.dirichlet_alpha, test_fraction=d.test_fraction,
        max_test_examples=d.max_test_examples or None, seed=cfg.seed, cache_dir=d.cache_dir or None,
    )
    if data.num_labels != num_labels:
        raise ValueError(f"dataset {d.name} has {data.num_labels} classes, expected {num_labels}")
    flat = FlatView(lm.model)
    return Setup(lm, flat, data, flat.get())


def evaluate_vector(setup: Setup, vec: torch.Tensor, cfg: CellmConfig) -> dict[str, float]:
    setup.flat.set(vec)
    return evaluate(setup.lm.model, setup.data.test, setup.lm.task, cfg.eval.batch_size)


def tier_supports(cfg: CellmConfig, flat: FlatView) -> dict[int, torch.Tensor] | None:
    if cfg.hetero.mode != "rank":
        return None
    return {i: rank_support(flat, tier_rank(cfg, i)) for i in range(cfg.hetero.num_tiers)}


def evaluate_state(setup: Setup, state: ServerState, cfg: CellmConfig, round_: int) -> dict[str, float]:
    """The global masked model's metrics, plus each tier's own masked model when clients are tiered."""
    out = evaluate_vector(setup, model_weights(state, cfg, round_), cfg)
    if cfg.hetero.mode != "none":
        supports = tier_supports(cfg, setup.flat) or {}
        d_down, _ = densities(cfg, round_)
        for i in range(cfg.hetero.num_tiers):
            dd = d_down * tier_factor(cfg, i) if cfg.hetero.mode == "density" else d_down
            vec = masked_weights(state, cfg, round_, dd, supports.get(i))
            for k, v in evaluate_vector(setup, vec, cfg).items():
                out[f"tier{i}.{k}"] = v
    return out


@dataclass
class Simulator:
    """Holds the per-client state that clients keep between rounds (only when a mode needs it)."""

    cfg: CellmConfig
    setup: Setup
    client_states: dict[int, ClientState] = field(default_factory=dict)

    def supports(self) -> dict[int, torch.Tensor] | None:
        """Rank tiers' supports over the flat vector (None unless hetero.mode = 'rank')."""
        return tier_supports(self.cfg, self.setup.flat)

    def run_clients(self, plan, arrived: list[int]) -> dict[int, ClientReply]:
        """Train the clients that will reply in time. Failed and late clients do no work here, so their kept
        state (residuals) does not move: in effect their round never happened."""
        spec = train_spec(self.cfg)
        replies = {}
        for c in arrived:
            st = self.client_states.get(c, ClientState())
            reply, new_state = client_update(self.setup.lm.model, self.setup.flat, self.setup.data.clients[c],
                                             plan.tasks[c], spec, st, seed=self.cfg.seed, w0=self.setup.w0)
            if new_state.residual is not None or new_state.copy is not None:
                self.client_states[c] = new_state
            replies[c] = reply
        return replies

    def round(self, state: ServerState) -> RoundOutcome:
        t0 = time.perf_counter()
        plan = plan_round(state, self.cfg, self.supports())
        plan_s = time.perf_counter() - t0
        fa = self.cfg.faults
        arrived, failed, late = arrivals(self.cfg.seed, plan.round, plan.clients, fa.failure_prob,
                                         fa.deadline_s, fa.client_time_s, fa.time_sigma)
        replies = self.run_clients(plan, arrived)
        missing = {c: "failed" for c in failed} | {c: "late" for c in late}
        t0 = time.perf_counter()
        outcome = finish_round(state, self.cfg, plan, replies, missing)
        # time in masks, coding, decoding, aggregation and the server step (not training, not evaluation)
        outcome.overhead_s = plan_s + (time.perf_counter() - t0) + sum(
            r.extra.get("codec_s", 0.0) for r in replies.values())
        return outcome


def metrics_row(state: ServerState, outcome: RoundOutcome | None, wall_s: float, round_s: float,
                eval_metrics: dict[str, float] | None, cfg: CellmConfig) -> dict[str, Any]:
    t = state.round
    row: dict[str, Any] = {"round": t}
    row.update(state.ledger.round_totals(t))
    row["cum_bytes"] = state.ledger.cum_bytes(t)
    d_down, d_up = densities(cfg, max(t, 1))
    row["d_down"], row["d_up"] = d_down, d_up
    row["train_loss"] = None if outcome is None or outcome.train_loss != outcome.train_loss else outcome.train_loss
    if outcome is not None:
        row["clients"] = sorted(outcome.accepted + list(outcome.rejected) + list(outcome.missing))
        row["accepted"] = len(outcome.accepted)
        row["rejected"] = len(outcome.rejected)
        row["failed"] = sum(1 for v in outcome.missing.values() if v == "failed")
        row["late"] = sum(1 for v in outcome.missing.values() if v == "late")
        row["applied"] = outcome.applied
        row["overhead_s"] = round(outcome.overhead_s, 4)
    if cfg.dp.noise_multiplier > 0:
        row["epsilon"] = dp_epsilon(cfg.dp.noise_multiplier, cfg.fl.clients_per_round / cfg.data.num_clients,
                                    t, cfg.dp.delta)
    row["wall_s"] = round(wall_s, 3)
    row["round_s"] = round(round_s, 3)
    if eval_metrics is not None:
        row["eval"] = eval_metrics
    return row


def simulate(cfg: CellmConfig, setup: Setup, state: ServerState | None = None,
             on_round: Callable[[ServerState, dict[str, Any]], None] | None = None,
             sim: Simulator | None = None) -> ServerState:
    """Run rounds until cfg.rounds; call ``on_round(state, row)`` after each (and after round 0's evaluation)."""
    t0 = time.perf_counter()
    if state is None:
        state = ServerState.initial(setup.w0)
    sim = sim or Simulator(cfg, setup)
    if state.round == 0 and not state.metrics:
        ev = evaluate_state(setup, state, cfg, 1)
        row = metrics_row(state, None, time.perf_counter() - t0, 0.0, ev, cfg)
        state.metrics.append(row)
        if on_round:
            on_round(state, row)
    offset = state.metrics[-1]["wall_s"] if state.metrics else 0.0
    while state.round < cfg.rounds:
        r0 = time.perf_counter()
        outcome = sim.round(state)
        t = state.round
        ev = None
        e0 = time.perf_counter()
        if t % cfg.fl.eval_every == 0 or t == cfg.rounds:
            ev = evaluate_state(setup, state, cfg, t + 1)
        now = time.perf_counter()
        row = metrics_row(state, outcome, offset + now - t0, now - r0, ev, cfg)
        row["eval_s"] = round(now - e0, 3)
        state.metrics.append(row)
        if on_round:
            on_round(state, row)
    return state
