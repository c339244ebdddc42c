import dataclasses

import torch

import cellm
from cellm.runtime.embedded import Simulator, simulate
from cellm.runtime.setup import load_setup


def _run(cache_dir, *extra):
    cfg = cellm.load_config(preset="tiny", overrides=[f"data.cache_dir='{cache_dir}'", "rounds=4", *extra])
    setup = load_setup(cfg)
    sim = Simulator(cfg, setup)
    state = simulate(cfg, setup, sim=sim)
    return cfg, state, sim


def test_in_delta_download_mode_each_clients_copy_matches_the_servers_record_of_it(cache_dir):
    cfg, state, sim = _run(cache_dir, "comm.download_mode=delta", "comm.down_density=0.25", "fl.clients_per_round=5")
    assert state.client_copies
    for c, copy in state.client_copies.items():
        assert torch.equal(sim.client_states[c].settle(state.acked[c]).copy, copy)


def test_delta_copies_stay_in_step_when_uploads_are_refused(cache_dir, monkeypatch):
    """A refused upload must not advance the server's copy of that client, nor (once the next task says so) the
    client's own: otherwise the two copies differ for good and every later delta is applied to the wrong base."""
    import cellm.runtime.driver as D

    real = D.simulate_attacks

    def refuse_some(cfg, plan, replies):  # every other sampled client's upload arrives torn
        for c in plan.clients[::2]:
            if c in replies:
                replies[c] = dataclasses.replace(replies[c], payload=replies[c].payload[:7])
        return real(cfg, plan, replies)

    monkeypatch.setattr(D, "simulate_attacks", refuse_some)
    cfg, state, sim = _run(cache_dir, "comm.download_mode=delta", "comm.down_density=0.25",
                           "comm.error_feedback_up=true", "comm.up_density=0.25", "rounds=6", "fl.clients_per_round=4")
    refused = sum(r.get("rejected", 0) for r in state.metrics)
    assert refused >= 6
    for c, st in sim.client_states.items():
        settled = st.settle(state.acked.get(c, 0))
        server_copy = state.client_copies.get(c)
        if server_copy is None:  # never accepted: both sides still hold the reference
            assert st.pending_round and state.acked.get(c, 0) == 0
        else:
            assert torch.equal(settled.copy, server_copy), f"client {c} and the server disagree on its copy"


def test_a_dense_lossless_delta_download_gives_the_client_the_exact_global_adapter(cache_dir):
    cfg = cellm.load_config(preset="tiny", overrides=[f"data.cache_dir='{cache_dir}'", "rounds=4",
                                                       "comm.download_mode=delta", "comm.down_density=1.0"])
    setup = load_setup(cfg)
    sim = Simulator(cfg, setup)
    snapshots = {}
    simulate(cfg, setup, sim=sim, on_round=lambda st, row: snapshots.__setitem__(st.round, st.w.clone()))
    last_clients = [c for c in sim.client_states]
    # every client's copy is the global adapter as it stood when that client last took part (copy + (w - copy)
    # equals w up to one float32 rounding; what rounding leaves is part of the next change sent)
    rounds_of = {}
    for t in range(1, 5):
        from cellm.federated.seeds import sample_clients

        for c in sample_clients(cfg.seed, t, cfg.data.num_clients, cfg.fl.clients_per_round):
            rounds_of[c] = t
    for c in last_clients:
        assert torch.allclose(sim.client_states[c].pending_copy, snapshots[rounds_of[c] - 1], rtol=0, atol=1e-7)


def test_delta_downloads_get_cheaper_than_weight_downloads_once_clients_hold_a_copy(cache_dir):
    _, weights, _ = _run(cache_dir, "comm.down_density=1.0", "fl.clients_per_round=10", "comm.codec_down=fp32")
    _, delta, _ = _run(cache_dir, "comm.download_mode=delta", "comm.down_density=0.1", "fl.clients_per_round=10")
    assert delta.ledger.round_totals(4)["down_bytes"] < weights.ledger.round_totals(4)["down_bytes"] / 4


def test_upload_error_feedback_keeps_a_residual_per_client_across_rounds(cache_dir):
    _, state, sim = _run(cache_dir, "comm.error_feedback_up=true", "comm.up_density=0.1")
    assert sim.client_states and all(s.pending_residual is not None and s.pending_residual.abs().sum() > 0
                                     for s in sim.client_states.values())


def test_int8_values_cut_upload_bytes_roughly_fourfold(cache_dir):
    _, fp32, _ = _run(cache_dir, "comm.up_density=1.0")
    _, int8, _ = _run(cache_dir, "comm.up_density=1.0", "comm.codec_up=int8")
    ratio = fp32.ledger.totals()["up_bytes"] / int8.ledger.totals()["up_bytes"]
    assert 3.2 < ratio < 4.1  # values shrink 4x; positions (none when dense), scales and header do not


def test_delta_mode_evaluates_and_saves_the_global_adapter_that_stateful_clients_track(cache_dir):
    cfg, state, _ = _run(cache_dir, "comm.download_mode=delta", "comm.down_density=0.25")
    from cellm.federated.server import masked_weights, model_weights

    assert torch.equal(model_weights(state, cfg, 5), state.w)
    assert int((masked_weights(state, cfg, 5) != 0).sum()) < int((state.w != 0).sum())
    weights_cfg = cellm.load_config(preset="tiny", overrides=[f"data.cache_dir='{cache_dir}'", "comm.down_density=0.25"])
    assert torch.equal(model_weights(state, weights_cfg, 5), masked_weights(state, weights_cfg, 5))
