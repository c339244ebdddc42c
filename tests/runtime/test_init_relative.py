"""Init-relative downloads: the top-k of w - w0, where w0 is the seeded initial adapter each client rebuilds."""

import pytest
import torch

import cellm
from cellm.core.codec import decode
from cellm.federated import client as client_mod
from cellm.federated.client import ClientState, InitMismatchError, client_update
from cellm.federated.messages import train_spec, vector_digest
from cellm.federated.server import ServerState, masked_weights, plan_round
from cellm.runtime.setup import load_setup


@pytest.fixture(scope="module")
def cfg(cache_dir):
    return cellm.load_config(preset="tiny", overrides=[
        f"data.cache_dir='{cache_dir}'", "comm.init_relative=true", "comm.down_density=0.25",
        "comm.up_density=0.25"])


@pytest.fixture(scope="module")
def setup(cfg):
    return load_setup(cfg)


def capture_start(monkeypatch):
    """Replace local training by 'return the start unchanged' and record what each client started from."""
    seen = {}

    def fake_train(model, flat, start, data, spec, *, seed, round_, client, grad_mask=None):
        seen[client] = (start.clone(), grad_mask)
        return start.clone(), 0.0

    monkeypatch.setattr(client_mod, "local_train", fake_train)
    return seen


def test_w0_rebuilt_by_a_client_equals_the_servers_bit_for_bit(cfg, setup):
    other = load_setup(cfg)  # a second process would do the same: build the model from the config and seed
    assert torch.equal(other.w0, setup.w0)
    assert vector_digest(other.w0) == vector_digest(setup.w0)
    reseeded = load_setup(cellm.load_config(data={**cfg.to_dict(), "seed": 1}))
    assert vector_digest(reseeded.w0) != vector_digest(setup.w0)  # the digest does tell inits apart


def test_a_client_whose_w0_differs_refuses_the_task(cfg, setup):
    plan = plan_round(ServerState.initial(setup.w0), cfg)
    c = plan.clients[0]
    wrong = setup.w0.clone()
    wrong[0] += 1e-6
    for w0 in (wrong, None):
        with pytest.raises(InitMismatchError, match="initial adapter"):
            client_update(setup.loaded.model, setup.flat, setup.data.clients[c], plan.tasks[c], train_spec(cfg),
                          ClientState(), seed=cfg.seed, w0=w0)


def test_round_one_downloads_nothing_but_starts_clients_from_w0(cfg, setup, monkeypatch):
    seen = capture_start(monkeypatch)
    state = ServerState.initial(setup.w0)
    plan = plan_round(state, cfg)
    assert torch.equal(masked_weights(state, cfg, 1), setup.w0)
    for c in plan.clients:
        assert decode(plan.tasks[c].download, max_n=setup.flat.numel).k == 0
        client_update(setup.loaded.model, setup.flat, setup.data.clients[c], plan.tasks[c], train_spec(cfg),
                      ClientState(), seed=cfg.seed, w0=setup.w0)
        assert torch.equal(seen[c][0], setup.w0)
    assert state.ledger.round_totals(1)["down_nonzeros"] == 0


def test_clients_start_from_w0_plus_the_masked_difference(cfg, setup, monkeypatch):
    seen = capture_start(monkeypatch)
    w0 = setup.w0
    w = w0 + torch.randn(w0.numel(), generator=torch.Generator().manual_seed(3))
    state = ServerState(w=w, w0=w0.clone(), round=4)
    diff = w - w0
    mask = torch.zeros(w.numel(), dtype=torch.bool)
    mask[diff.abs().argsort(descending=True)[: int(w.numel() * 0.25)]] = True
    expected = w0 + mask * diff
    assert torch.equal(masked_weights(state, cfg, 5), expected)
    plan = plan_round(state, cfg)
    c = plan.clients[0]
    client_update(setup.loaded.model, setup.flat, setup.data.clients[c], plan.tasks[c], train_spec(cfg),
                  ClientState(), seed=cfg.seed, w0=w0)
    assert torch.allclose(seen[c][0], expected, rtol=0, atol=1e-6)  # w0 + (w - w0) rounds once in float32
    assert torch.equal(seen[c][0] != w0, mask)


def test_flasc_downloads_spend_round_one_on_as_init(setup, cache_dir):
    """The contrast: FLASC's top-k of |w| sends A's seeded init values, which init-relative never sends."""
    flasc = cellm.load_config(preset="tiny", overrides=[f"data.cache_dir='{cache_dir}'", "comm.down_density=0.25"])
    state = ServerState.initial(setup.w0)
    plan = plan_round(state, flasc)
    sent = decode(plan.tasks[plan.clients[0]].download, max_n=setup.flat.numel)
    assert sent.k == int(setup.flat.numel * 0.25)
    assert torch.equal(sent.values, setup.w0[sent.indices])


def test_pruned_lora_trains_b_after_its_dense_round(cache_dir):
    cfg = cellm.load_config(preset="tiny", overrides=[
        f"data.cache_dir='{cache_dir}'", "comm.freeze_mask_after=1", "comm.client_freeze=true",
        "comm.down_density=0.25", "comm.up_density=1.0", "client.lr=0.5"])
    setup = load_setup(cfg)
    state = ServerState.initial(setup.w0)
    plan = plan_round(state, cfg)
    c = plan.clients[0]
    assert not plan.tasks[c].download_masked  # the dense round: nothing is frozen yet
    reply, _ = client_update(setup.loaded.model, setup.flat, setup.data.clients[c], plan.tasks[c], train_spec(cfg),
                             ClientState(), seed=cfg.seed, w0=setup.w0)
    up = decode(reply.payload, max_n=setup.flat.numel).to_dense()
    b = torch.zeros(setup.flat.numel, dtype=torch.bool)
    for name, lo, hi in setup.flat.segments():
        b[lo:hi] = "lora_B" in name
    assert bool(b.any()) and bool((setup.w0[b] == 0).all())
    assert int((up[b] != 0).sum()) > 0  # B moved although it started at exactly zero


def test_pruned_lora_clients_train_only_on_the_frozen_mask(cache_dir, monkeypatch):
    cfg = cellm.load_config(preset="tiny", overrides=[
        f"data.cache_dir='{cache_dir}'", "comm.freeze_mask_after=1", "comm.client_freeze=true",
        "comm.down_density=0.25", "comm.up_density=1.0", "rounds=2"])
    setup = load_setup(cfg)
    state = ServerState.initial(setup.w0)
    state.frozen_mask = torch.zeros(setup.flat.numel, dtype=torch.bool)
    state.frozen_mask[::3] = True
    state.round = 1
    seen = capture_start(monkeypatch)
    plan = plan_round(state, cfg)
    c = plan.clients[0]
    assert plan.tasks[c].download_masked
    client_update(setup.loaded.model, setup.flat, setup.data.clients[c], plan.tasks[c], train_spec(cfg),
                  ClientState(), seed=cfg.seed, w0=setup.w0)
    assert torch.equal(seen[c][1], state.frozen_mask)  # M itself, zeros of w inside it included
