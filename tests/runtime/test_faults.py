import pytest
import torch

import cellm
from cellm.core.codec import CodecSpec, encode
from cellm.core.sparse import SparseVector
from cellm.federated.messages import ClientReply
from cellm.federated.server import ServerState, finish_round, plan_round


def _cfg(cache_dir, *extra):
    return cellm.load_config(preset="tiny", overrides=[f"data.cache_dir='{cache_dir}'", *extra])


def _good(n, scale=0.01, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=g) * scale
    return ClientReply(encode(SparseVector.from_dense(v), CodecSpec()), 10, 1.0, n)


BAD = {
    "truncated": lambda n, good: good[: len(good) // 2],
    "bit flip": lambda n, good: good[:40] + bytes([good[40] ^ 0xFF]) + good[41:],
    "wrong size": lambda n, good: encode(SparseVector.from_dense(torch.zeros(n + 1) + 0.1), CodecSpec()),
    "garbage": lambda n, good: b"\x00" * 64,
    "empty": lambda n, good: b"",
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_a_bad_upload_is_rejected_counted_and_never_touches_the_global_model(cache_dir, kind):
    cfg = _cfg(cache_dir, "comm.up_density=1.0", "comm.down_density=1.0")
    n = 500
    state = ServerState(w=torch.randn(n, generator=torch.Generator().manual_seed(1)))
    plan = plan_round(state, cfg)
    c_bad, *others = plan.clients
    good = _good(n).payload
    replies = {c_bad: ClientReply(BAD[kind](n, good), 10, 1.0, n)}
    before = state.w.clone()
    out = finish_round(state, cfg, plan, replies)
    assert out.rejected.keys() == {c_bad} and not out.applied
    assert torch.equal(state.w, before)
    assert state.ledger.round_totals(1)["up_bytes"] == len(replies[c_bad].payload)


def test_non_finite_values_and_over_dense_uploads_are_rejected(cache_dir):
    cfg = _cfg(cache_dir, "comm.up_density=0.5", "comm.down_density=1.0")
    n = 100
    state = ServerState(w=torch.zeros(n))
    plan = plan_round(state, cfg)
    a, b, c = plan.clients
    replies = {
        a: ClientReply(encode(SparseVector.from_dense(torch.full((n,), 0.1)), CodecSpec()), 5, 1.0, n),  # 100 > 50
        b: _good(n),  # dense too
        c: ClientReply(encode(SparseVector(n, torch.arange(50), torch.full((50,), 0.2)), CodecSpec()), 5, 1.0, 50),
    }
    out = finish_round(state, cfg, plan, replies)
    assert set(out.rejected) == {a, b} and out.accepted == [c]
    assert "more than the 50" in out.rejected[a]


def test_a_norm_far_above_the_round_median_is_rejected(cache_dir):
    cfg = _cfg(cache_dir, "comm.up_density=1.0", "comm.down_density=1.0", "faults.norm_factor=5",
               "fl.clients_per_round=4")
    n = 200
    state = ServerState(w=torch.zeros(n))
    plan = plan_round(state, cfg)
    replies = {c: _good(n, seed=i) for i, c in enumerate(plan.clients)}
    evil = plan.clients[-1]
    replies[evil] = _good(n, scale=100.0, seed=9)
    honest = ServerState(w=torch.zeros(n))
    honest_plan = plan_round(honest, cfg)
    finish_round(honest, cfg, honest_plan, {c: r for c, r in replies.items() if c != evil})
    out = finish_round(state, cfg, plan, replies)
    assert list(out.rejected) == [evil] and len(out.accepted) == 3
    assert torch.equal(state.w, honest.w)


def test_a_round_with_no_survivors_leaves_the_model_unchanged_and_says_so(cache_dir):
    cfg = _cfg(cache_dir, "rounds=2", "faults.failure_prob=0.999")
    res = cellm.run(cfg, save=False)
    for r in res.metrics[1:]:
        assert r["applied"] is False and r["accepted"] == 0 and r["failed"] == 3
        assert r["up_bytes"] == 0 and r["down_bytes"] > 0
    assert res.final_eval == res.initial_eval


def test_deadline_drops_late_clients_deterministically(cache_dir):
    cfg = _cfg(cache_dir, "rounds=3", "faults.deadline_s=10", "faults.client_time_s=10", "faults.time_sigma=1")
    a, b = cellm.run(cfg, save=False), cellm.run(cfg, save=False)
    late = [r["late"] for r in a.metrics[1:]]
    assert sum(late) > 0 and late == [r["late"] for r in b.metrics[1:]]
    assert all(r["accepted"] + r["late"] == 3 for r in a.metrics[1:])
