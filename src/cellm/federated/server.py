"""The server round: plan (sample, densities, encode downloads) and finish (decode, check, aggregate, step).

All server state lives in one object, :class:`ServerState`, that can be saved and restored exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from cellm.config import CellmConfig
from cellm.core import robust
from cellm.core.aggregate import aggregate
from cellm.core.codec import CodecError, CodecSpec, decode, roundtrip
from cellm.core.dp import private_mean
from cellm.core.feedback import compress
from cellm.core.ledger import Ledger
from cellm.core.schedule import density_at
from cellm.core.server_opt import ServerOptSpec, server_step
from cellm.core.sparse import SparseVector
from cellm.core.support import SERVER_CHOSEN, USES_DOWNLOAD, fill_scored, one_for_all
from cellm.core.topk import max_kept_entries, num_kept, topk_mask, whole_blocks
from cellm.federated.messages import ClientReply, ClientTask, task_support, vector_digest
from cellm.federated.secure import quant_spec
from cellm.federated.seeds import DP_NOISE, derive, sample_clients, support_seed


def codec_spec(cfg: CellmConfig, direction: str) -> CodecSpec:
    values = cfg.comm.codec_down if direction == "down" else cfg.comm.codec_up
    return CodecSpec(values=values, positions=cfg.comm.positions, block_size=cfg.comm.int8_block,
                     zstd_level=cfg.comm.zstd_level, pos_block=cfg.comm.topk_block)


def server_opt_spec(cfg: CellmConfig) -> ServerOptSpec:
    s = cfg.server
    return ServerOptSpec(name=s.optimizer, lr=s.lr, momentum=s.momentum, beta1=s.beta1, beta2=s.beta2,
                         eps=s.eps, weight_decay=s.weight_decay)


def densities(cfg: CellmConfig, round_: int) -> tuple[float, float]:
    k = cfg.comm
    return (density_at(k.down_density, k.down_decay, k.decay_every, round_),
            density_at(k.up_density, k.up_decay, k.decay_every, round_))


def tier_of(cfg: CellmConfig, client: int) -> int | None:
    """Client c is in tier c % num_tiers (None without tiers). Tier 0 is the smallest budget."""
    return None if cfg.hetero.mode == "none" else client % cfg.hetero.num_tiers


def tier_factor(cfg: CellmConfig, tier: int) -> float:
    return 4.0 ** -(cfg.hetero.num_tiers - 1 - tier)


def tier_rank(cfg: CellmConfig, tier: int) -> int:
    return max(1, int(cfg.model.lora_rank * tier_factor(cfg, tier)))


def client_densities(cfg: CellmConfig, round_: int, client: int) -> tuple[float, float]:
    d_down, d_up = densities(cfg, round_)
    tier = tier_of(cfg, client)
    if tier is not None and cfg.hetero.mode == "density":
        f = tier_factor(cfg, tier)
        return d_down * f, d_up * f
    return d_down, d_up


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
    w0: torch.Tensor | None = None  # the seeded initial adapter, which every client regenerates (never sent)
    stage: int = 0  # 0: a one-stage run; SLoRA: 1 (sparse subset of the target weights), then 2 (LoRA)
    acked: dict[int, int] = field(default_factory=dict)  # stateful clients: the last round accepted from each
    norm_history: list[list[float]] = field(default_factory=list)  # the last rounds' clipped upload norms

    def state_dict(self) -> dict[str, Any]:
        return {
            "w": self.w, "round": self.round, "opt_state": self.opt_state, "frozen_mask": self.frozen_mask,
            "ledger": self.ledger.state_dict(), "metrics": self.metrics,
            "client_copies": {str(k): v for k, v in self.client_copies.items()}, "w0": self.w0,
            "stage": self.stage, "acked": {str(k): v for k, v in self.acked.items()},
            "norm_history": [list(r) for r in self.norm_history],
        }

    @classmethod
    def from_state_dict(cls, s: dict[str, Any]) -> ServerState:
        return cls(w=s["w"], round=int(s["round"]), opt_state=s["opt_state"], frozen_mask=s["frozen_mask"],
                   ledger=Ledger.from_state_dict(s["ledger"]), metrics=list(s["metrics"]),
                   client_copies={int(k): v for k, v in s["client_copies"].items()}, w0=s.get("w0"),
                   stage=int(s.get("stage", 0)), acked={int(k): int(v) for k, v in s.get("acked", {}).items()},
                   norm_history=[[float(x) for x in r] for r in s.get("norm_history", [])])

    @classmethod
    def initial(cls, w0: torch.Tensor, stage: int = 0) -> ServerState:
        """Round 0: the global adapter is the seeded initial one (of ``stage``'s trainable vector)."""
        return cls(w=w0.clone(), w0=w0.clone(), stage=stage)


def reference(state: ServerState, cfg: CellmConfig, support: torch.Tensor | None = None) -> torch.Tensor:
    """What client and server both hold before any message: the seeded init w0 with comm.init_relative, else 0.

    Downloads carry (a top-k of) the difference from it. Restricted to ``support`` (rank tiers) when given.
    """
    if not cfg.comm.init_relative:
        return torch.zeros_like(state.w)
    if state.w0 is None:
        raise ValueError("comm.init_relative needs the server state's initial adapter w0")
    return state.w0.clone() if support is None else torch.where(support, state.w0, torch.zeros_like(state.w0))


def relative_weights(state: ServerState, cfg: CellmConfig) -> torch.Tensor:
    """w - ref: what the download's top-k ranks (w itself for FLASC, w - w0 with comm.init_relative)."""
    return state.w - state.w0 if cfg.comm.init_relative else state.w


def download_mask(state: ServerState, cfg: CellmConfig, round_: int, d_down: float | None = None,
                  support: torch.Tensor | None = None) -> torch.Tensor | None:
    """The download support M for ``round_`` (None = dense): top-k of |w - ref| (within ``support``), or the
    frozen mask. ref is 0 (FLASC: top-k of |w|) or the seeded init w0 (comm.init_relative)."""
    if state.frozen_mask is not None:
        return state.frozen_mask if support is None else state.frozen_mask & support
    if cfg.comm.freeze_mask_after and round_ <= cfg.comm.freeze_mask_after:
        return support  # pruned LoRA: dense rounds until the mask is frozen
    if d_down is None:
        d_down, _ = densities(cfg, round_)
    if d_down >= 1.0:
        return support
    x = relative_weights(state, cfg)
    if support is not None:
        x = torch.where(support, x, torch.zeros_like(x))
    mask = topk_mask(x, d_down, cfg.comm.topk_block)
    return mask if support is None else mask & support


def start_from(state: ServerState, cfg: CellmConfig, mask: torch.Tensor | None,
               support: torch.Tensor | None = None) -> torch.Tensor:
    """What a client starts from given the download mask: ref + M * (w - ref); w itself when M is None."""
    if mask is None:
        return state.w.clone()
    if not cfg.comm.init_relative:
        return state.w * mask
    ref = reference(state, cfg, support)
    return ref + mask * (state.w - ref)


def masked_weights(state: ServerState, cfg: CellmConfig, round_: int, d_down: float | None = None,
                   support: torch.Tensor | None = None) -> torch.Tensor:
    """What clients start from in ``round_`` in weights mode, and what evaluation sees: ref + M * (w - ref)."""
    return start_from(state, cfg, download_mask(state, cfg, round_, d_down, support), support)


def model_weights(state: ServerState, cfg: CellmConfig, round_: int) -> torch.Tensor:
    """The adapter a client works with, which evaluation and the saved adapter use.

    Weights mode: ref + M * (w - ref), what a stateless client starts from. Delta mode: w itself, which each
    stateful client's copy tracks (its copy holds every entry, not only the top-k).
    """
    if cfg.comm.download_mode == "delta":
        return state.w.clone()
    return masked_weights(state, cfg, round_)


def server_scores(state: ServerState) -> torch.Tensor | None:
    """What the server knows of where updates land: its optimizer's first moment (Adam's exp_avg, SGD's momentum
    buffer), an average of the last rounds' aggregates; None before the first step or without momentum."""
    st = (state.opt_state or {}).get("state", {})
    entry = st.get(0) if isinstance(st, dict) else None
    for key in ("exp_avg", "momentum_buffer"):
        if isinstance(entry, dict) and isinstance(entry.get(key), torch.Tensor) and entry[key].numel() == state.w.numel():
            return entry[key]
    return None


def server_support(state: ServerState, cfg: CellmConfig, round_: int, mask: torch.Tensor, d_up: float,
                   head: torch.Tensor | None = None, support: torch.Tensor | None = None) -> torch.Tensor:
    """comm.up_support = 'server': the download mask M plus the entries of largest |first moment| outside it (and
    outside the head, which the clients add themselves), up to ``d_up`` of the vector in all; ties and a server
    without moments yet in the round's seeded order. The result is the download's support: the extra entries
    travel (positions and values) in the download, so what announces them is counted in the download bytes."""
    fixed = mask | head if (head is not None and cfg.comm.up_support_head) else mask  # in S whatever is chosen
    blocked = fixed if support is None else fixed | ~support  # a rank tier: never choose what it cannot train
    k = num_kept(state.w.numel(), d_up) + int(blocked.sum()) - int(fixed.sum())
    grown = fill_scored(blocked, k, server_scores(state), support_seed(cfg.seed, round_))
    return mask | (grown & ~blocked)


def weights_download(state: ServerState, cfg: CellmConfig, round_: int, d_down: float, spec: CodecSpec,
                     support: torch.Tensor | None = None, d_up: float = 1.0,
                     head: torch.Tensor | None = None) -> tuple[bytes, int, torch.Tensor | None]:
    """(payload, nonzeros sent, mask M or None when dense) of a weights-mode download: M * (w - ref) at the mask's positions.

    Without client_freeze, entries equal to ref carry nothing and are left out (round 1 of an init-relative
    run sends no value at all). With client_freeze, or an upload support built on the download's positions
    (comm.up_support), the client needs M itself, so every position of M is sent. comm.up_support = 'server'
    grows M by the server's choice (:func:`server_support`, ``d_up``, ``head``) before it is sent.
    """
    mask = download_mask(state, cfg, round_, d_down, support)
    if cfg.comm.up_support in SERVER_CHOSEN and mask is not None:
        mask = server_support(state, cfg, round_, mask, d_up, head, support)
    diff = start_from(state, cfg, mask, support) - reference(state, cfg, support)
    if (cfg.comm.client_freeze or cfg.comm.up_support in USES_DOWNLOAD) and mask is not None:
        payload, received = roundtrip(SparseVector.from_mask(diff, mask), spec)
    else:
        payload, received, _ = compress(diff, 1.0, spec)
    return payload, received.k, mask


@dataclass
class RoundPlan:
    round: int
    clients: list[int]
    d_down: float
    d_up: float
    tasks: dict[int, ClientTask]
    copies: dict[int, torch.Tensor] = field(default_factory=dict)  # delta mode: each copy once accepted
    supports: dict[int, torch.Tensor] = field(default_factory=dict)  # where each client's upload may lie
    up_supports: dict[int, torch.Tensor] = field(default_factory=dict)  # shared-support rules: each client's S


def plan_round(state: ServerState, cfg: CellmConfig, supports: dict[int, torch.Tensor] | None = None,
               available: list[int] | None = None, head: torch.Tensor | None = None) -> RoundPlan:
    """Sample clients and build each one's encoded download; the ledger counts every download sent.

    ``supports`` maps a rank tier to its boolean support over the flat vector (hetero.mode = "rank").
    ``available``: the clients the runtime can reach this round (None: all), the only ones sampled.
    ``head``: the classifier head's entries (boolean, :func:`cellm.core.support.head_mask` of the adapter's
    layout), needed with comm.up_support_head. With a shared upload support (comm.up_support) the plan holds each
    client's support S, computed as the client will from the task (:func:`cellm.federated.messages.task_support`).
    """
    if cfg.comm.up_support_head and head is None:
        raise ValueError("comm.up_support_head needs the classifier head's positions: pass plan_round(head=...) "
                         "from the adapter's layout (cellm.core.support.head_mask)")
    t = state.round + 1
    d_down, d_up = densities(cfg, t)
    clients = sample_clients(cfg.seed, t, cfg.data.num_clients, cfg.fl.clients_per_round, available)
    spec_down, spec_up = codec_spec(cfg, "down"), codec_spec(cfg, "up")
    tasks: dict[int, ClientTask] = {}
    copies: dict[int, torch.Tensor] = {}
    allowed_of: dict[int, torch.Tensor] = {}
    shared: dict[int | None, tuple[bytes, int, torch.Tensor | None]] = {}  # weights mode: one payload per tier
    up_supports: dict[int, torch.Tensor] = {}
    tier_up: dict[int | None, torch.Tensor | None] = {}  # weights mode: a tier's clients share their support S
    digest = vector_digest(state.w0) if cfg.comm.init_relative else ""
    sa = cfg.secagg
    ring = {"ring_bits": sa.value_bits, "ring_clip": sa.clip, "ring_clients": quant_spec(cfg).max_clients} \
        if sa.enabled else {}
    for c in clients:
        tier = tier_of(cfg, c)
        cd_down, cd_up = client_densities(cfg, t, c)
        support = supports.get(tier) if (supports and tier is not None) else None
        if cfg.comm.download_mode == "delta":
            copy = state.client_copies.get(c)
            if copy is None:
                copy = reference(state, cfg)
            payload, received, _ = compress(state.w - copy, cd_down, spec_down, support=state.frozen_mask)
            copies[c] = copy + received.to_dense()  # becomes the server's copy only if c's upload is accepted
            nnz, masked = received.k, received.k < received.n
            positions = torch.zeros(state.w.numel(), dtype=torch.bool)
            positions[received.indices] = True
            mask = positions if (masked and cfg.comm.client_freeze) else None
        else:
            if tier not in shared:
                shared[tier] = weights_download(state, cfg, t, cd_down, spec_down, support, cd_up, head)
            payload, nnz, mask = shared[tier]
            masked, positions = mask is not None, mask
        allowed = mask if (cfg.comm.client_freeze and mask is not None) else support
        if allowed is not None and support is not None:
            allowed = allowed & support
        if allowed is not None:
            allowed_of[c] = allowed
        state.ledger.record(t, "down", len(payload), nnz, tier=None if tier is None else str(tier))
        tasks[c] = ClientTask(round=t, client=c, download=payload, up_density=cd_up, codec_up=spec_up,
                              download_mode=cfg.comm.download_mode, client_freeze=cfg.comm.client_freeze,
                              error_feedback=cfg.comm.error_feedback_up,
                              support_rank=tier_rank(cfg, tier) if support is not None else 0,
                              download_masked=masked, init_digest=digest, stage=state.stage,
                              acked_round=state.acked.get(c, 0), up_support=cfg.comm.up_support,
                              up_support_head=cfg.comm.up_support_head, **ring)
        if cfg.comm.up_support != "topk":
            if cfg.comm.download_mode == "delta" or tier not in tier_up:
                tier_up[tier] = task_support(tasks[c], state.w.numel(), cfg.seed, download=positions, head=head,
                                             allowed=allowed)
            up_supports[c] = tier_up[tier]
    return RoundPlan(t, clients, d_down, d_up, tasks, copies, allowed_of, up_supports)


def support_shared_by_all(cfg: CellmConfig) -> bool:
    """Whether every client of every round uploads on one support under ``cfg`` (secure aggregation needs it)."""
    return one_for_all(cfg.comm.up_support, per_client_downloads=cfg.comm.download_mode == "delta",
                       tiers=cfg.hetero.mode != "none")


def round_support(plan: RoundPlan) -> torch.Tensor | None:
    """The round's upload support when every sampled client shares one (sorted positions), else None.

    Secure aggregation needs it: masked vectors add up only over the same positions in the same order. None for
    per-client top-k, and where supports differ per client (tiers, delta downloads with a download-based rule).
    """
    if not plan.up_supports or set(plan.up_supports) != set(plan.clients):
        return None
    first = plan.up_supports[plan.clients[0]]
    if all(torch.equal(s, first) for s in plan.up_supports.values()):
        return first
    return None


@dataclass
class RoundOutcome:
    accepted: list[int]
    rejected: dict[int, str]
    missing: dict[int, str]
    train_loss: float
    applied: bool
    clipped: int = 0  # uploads scaled down to the round's bound (robust.clip_factor, robust.max_norm)
    attacked: list[int] = field(default_factory=list)  # set by the driver: the simulated attackers' clients
    overhead_s: float = 0.0  # set by the runtime: coding, aggregation and server-step time of the round
    transport: tuple[int, int] | None = None  # set by a runtime that wraps payloads: (down, up) bytes it sent


def check_upload(payload: bytes, n: int, max_k: int | None = None,
                 support: torch.Tensor | None = None, shared: torch.Tensor | None = None,
                 block: int = 1) -> SparseVector:
    """Strictly decode one client's upload; any defect raises CodecError before it can reach the model.

    ``support`` (boolean, N): where the client may have changed anything (its rank tier, its download's mask
    under client_freeze); an entry outside it is refused, not silently dropped. ``shared`` (sorted positions):
    the round's shared support S for this client; the upload must then be the dense vector of exactly |S| values
    (no positions), which is scattered into S. ``block`` > 1 (comm.topk_block): the upload's positions must be
    whole blocks of the grid, as block top-k keeps them (any message scheme may carry them; the set is checked).
    """
    if shared is not None:
        sv = decode(payload, max_n=int(shared.numel()), expected_n=int(shared.numel()))
        if not sv.is_dense:
            raise CodecError(f"a shared-support upload must carry all {sv.n} values of the support, got {sv.k}")
        if not bool(torch.isfinite(sv.values).all()):
            raise CodecError("upload has non-finite values")
        return SparseVector(n, shared, sv.values)
    sv = decode(payload, max_n=n, expected_n=n)
    if not bool(torch.isfinite(sv.values).all()):
        raise CodecError("upload has non-finite values")
    if max_k is not None and sv.k > max_k:
        raise CodecError(f"upload has {sv.k} entries, more than the {max_k} its density allows")
    if support is not None and sv.k and not bool(support[sv.indices].all()):
        outside = int((~support[sv.indices]).sum())
        raise CodecError(f"upload has {outside} entries outside the client's support")
    if block > 1 and not whole_blocks(sv.indices, n, block):
        raise CodecError(f"upload positions are not whole blocks of comm.topk_block = {block} entries")
    return sv


def finish_round(state: ServerState, cfg: CellmConfig, plan: RoundPlan, replies: dict[int, ClientReply],
                 missing: dict[int, str] | None = None, sizes: Mapping[int, int] | None = None) -> RoundOutcome:
    """Decode and check every reply, bound and aggregate the good ones, step the server optimizer, advance.

    A reply that fails decoding, has non-finite values, more entries than its density allows, entries outside
    the client's support, or (with faults.norm_factor) a norm far above the round's median is rejected: counted,
    never applied. The others are scaled down to the round's L2 bound (robust.*), then combined: DP's noisy mean,
    the mean (weighted by the partition sizes the server knows, ``sizes``, never by what a client claims), or a
    robust rule. A round with no accepted reply leaves the model unchanged. Stateful clients: the server's copy
    and the acknowledged round advance only for the accepted ones.
    """
    t = plan.round
    n = state.w.numel()
    good: list[tuple[int, SparseVector, ClientReply]] = []
    rejected: dict[int, str] = {}
    for c in sorted(replies):
        reply = replies[c]
        tier = tier_of(cfg, c)
        try:
            if c not in plan.tasks:
                raise CodecError(f"client {c} was not sampled this round")
            sv = check_upload(reply.payload, n, max_kept_entries(n, plan.tasks[c].up_density, cfg.comm.topk_block),
                              plan.supports.get(c), plan.up_supports.get(c), cfg.comm.topk_block)
        except CodecError as exc:
            state.ledger.record(t, "up", len(reply.payload), 0, tier=None if tier is None else str(tier))
            rejected[c] = str(exc)
            continue
        state.ledger.record(t, "up", len(reply.payload), sv.k, tier=None if tier is None else str(tier))
        good.append((c, sv, reply))
    if cfg.faults.norm_factor > 0 and len(good) >= 3:
        norms = torch.tensor([robust.norm(sv) for _, sv, _ in good])
        limit = cfg.faults.norm_factor * float(norms.median())
        kept = []
        for (c, sv, r), nrm in zip(good, norms.tolist(), strict=True):
            if nrm > limit:
                rejected[c] = f"upload norm {nrm:.3g} exceeds {cfg.faults.norm_factor:g} x the round's median"
            else:
                kept.append((c, sv, r))
        good = kept
    rb = cfg.robust
    clipped = 0
    if good and (rb.clip_factor > 0 or rb.max_norm > 0):
        history = [x for r in state.norm_history for x in r]
        bound = robust.clip_bound([robust.norm(sv) for _, sv, _ in good], history, rb.clip_factor, rb.max_norm)
        bounded = []
        for c, sv, r in good:
            sv, cut = robust.clip(sv, bound)
            clipped += int(cut)
            bounded.append((c, sv, r))
        good = bounded
        if rb.history_rounds:
            state.norm_history = [*state.norm_history, [robust.norm(sv) for _, sv, _ in good]][-rb.history_rounds:]
    if rb.min_cosine > -1 and len(good) >= 3:
        cos = robust.cosines_to_consensus([sv for _, sv, _ in good], rb.trim_fraction)
        kept = []
        for (c, sv, r), x in zip(good, cos, strict=True):
            if x < rb.min_cosine:
                rejected[c] = f"upload points against the round's consensus (cosine {x:.3g} < {rb.min_cosine:g})"
            else:
                kept.append((c, sv, r))
        good = kept
    applied = False
    if good:
        deltas = [sv for _, sv, _ in good]
        if cfg.dp.noise_multiplier > 0:
            gen = torch.Generator().manual_seed(derive(cfg.seed, t, -1, DP_NOISE))
            grad = private_mean(deltas, cfg.dp.clip_norm, cfg.dp.noise_multiplier, gen)
        elif rb.aggregator != "mean":
            grad = robust.combine(deltas, rb.aggregator, trim=rb.trim_fraction, byzantine=rb.krum_byzantine)
        else:
            weights = None
            if cfg.fl.aggregation == "weighted":
                if sizes is None:
                    raise ValueError("fl.aggregation = 'weighted' needs the clients' partition sizes")
                weights = [max(int(sizes[c]), 0) for c, _, _ in good]
                if sum(weights) <= 0:
                    weights = None
            grad = aggregate(deltas, weights)
        applied = step(state, cfg, plan, grad, [c for c, _, _ in good])
    end_round(state, cfg, t)
    loss = mean_loss([r for _, _, r in good])
    return RoundOutcome([c for c, _, _ in good], rejected, dict(missing or {}), loss, applied, clipped)


def finish_secure_round(state: ServerState, cfg: CellmConfig, plan: RoundPlan, replies: dict[int, ClientReply],
                        support: torch.Tensor, total: torch.Tensor | None, contributors: list[int],
                        refused: dict[int, str], missing: dict[int, str] | None = None) -> RoundOutcome:
    """End a round under secure aggregation: the server holds only ``total``, the sum of the ``contributors``'
    uploads on the shared ``support`` (unmasked by the protocol; None when it aborted), never a single one.

    Every masked vector that arrived counts as an upload of |S| values in the ledger; the mean of the sum is the
    server's gradient on S. ``refused``: clients whose masked vector or answer was malformed (they count as
    rejected; the protocol treated them as dropped). Nothing can be checked per client here: clients clipped
    their values before masking (secagg.clip), which is all that bounds one client's influence.
    """
    t = plan.round
    for c in sorted(replies):
        state.ledger.record(t, "up", len(replies[c].payload), int(support.numel()))
    accepted = sorted(contributors) if total is not None else []
    rejected = dict(refused)
    for c in sorted(replies):
        if c not in accepted and c not in rejected:
            rejected[c] = "its masked upload is not in the round's sum (the protocol aborted)"
    applied = False
    if accepted:
        grad = torch.zeros(state.w.numel())
        grad[support] = (total.to(torch.float64) / len(accepted)).to(torch.float32)
        applied = step(state, cfg, plan, grad, accepted)
    end_round(state, cfg, t)
    return RoundOutcome(accepted, rejected, dict(missing or {}), mean_loss([replies[c] for c in accepted]), applied)


def step(state: ServerState, cfg: CellmConfig, plan: RoundPlan, grad: torch.Tensor, accepted: list[int]) -> bool:
    """The server step with the round's aggregate; stateful clients' copies and acknowledged rounds advance for
    the ``accepted`` ones only. Returns True (the model moved)."""
    state.w, state.opt_state = server_step(state.w, grad, state.opt_state, server_opt_spec(cfg))
    if cfg.comm.error_feedback_up or cfg.comm.download_mode == "delta":
        for c in accepted:
            state.acked[c] = plan.round
            if c in plan.copies:
                state.client_copies[c] = plan.copies[c]
    return True


def end_round(state: ServerState, cfg: CellmConfig, t: int) -> None:
    """Close round ``t``: freeze the download mask when it is due (pruned LoRA), advance the round."""
    if cfg.comm.freeze_mask_after and t == cfg.comm.freeze_mask_after and state.frozen_mask is None:
        d_down, _ = densities(cfg, t + 1)
        state.frozen_mask = topk_mask(relative_weights(state, cfg), d_down, cfg.comm.topk_block)
    state.round = t


def mean_loss(replies: list[ClientReply]) -> float:
    """The mean of the finite train losses the clients reported (nan when none did)."""
    losses = [r.train_loss for r in replies if math.isfinite(r.train_loss)]
    return sum(losses) / len(losses) if losses else math.nan
