"""The server round: plan (sample, densities, encode downloads) and finish (decode, check, aggregate, step).

All server state lives in one object, :class:`ServerState`, that can be saved and restored exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from cellm.config import CellmConfig
from cellm.core.aggregate import aggregate
from cellm.core.codec import CodecError, CodecSpec, decode
from cellm.core.feedback import compress
from cellm.core.ledger import Ledger
from cellm.core.schedule import density_at
from cellm.core.server_opt import ServerOptSpec, server_step
from cellm.core.sparse import SparseVector
from cellm.core.topk import topk_mask
from cellm.federated.client import ClientReply, ClientTask, TrainSpec
from cellm.federated.seeds import sample_clients


def codec_spec(cfg: CellmConfig, direction: str) -> CodecSpec:
    values = cfg.comm.codec_down if direction == "down" else cfg.comm.codec_up
    return CodecSpec(values=values, positions=cfg.comm.positions, block_size=cfg.comm.int8_block,
                     zstd_level=cfg.comm.zstd_level)


def train_spec(cfg: CellmConfig) -> TrainSpec:
    c = cfg.client
    return TrainSpec(optimizer=c.optimizer, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
                     max_grad_norm=c.max_grad_norm, local_steps=cfg.fl.local_steps,
                     local_epochs=cfg.fl.local_epochs, batch_size=cfg.fl.batch_size)


def server_opt_spec(cfg: CellmConfig) -> ServerOptSpec:
    s = cfg.server
    return ServerOptSpec(name=s.optimizer, lr=s.lr, momentum=s.momentum, beta1=s.beta1, beta2=s.beta2,
                         eps=s.eps, weight_decay=s.weight_decay)


def densities(cfg: CellmConfig, round_: int) -> tuple[float, float]:
    k = cfg.comm
    return (density_at(k.down_density, k.down_decay, k.decay_every, round_),
            density_at(k.up_density, k.up_decay, k.decay_every, round_))


@dataclass
class ServerState:
    """Everything the server needs to continue a run: saved whole in checkpoints."""

    w: torch.Tensor  # the global adapter, flat
    round: int = 0  # rounds completed
    opt_state: dict[str, Any] | None = None
    frozen_mask: torch.Tensor | None = None  # pruned-LoRA mask, once frozen
    ledger: Ledger = field(default_factory=Ledger)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    client_copies: dict[int, torch.Tensor] = field(default_factory=dict)  # delta mode: each client's copy

    def state_dict(self) -> dict[str, Any]:
        return {
            "w": self.w, "round": self.round, "opt_state": self.opt_state, "frozen_mask": self.frozen_mask,
            "ledger": self.ledger.state_dict(), "metrics": self.metrics,
            "client_copies": {str(k): v for k, v in self.client_copies.items()},
        }

    @classmethod
    def from_state_dict(cls, s: dict[str, Any]) -> ServerState:
        return cls(w=s["w"], round=int(s["round"]), opt_state=s["opt_state"], frozen_mask=s["frozen_mask"],
                   ledger=Ledger.from_state_dict(s["ledger"]), metrics=list(s["metrics"]),
                   client_copies={int(k): v for k, v in s["client_copies"].items()})


def download_mask(state: ServerState, cfg: CellmConfig, round_: int) -> torch.Tensor | None:
    """The download support M for ``round_`` (None = dense): top-k of |w|, or the frozen mask."""
    if state.frozen_mask is not None:
        return state.frozen_mask
    if cfg.comm.freeze_mask_after and round_ <= cfg.comm.freeze_mask_after:
        return None  # pruned LoRA: dense rounds until the mask is frozen
    d_down, _ = densities(cfg, round_)
    if d_down >= 1.0:
        return None
    return topk_mask(state.w, d_down)


def masked_weights(state: ServerState, cfg: CellmConfig, round_: int) -> torch.Tensor:
    """What clients start from in ``round_`` in weights mode, and what evaluation sees: w * M."""
    m = download_mask(state, cfg, round_)
    return state.w.clone() if m is None else state.w * m


@dataclass
class RoundPlan:
    round: int
    clients: list[int]
    d_down: float
    d_up: float
    tasks: dict[int, ClientTask]


def plan_round(state: ServerState, cfg: CellmConfig) -> RoundPlan:
    """Sample clients and build each one's encoded download; the ledger counts every download sent."""
    t = state.round + 1
    d_down, d_up = densities(cfg, t)
    clients = sample_clients(cfg.seed, t, cfg.data.num_clients, cfg.fl.clients_per_round)
    spec_down, spec_up = codec_spec(cfg, "down"), codec_spec(cfg, "up")
    tasks: dict[int, ClientTask] = {}
    shared: tuple[bytes, int] | None = None
    for c in clients:
        if cfg.comm.download_mode == "delta":
            copy = state.client_copies.get(c, torch.zeros_like(state.w))
            mask = state.frozen_mask
            payload, received, _ = compress(state.w - copy, d_down, spec_down,
                                            support=mask)
            state.client_copies[c] = copy + received.to_dense()
            nnz = received.k
        else:
            if shared is None:
                mask = download_mask(state, cfg, t)
                sv = SparseVector.from_dense(state.w) if mask is None else SparseVector.from_mask(state.w, mask)
                payload, received, _ = compress(sv.to_dense(), 1.0, spec_down)
                shared = (payload, received.k)
            payload, nnz = shared
        state.ledger.record(t, "down", len(payload), nnz)
        tasks[c] = ClientTask(round=t, client=c, download=payload, up_density=d_up, codec_up=spec_up,
                              download_mode=cfg.comm.download_mode, client_freeze=cfg.comm.client_freeze,
                              error_feedback=cfg.comm.error_feedback_up)
    return RoundPlan(t, clients, d_down, d_up, tasks)


@dataclass
class RoundOutcome:
    accepted: list[int]
    rejected: dict[int, str]
    train_loss: float
    applied: bool


def check_upload(payload: bytes, n: int) -> SparseVector:
    """Strictly decode one client's upload; any defect raises CodecError before it can reach the model."""
    sv = decode(payload, max_n=n, expected_n=n)
    if not bool(torch.isfinite(sv.values).all()):
        raise CodecError("upload has non-finite values")
    return sv


def finish_round(state: ServerState, cfg: CellmConfig, plan: RoundPlan,
                 replies: dict[int, ClientReply]) -> RoundOutcome:
    """Decode and check every reply, aggregate the good ones, step the server optimizer, advance the round."""
    t = plan.round
    n = state.w.numel()
    good: list[tuple[int, SparseVector, ClientReply]] = []
    rejected: dict[int, str] = {}
    for c in sorted(replies):
        reply = replies[c]
        try:
            sv = check_upload(reply.payload, n)
        except CodecError as exc:
            state.ledger.record(t, "up", len(reply.payload), 0)
            rejected[c] = str(exc)
            continue
        state.ledger.record(t, "up", len(reply.payload), sv.k)
        good.append((c, sv, reply))
    applied = False
    if good:
        weights = [r.num_examples for _, _, r in good] if cfg.fl.aggregation == "weighted" else None
        grad = aggregate([sv for _, sv, _ in good], weights)
        state.w, state.opt_state = server_step(state.w, grad, state.opt_state, server_opt_spec(cfg))
        applied = True
    if cfg.comm.freeze_mask_after and t == cfg.comm.freeze_mask_after and state.frozen_mask is None:
        d_down, _ = densities(cfg, t + 1)
        state.frozen_mask = topk_mask(state.w, d_down)
    state.round = t
    losses = [r.train_loss for _, _, r in good]
    loss = sum(losses) / len(losses) if losses else math.nan
    return RoundOutcome([c for c, _, _ in good], rejected, loss, applied)
