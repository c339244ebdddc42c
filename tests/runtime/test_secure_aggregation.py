"""Secure aggregation in the round: the server's sum is exactly the sum of the clients' quantized uploads (with
dropouts before and after the masked vectors), nothing unmasked reaches the server, every protocol byte is in the
ledger, and what secure aggregation rules out is refused at config load."""

import numpy as np
import pytest
import torch

import cellm
import cellm.runtime.driver as driver_mod
from cellm.core import secagg
from cellm.core.secagg.quantize import pack_ring
from cellm.core.secagg.wire import masked_size, parse_masked
from cellm.errors import ConfigError
from cellm.runtime import clients as clients_mod
from cellm.runtime import embedded as embedded_mod

SECURE = ["comm.up_support=random", "comm.up_density=0.25", "secagg.enabled=true", "robust.clip_factor=0",
          "comm.error_feedback_up=true", "rounds=3"]


def _cfg(cache_dir, *extra):
    return cellm.load_config(preset="tiny", overrides=[f"data.cache_dir='{cache_dir}'", *SECURE, *extra])


@pytest.fixture
def spied(monkeypatch):
    """Record each client's ring values just before masking, what reaches the server, and the server's sum."""
    seen = {"q": {}, "payloads": {}, "sums": []}
    real_mask, real_finish = secagg.client_masked_input, driver_mod.finish_secure_round

    def mask(state, routed, values):
        seen["q"][(state.params.session, state.client_id)] = np.array(values, copy=True)
        return real_mask(state, routed, values)

    def finish(state, cfg, plan, replies, support, total, contributors, refused, missing=None):
        seen["payloads"][plan.round] = {c: r.payload for c, r in replies.items()}
        seen["sums"].append((plan.round, total, list(contributors), plan))
        return real_finish(state, cfg, plan, replies, support, total, contributors, refused, missing)

    monkeypatch.setattr(clients_mod.secagg, "client_masked_input", mask)
    monkeypatch.setattr(driver_mod, "finish_secure_round", finish)
    return seen


def _expected_sum(seen, cfg, plan, contributors):
    params = driver_mod.secure.round_params(cfg, plan.round, plan.clients, int(plan.up_supports[plan.clients[0]].numel()))
    ring = sum(seen["q"][(params.session, c)].astype(object) for c in contributors)  # exact integers
    ring = np.array([int(v) % (1 << params.ring_bits) for v in ring], dtype=np.uint64)
    return torch.from_numpy(secagg.dequantize_sum(ring, len(contributors), params.quant))


def test_the_servers_sum_is_exactly_the_sum_of_the_quantized_uploads_when_clients_drop_after_sharing(
        cache_dir, spied):
    cfg = _cfg(cache_dir, "faults.failure_prob=0.4")
    result = cellm.run(cfg, save=False)
    dropped = [r["failed"] for r in result.metrics[1:]]
    assert sum(dropped) > 0, "the seed should drop someone after stage 2 in 3 rounds"
    assert any(len(contributors) < len(plan.clients) for _, _, contributors, plan in spied["sums"])
    for _, total, contributors, plan in spied["sums"]:
        assert contributors and set(contributors) <= set(plan.clients)
        assert torch.equal(total, _expected_sum(spied, cfg, plan, contributors))


def test_a_client_that_drops_after_sending_its_masked_upload_stays_in_the_exact_sum(cache_dir, spied, monkeypatch):
    real = embedded_mod.Simulator.secure_unmask

    def one_silent(self, requests):  # the lowest client never answers the unmask request
        return real(self, {c: m for c, m in requests.items() if c != min(requests)})

    monkeypatch.setattr(embedded_mod.Simulator, "secure_unmask", one_silent)
    cfg = _cfg(cache_dir)
    cellm.run(cfg, save=False)
    for _, total, contributors, plan in spied["sums"]:
        assert contributors == plan.clients  # the silent one's vector is still in, unmasked by its neighbours
        assert torch.equal(total, _expected_sum(spied, cfg, plan, contributors))


def test_no_unmasked_upload_reaches_the_server(cache_dir, spied):
    cfg = _cfg(cache_dir)
    cellm.run(cfg, save=False)
    assert spied["payloads"]
    for (session, c), q in spied["q"].items():
        rnd = next(r for r, _, _, plan in spied["sums"]
                   if driver_mod.secure.round_params(cfg, r, plan.clients, 1).session == session)
        payload = spied["payloads"][rnd][c]
        params = driver_mod.secure.round_params(cfg, rnd, spied["sums"][rnd - 1][3].clients, q.size)
        plain = pack_ring(q, params.ring_bits)
        assert payload != plain and plain not in payload  # the server holds y = x + masks, never x
        y = parse_masked(params, payload).values
        assert float((y == q).mean()) < 0.05  # masked entries match the plain ones only by chance (1 in 2^R)
        # and they are spread over the whole ring, while the plain values sit near 0: mean |signed| / ring size
        ring = 1 << params.ring_bits
        assert np.abs(secagg.to_signed(y, params.ring_bits)).mean() > ring / 8


def test_every_protocol_byte_is_in_the_ledger_and_the_upload_carries_no_positions(cache_dir):
    plain = cellm.run(cellm.load_config(preset="tiny", overrides=[
        f"data.cache_dir='{cache_dir}'", *[s for s in SECURE if not s.startswith("secagg")]]), save=False)
    secure = cellm.run(_cfg(cache_dir), save=False)
    t = secure.totals
    assert t["secagg.up_bytes"] > 0 and t["secagg.down_bytes"] > 0
    # each masked upload is |S| values of R = 8 + ceil(log2 3) = 10 bits (3 clients a round) and a header
    uploads = t["up_messages"] - t["secagg.up_messages"]
    length = plain.totals["up_nonzeros"] // plain.totals["up_messages"]
    assert t["up_bytes"] - t["secagg.up_bytes"] == uploads * masked_size(length, 10)
    # the same support each round, values only: the masked uploads carry as many values as the plain ones
    assert t["up_nonzeros"] == plain.totals["up_nonzeros"]
    assert t["down_bytes"] == plain.totals["down_bytes"] + t["secagg.down_bytes"]


@pytest.mark.parametrize("override, field", [
    (["comm.up_support=topk"], "comm.up_support"),
    (["robust.clip_factor=1"], "robust.clip_factor"),
    (["robust.aggregator=median"], "robust.aggregator"),
    (["dp.noise_multiplier=0.5"], "dp.noise_multiplier"),
    (["faults.byzantine=0.2"], "faults.byzantine"),
    (["hetero.mode=density"], "hetero.mode"),
])
def test_what_secure_aggregation_rules_out_is_refused_at_load_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        cellm.load_config(preset="tiny", overrides=[*SECURE, *override])


def test_a_round_whose_clients_go_silent_before_training_leaves_the_model_unchanged(cache_dir, monkeypatch):
    monkeypatch.setattr(embedded_mod.Simulator, "secure_share", lambda self, keys: {})  # nobody shares
    result = cellm.run(_cfg(cache_dir, "rounds=2"), save=False)
    rows = result.metrics[1:]
    assert [r["applied"] for r in rows] == [False, False] and [r["accepted"] for r in rows] == [0, 0]
    assert result.final_eval == result.initial_eval
