"""Hostile uploads against the server round: bounded by default, measurable with simulated attackers."""

import math

import pytest
import torch

import cellm
from cellm.core.codec import CodecError, CodecSpec, encode
from cellm.core.sparse import SparseVector
from cellm.federated.faults import attack, attackers
from cellm.federated.messages import ClientReply
from cellm.federated.server import ServerState, check_upload, finish_round, plan_round


def _cfg(cache_dir, *extra):
    return cellm.load_config(preset="tiny", overrides=[f"data.cache_dir='{cache_dir}'", "comm.up_density=1.0",
                                                       "comm.down_density=1.0", *extra])


def _reply(vec: torch.Tensor, num_examples: int = 10) -> ClientReply:
    return ClientReply(encode(SparseVector.from_dense(vec), CodecSpec()), num_examples, 1.0, vec.numel())


def _round(cfg, n, attacker_scale, state=None, sizes=None, claimed=10):
    state = state or ServerState(w=torch.zeros(n))
    plan = plan_round(state, cfg)
    g = torch.Generator().manual_seed(3)
    replies = {c: _reply(torch.randn(n, generator=g) * 0.01) for c in plan.clients}
    bad = plan.clients[0]
    replies[bad] = _reply(torch.full((n,), 1e30 if attacker_scale else 0.01), claimed)
    return state, plan, finish_round(state, cfg, plan, replies, sizes=sizes)


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_with_the_defaults_one_client_sending_1e30_barely_moves_the_model(cache_dir, opt):
    cfg = _cfg(cache_dir, f"server.optimizer={opt}", "server.lr=1.0" if opt == "sgd" else "server.lr=0.01")
    state, plan, out = _round(cfg, 200, attacker_scale=True)
    assert out.applied and out.clipped >= 1
    assert bool(torch.isfinite(state.w).all())
    assert float(state.w.abs().max()) < 1.0  # honest deltas are ~0.01 an entry
    if opt == "adamw":
        v = state.opt_state["state"][0]["exp_avg_sq"]
        assert bool(torch.isfinite(v).all()) and float(v.max()) < 1.0


def test_without_the_bound_the_same_client_wrecks_plain_fedavg(cache_dir):
    cfg = _cfg(cache_dir, "server.optimizer=sgd", "server.lr=1.0", "robust.clip_factor=0")
    state, _, _ = _round(cfg, 200, attacker_scale=True)
    assert float(state.w.abs().max()) > 1e20  # what the default bound prevents (the test above)


def test_weighted_aggregation_uses_the_sizes_the_server_knows_not_the_claimed_ones(cache_dir):
    cfg = _cfg(cache_dir, "fl.aggregation=weighted", "server.optimizer=sgd", "server.lr=1.0", "robust.clip_factor=0")
    sizes = {c: 10 for c in range(cfg.data.num_clients)}
    honest, _, _ = _round(cfg, 50, attacker_scale=False, sizes=sizes, claimed=10)
    lying, _, _ = _round(cfg, 50, attacker_scale=False, sizes=sizes, claimed=2 ** 62)
    assert torch.equal(honest.w, lying.w)
    with pytest.raises(ValueError, match="partition sizes"):
        _round(cfg, 50, attacker_scale=False, sizes=None)


def test_an_upload_outside_the_clients_support_is_refused():
    support = torch.zeros(10, dtype=torch.bool)
    support[:5] = True
    inside = encode(SparseVector(10, torch.tensor([1, 4]), torch.tensor([0.1, 0.2])), CodecSpec())
    outside = encode(SparseVector(10, torch.tensor([1, 7]), torch.tensor([0.1, 0.2])), CodecSpec())
    assert check_upload(inside, 10, support=support).k == 2
    with pytest.raises(CodecError, match="1 entries outside"):
        check_upload(outside, 10, support=support)


def test_one_in_five_sampled_clients_attacks_and_the_choice_is_reproducible():
    clients = [3, 8, 11, 20, 42]
    chosen = attackers(0, 7, clients, 0.2)
    assert len(chosen) == 1 and chosen[0] in clients
    assert attackers(0, 7, clients, 0.2) == chosen
    assert attackers(0, 7, clients, 0.0) == []
    assert len({attackers(0, t, clients, 0.2)[0] for t in range(1, 30)}) > 1


def test_each_attack_keeps_the_positions_and_sets_the_norm():
    honest = SparseVector(100, torch.tensor([2, 5, 9]), torch.tensor([0.3, -0.4, 0.0]))
    g = torch.Generator().manual_seed(0)
    for kind, want in (("scale", 1e6 * 0.5), ("signflip", 1e6 * 0.5), ("random", 1e6 * 0.5)):
        bad = attack(honest, kind, 1e6, g)
        assert torch.equal(bad.indices, honest.indices)
        assert math.isclose(float(torch.linalg.vector_norm(bad.values.double())), want, rel_tol=1e-5)
    assert torch.equal(attack(honest, "signflip", 1.0, g).values, -honest.values)


def test_a_simulated_attack_is_recorded_and_bounded_in_a_whole_run(cache_dir):
    cfg = _cfg(cache_dir, "rounds=3", "faults.byzantine=0.2", "faults.attack=scale")
    res = cellm.run(cfg, save=False)
    rows = res.metrics[1:]
    assert all(len(r["attacked"]) == 1 and r["clipped"] >= 1 for r in rows)
    assert all(r["applied"] for r in rows)
    assert all(math.isfinite(v) for v in res.final_eval.values())
