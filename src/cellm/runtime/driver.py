"""The round loop, written once. Both runtimes drive rounds through :func:`drive`; they differ only in the
:class:`ClientRunner` that executes the sampled clients (in process, or as Flower messages to SuperNodes).

A round: plan (sample, densities, encode downloads), simulated faults, run the clients that arrive, finish
(decode strictly, aggregate, server step), evaluate when due, append the metrics row, call ``on_round``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch

from cellm.config import CellmConfig
from cellm.core.codec import HARD_MAX_N, CodecError, decode, encode
from cellm.core.dp import epsilon as dp_epsilon
from cellm.core.secagg import (
    SecAggAbort,
    SecAggError,
    SecAggParams,
    server_route_keys,
    server_route_shares,
    server_sum,
    server_unmask_request,
)
from cellm.core.support import head_mask
from cellm.errors import ConfigError
from cellm.federated import secure
from cellm.federated.faults import ATTACK_NOISE, arrivals, attack, attackers
from cellm.federated.messages import ClientReply
from cellm.federated.seeds import derive
from cellm.federated.server import (
    RoundOutcome,
    RoundPlan,
    ServerState,
    densities,
    finish_round,
    finish_secure_round,
    masked_weights,
    model_weights,
    plan_round,
    round_support,
    tier_factor,
    tier_rank,
)
from cellm.models.evaluate import evaluate
from cellm.models.flat import FlatView, rank_support
from cellm.runtime import stages
from cellm.runtime.setup import Setup

log = logging.getLogger("cellm")
OnRound = Callable[[ServerState, dict[str, Any]], None]


class ClientRunner(Protocol):
    """How a runtime executes the clients of a round."""

    def prepare(self) -> None:
        """Called before each round (Flower: set up SuperNodes that joined since)."""

    def available_clients(self) -> list[int] | None:
        """The clients that can be reached this round (None: all of them); only these are sampled."""

    def run_clients(self, plan: RoundPlan, arrived: list[int]) -> tuple[dict[int, ClientReply], dict[int, str]]:
        """Run the clients in ``arrived``; return their replies and the clients lost on the way
        ("failed" or "late"). Clients the simulated faults drop are not in ``arrived``. A runtime that wraps
        payloads in its own messages may set ``self.transport`` to the (down, up) bytes of the round's messages."""

    def secure_advertise(self, round_: int, params: SecAggParams, clients: list[int]) -> dict[int, bytes]:
        """Secure aggregation only: stage 1 of round ``round_`` on ``clients`` (their public keys, by client)."""

    def secure_share(self, keys: dict[int, bytes]) -> dict[int, bytes]:
        """Secure aggregation only: stage 2 (each client's encrypted shares, given its neighbours' keys)."""

    def secure_unmask(self, requests: dict[int, bytes]) -> dict[int, bytes]:
        """Secure aggregation only: stage 4 (each asked client's shares that remove the round's masks)."""


def evaluate_vector(setup: Setup, vec: torch.Tensor, cfg: CellmConfig) -> dict[str, float]:
    setup.flat.set(vec)
    return evaluate(setup.loaded.model, setup.data.test, setup.loaded.task, cfg.eval.batch_size, cfg.run.precision)


def tier_supports(cfg: CellmConfig, flat: FlatView) -> dict[int, torch.Tensor] | None:
    """Rank tiers' supports over the flat vector (None unless hetero.mode = 'rank')."""
    if cfg.hetero.mode != "rank":
        return None
    return {i: rank_support(flat, tier_rank(cfg, i)) for i in range(cfg.hetero.num_tiers)}


def evaluate_state(setup: Setup, state: ServerState, cfg: CellmConfig, round_: int) -> dict[str, float]:
    """The global model's metrics, plus each tier's own masked model when clients are tiered."""
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


def metrics_row(state: ServerState, outcome: RoundOutcome | None, wall_s: float, round_s: float,
                eval_metrics: dict[str, float] | None, cfg: CellmConfig) -> dict[str, Any]:
    t = state.round
    row: dict[str, Any] = {"round": t}
    row.update(state.ledger.round_totals(t))
    row["cum_bytes"] = state.ledger.cum_bytes(t)
    d_down, d_up = densities(cfg, max(t, 1))
    row["d_down"], row["d_up"] = d_down, d_up
    loss = None if outcome is None else outcome.train_loss
    row["train_loss"] = None if loss is None or math.isnan(loss) else loss
    if outcome is not None:
        row["clients"] = sorted(outcome.accepted + list(outcome.rejected) + list(outcome.missing))
        row["accepted"] = len(outcome.accepted)
        row["rejected"] = len(outcome.rejected)
        row["failed"] = sum(1 for v in outcome.missing.values() if v == "failed")
        row["late"] = sum(1 for v in outcome.missing.values() if v == "late")
        row["applied"] = outcome.applied
        if cfg.robust.clip_factor > 0 or cfg.robust.max_norm > 0:
            row["clipped"] = outcome.clipped
        if cfg.faults.byzantine > 0:
            row["attacked"] = outcome.attacked
        row["overhead_s"] = round(outcome.overhead_s, 4)
        if outcome.transport is not None:  # the runtime's messages around the payloads (Flower)
            row["down_transport_bytes"], row["up_transport_bytes"] = outcome.transport
    if cfg.dp.noise_multiplier > 0:
        row["epsilon"] = dp_epsilon(cfg.dp.noise_multiplier, cfg.fl.clients_per_round / cfg.data.num_clients,
                                    t, cfg.dp.delta)
    if state.stage:
        row["stage"] = state.stage
    row["wall_s"] = round(wall_s, 3)
    row["round_s"] = round(round_s, 3)
    if eval_metrics is not None:
        row["eval"] = eval_metrics
    return row


def simulate_attacks(cfg: CellmConfig, plan: RoundPlan, replies: dict[int, ClientReply]) -> list[int]:
    """faults.byzantine: replace the chosen clients' uploads by hostile ones made from their honest uploads (an
    attacker is not bound to the configured value codec: what it cannot carry is sent as fp32). Returns the
    clients whose upload was replaced."""
    fa = cfg.faults
    chosen = [c for c in attackers(cfg.seed, plan.round, plan.clients, fa.byzantine) if c in replies]
    for c in chosen:
        reply, task = replies[c], plan.tasks[c]
        try:
            honest = decode(reply.payload, max_n=HARD_MAX_N)  # the honest upload, made by this process
        except CodecError:
            continue
        gen = torch.Generator().manual_seed(derive(cfg.seed, plan.round, c, ATTACK_NOISE))
        bad = attack(honest, fa.attack, fa.attack_scale, gen)
        try:
            payload = encode(bad, task.codec_up)
        except ValueError:
            payload = encode(bad, dataclasses.replace(task.codec_up, values="fp32"))
        replies[c] = dataclasses.replace(reply, payload=payload)
    return chosen


def play_round(state: ServerState, cfg: CellmConfig, supports: dict[int, torch.Tensor] | None,
               runner: ClientRunner, sizes: list[int] | None = None, head: torch.Tensor | None = None) -> RoundOutcome:
    """One round with ``runner`` executing the clients; ``overhead_s`` is the time in masks, coding, decoding,
    aggregation and the server step (not training, not evaluation). ``cfg`` is the round's stage config;
    ``sizes`` the clients' partition sizes as the server knows them (weighted aggregation); ``head`` the
    classifier head's entries (comm.up_support_head)."""
    t0 = time.perf_counter()
    plan = plan_round(state, cfg, supports, runner.available_clients(), head)
    plan_s = time.perf_counter() - t0
    fa = cfg.faults  # simulated faults, derived from (seed, round, client): the same in every runtime
    arrived, failed, late = arrivals(cfg.seed, plan.round, plan.clients, fa.failure_prob, fa.deadline_s,
                                     fa.client_time_s, fa.time_sigma)
    missing = {c: "failed" for c in failed} | {c: "late" for c in late}
    if cfg.secagg.enabled:
        return play_secure_round(state, cfg, plan, runner, arrived, missing, plan_s)
    replies, lost = runner.run_clients(plan, arrived)
    attacked = simulate_attacks(cfg, plan, replies)
    t0 = time.perf_counter()
    outcome = finish_round(state, cfg, plan, replies, {**missing, **lost},
                           None if sizes is None else dict(enumerate(sizes)))
    outcome.attacked = attacked
    outcome.transport = getattr(runner, "transport", None)
    outcome.overhead_s = plan_s + (time.perf_counter() - t0) + _client_codec_s(replies)
    return outcome


def _client_codec_s(replies: dict[int, ClientReply]) -> float:
    """The clients' own coding time, as they report it: used only if sane."""
    return sum(float(v) for r in replies.values()
               if isinstance(v := r.extra.get("codec_s"), int | float) and 0 <= v < 1e6)


def play_secure_round(state: ServerState, cfg: CellmConfig, plan: RoundPlan, runner: ClientRunner,
                      arrived: list[int], missing: dict[int, str], plan_s: float) -> RoundOutcome:
    """A round under secure aggregation (SecAgg+, :mod:`cellm.core.secagg`): keys and shares before training,
    masked uploads, then unmasking; the server gets the sum over the clients whose masked upload arrived.

    The sampled clients advertise keys and share their secrets first; the simulated faults then drop clients
    after that (a failed client never sends its masked vector, whose masks the others' shares remove). Every
    protocol message is in the ledger (part "secagg"); a malformed masked vector is refused and treated as a
    dropout. If too few clients remain for the threshold, the round leaves the model unchanged: the server never
    falls back to reading single uploads.
    """
    t, ledger = plan.round, state.ledger
    support = round_support(plan)
    if support is None:
        raise ConfigError("secure aggregation needs one upload support shared by the round's clients; this "
                          "round's clients have different ones (comm.up_support, tiers or delta downloads)")
    if len(plan.clients) < 2:
        raise RuntimeError(f"round {t}: secure aggregation needs at least 2 clients, {len(plan.clients)} sampled")
    t0 = time.perf_counter()
    params = secure.round_params(cfg, t, plan.clients, int(support.numel()))
    ads = runner.secure_advertise(t, params, plan.clients)
    secure.record(ledger, t, ads)
    try:
        server_keys, keys = server_route_keys(params, ads)
        secure.record(ledger, t, keys)
        shares = runner.secure_share(keys)
        secure.record(ledger, t, shares)
        server_shares, routed = server_route_shares(server_keys, shares)
        secure.record(ledger, t, routed)
    except SecAggAbort as exc:  # too few clients answered before training: nobody trains, nothing moves
        log.warning("round %d: secure aggregation aborted before training (%s); the model is unchanged", t, exc)
        outcome = finish_secure_round(state, cfg, plan, {}, support, None, [], {}, missing)
        outcome.overhead_s = plan_s + time.perf_counter() - t0
        return outcome
    plan.tasks = {c: dataclasses.replace(task, secagg_routed=routed.get(c, b"")) for c, task in plan.tasks.items()}
    setup_s = time.perf_counter() - t0
    replies, lost = runner.run_clients(plan, [c for c in arrived if c in routed])
    t0 = time.perf_counter()
    refused: dict[int, str] = {}
    masked = {}
    for c, r in replies.items():
        try:
            secure.check_masked(params, c, r.payload)
            masked[c] = r.payload
        except SecAggError as exc:
            refused[c] = str(exc)
    total, contributors = None, []
    try:
        server_masked, requests = server_unmask_request(server_shares, masked)
        secure.record(ledger, t, requests)
        answers = runner.secure_unmask(requests)
        secure.record(ledger, t, answers)
        result = server_sum(server_masked, answers)
        if result.contributors:
            total, contributors = torch.from_numpy(result.dequantize()), list(result.contributors)
    except SecAggAbort as exc:
        log.warning("round %d: secure aggregation aborted (%s); the model is unchanged", t, exc)
    except SecAggError as exc:  # e.g. a share that parses but rebuilds a wrong secret: refused, never guessed at
        log.error("round %d: secure aggregation refused the round's unmasking (%s); the model is unchanged", t, exc)
    outcome = finish_secure_round(state, cfg, plan, replies, support, total, contributors, refused,
                                  {**missing, **lost})
    outcome.transport = getattr(runner, "transport", None)
    outcome.overhead_s = plan_s + setup_s + (time.perf_counter() - t0) + _client_codec_s(replies)
    return outcome


def drive(cfg: CellmConfig, setup: Setup, runner: ClientRunner, state: ServerState | None = None,
          on_round: OnRound | None = None) -> ServerState:
    """Run rounds until cfg.rounds (from ``state`` when resuming); call ``on_round(state, row)`` after each
    round and after round 0's evaluation."""
    t0 = time.perf_counter()
    if state is None:
        state = ServerState.initial(setup.w0, setup.stage)
    supports = tier_supports(cfg, setup.flat)
    sizes = [len(split) for split in setup.data.clients]
    if state.round == 0 and not state.metrics:
        runner.prepare()
        scfg = stages.stage_config(cfg, state.stage)
        ev = evaluate_state(setup, state, scfg, 1)
        row = metrics_row(state, None, time.perf_counter() - t0, 0.0, ev, scfg)
        state.metrics.append(row)
        if on_round:
            on_round(state, row)
    offset = state.metrics[-1]["wall_s"] if state.metrics else 0.0
    while state.round < cfg.rounds:
        r0 = time.perf_counter()
        runner.prepare()
        kept = stages.begin_next(setup, state, cfg) if stages.begins_now(state, cfg) else None
        scfg = stages.stage_config(cfg, state.stage)
        head = head_mask(setup.flat.segments(), setup.flat.numel) if cfg.comm.up_support_head else None
        outcome = play_round(state, scfg, supports, runner, sizes, head)
        t = state.round
        ev = None
        e0 = time.perf_counter()
        if t % cfg.fl.eval_every == 0 or t == cfg.rounds:
            ev = evaluate_state(setup, state, scfg, t + 1)
        now = time.perf_counter()
        row = metrics_row(state, outcome, offset + now - t0, now - r0, ev, scfg)
        row["eval_s"] = round(now - e0, 3)
        if kept is not None:  # the switch round: how much of stage 1's change the rank-r LoRA start keeps
            row["svd_kept"] = round(kept, 6)
        state.metrics.append(row)
        if on_round:
            on_round(state, row)
    return state
