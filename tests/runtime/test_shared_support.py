"""Shared-support uploads (comm.up_support) in whole runs: topk unchanged, values-only uploads of one length per
round, refusals, error feedback, the head, resume, the Flower task field, and the config rules."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

import cellm
from cellm.core.codec import CodecSpec
from cellm.core.codec.header import PositionScheme, unpack
from cellm.core.feedback import compress_on
from cellm.core.support import head_mask
from cellm.errors import ConfigError
from cellm.federated.server import round_support, support_shared_by_all
from cellm.interface import api
from cellm.runtime import runfolder as rf
from cellm.runtime.embedded import Simulator, simulate
from cellm.runtime.setup import load_setup

IR_INT4 = ["comm.init_relative=true", "comm.error_feedback_up=true", 'comm.codec_up="int4"', 'comm.codec_down="int4"',
           "comm.down_density=0.25"]


def _cfg(cache_dir, *extra):
    return cellm.load_config(preset="tiny", overrides=[f"data.cache_dir='{cache_dir}'", *extra])


def test_topk_uploads_are_unchanged_bytes_and_evaluations_of_the_tiny_preset(cache_dir):
    """Pinned from the tiny preset before shared supports existed (per-client top-k, the default)."""
    res = cellm.run(_cfg(cache_dir), save=False)
    assert res.config.comm.up_support == "topk"
    assert res.totals == {"down_bytes": 22947, "down_nonzeros": 5346, "down_messages": 9, "up_bytes": 22950,
                          "up_nonzeros": 5346, "up_messages": 9}
    assert [r["eval"]["accuracy"] for r in res.metrics] == [0.140625, 0.140625, 0.125, 0.125]
    assert [r["eval"]["loss"] for r in res.metrics] == pytest.approx(
        [1.6085904836654663, 1.6170421838760376, 1.6170598268508911, 1.6193921566009521], abs=1e-6)


class Recorder:
    """Wraps the driver's round functions: every plan, every reply as sent, every outcome."""

    def __init__(self, monkeypatch, head=None, tamper=None):
        import cellm.runtime.driver as D

        self.plans, self.replies, self.outcomes = [], [], []
        real_plan, real_attacks, real_finish = D.plan_round, D.simulate_attacks, D.finish_round

        def plan_round(*a, **k):
            if head is not None and len(a) >= 5:  # the driver passes the head itself: it must be this one
                assert torch.equal(a[4], head)
            self.plans.append(real_plan(*a, **k))
            return self.plans[-1]

        def simulate_attacks(cfg, plan, replies):
            self.replies.append({c: r.payload for c, r in replies.items()})
            if tamper is not None:
                tamper(plan, replies)
            return real_attacks(cfg, plan, replies)

        def finish_round(*a, **k):
            self.outcomes.append(real_finish(*a, **k))
            return self.outcomes[-1]

        monkeypatch.setattr(D, "plan_round", plan_round)
        monkeypatch.setattr(D, "simulate_attacks", simulate_attacks)
        monkeypatch.setattr(D, "finish_round", finish_round)


@pytest.mark.parametrize("rule", ["random", "download+random"])
def test_every_upload_of_a_round_is_values_only_on_one_shared_support(cache_dir, monkeypatch, rule):
    rec = Recorder(monkeypatch)
    res = cellm.run(_cfg(cache_dir, f'comm.up_support="{rule}"', *IR_INT4), save=False)
    for plan, sent, row in zip(rec.plans, rec.replies, res.metrics[1:], strict=True):
        support = round_support(plan)
        assert support is not None and support.numel() == int(1189 * 0.5)  # the tiny adapter, d_up = 0.5
        for payload in sent.values():
            h, off, _ = unpack(memoryview(payload))
            assert h.positions == PositionScheme.DENSE and h.pos_len == 0 and h.n == h.k == support.numel()
        assert len({len(p) for p in sent.values()}) == 1  # the same length for every client
        assert row["up_nonzeros"] == len(sent) * support.numel()
        assert row["up_bytes"] == sum(len(p) for p in sent.values())
    assert len({tuple(round_support(p).tolist()) for p in rec.plans}) == len(rec.plans)  # new each round
    assert support_shared_by_all(res.config)


@pytest.mark.parametrize("extra", [['hetero.mode="density"', "hetero.num_tiers=2", "dp.noise_multiplier=0.5"],
                                   ['hetero.mode="rank"', "hetero.num_tiers=2", 'comm.up_support="download+random"']])
def test_tiers_and_dp_upload_on_each_tiers_own_shared_support(cache_dir, monkeypatch, extra):
    rec = Recorder(monkeypatch)
    res = cellm.run(_cfg(cache_dir, 'comm.up_support="random"', *IR_INT4, "rounds=2", "fl.clients_per_round=4",
                         *extra), save=False)
    assert not support_shared_by_all(res.config)
    for plan, sent in zip(rec.plans, rec.replies, strict=True):
        tiers = {c % 2 for c in plan.clients}
        by_tier = {c % 2: plan.up_supports[c] for c in plan.clients}
        assert all(torch.equal(plan.up_supports[c], by_tier[c % 2]) for c in plan.clients)
        assert all(unpack(memoryview(sent[c]))[0].n == plan.up_supports[c].numel() for c in sent)
        if len(tiers) == 2:  # the smaller tier's support is smaller (density) or inside its ranks (rank)
            assert by_tier[0].numel() < by_tier[1].numel() and round_support(plan) is None
    assert any(len({c % 2 for c in plan.clients}) == 2 for plan in rec.plans)
    assert all(r["applied"] and r["rejected"] == 0 for r in res.metrics[1:])


def test_a_download_support_is_the_rounds_download_mask_with_its_positions_sent(cache_dir, monkeypatch):
    rec = Recorder(monkeypatch)
    cellm.run(_cfg(cache_dir, 'comm.up_support="download"', *IR_INT4), save=False)
    for plan in rec.plans:  # round 1 of an init-relative run: M is sent even though every value is 0
        assert round_support(plan).numel() == int(1189 * 0.25)
        assert all(t.download_masked for t in plan.tasks.values())


def test_a_server_chosen_support_travels_in_the_download_and_grows_it_to_the_upload_density(cache_dir, monkeypatch):
    rec = Recorder(monkeypatch)
    res = cellm.run(_cfg(cache_dir, 'comm.up_support="server"', *IR_INT4, "comm.up_density=0.5"), save=False)
    for plan, row in zip(rec.plans, res.metrics[1:], strict=True):
        support = round_support(plan)
        assert support is not None and support.numel() == int(1189 * 0.5)
        assert row["down_nonzeros"] == 3 * support.numel()  # M (a quarter) and the server's choice, sent
    assert all(r["accepted"] == 3 for r in res.metrics[1:])


def test_the_server_chooses_the_entries_of_largest_first_moment_outside_the_download_mask(cache_dir):
    from cellm.federated.server import ServerState, server_support

    cfg = _cfg(cache_dir, 'comm.up_support="server"')
    state = ServerState.initial(torch.zeros(100))
    moment = torch.arange(100.0) * torch.tensor([1.0, -1.0]).repeat(50)  # |moment| grows with the position
    state.opt_state = {"state": {0: {"exp_avg": moment}}, "param_groups": []}
    mask = torch.zeros(100, dtype=torch.bool)
    mask[40:50] = True
    chosen = server_support(state, cfg, 1, mask, 0.3)
    assert chosen.nonzero().reshape(-1).tolist() == [*range(40, 50), *range(80, 100)]
    rank = torch.ones(100, dtype=torch.bool)
    rank[95:] = False  # a rank tier that cannot train entries 95-99: the next largest are taken instead
    chosen = server_support(state, cfg, 1, mask, 0.3, support=rank)
    assert chosen.nonzero().reshape(-1).tolist() == [*range(40, 50), *range(75, 95)]
    state.opt_state = None  # round 1: no moment yet, the seeded order fills
    assert int(server_support(state, cfg, 1, mask, 0.3).sum()) == 30


def test_an_upload_of_the_wrong_length_is_refused_and_the_others_are_applied(cache_dir, monkeypatch):
    def shorten(plan, replies):
        c = plan.clients[0]
        support = plan.up_supports[c]
        payload, _, _ = compress_on(torch.ones(1189), support[:-1], CodecSpec())
        replies[c] = dataclasses.replace(replies[c], payload=payload)

    rec = Recorder(monkeypatch, tamper=shorten)
    res = cellm.run(_cfg(cache_dir, 'comm.up_support="random"', "rounds=2"), save=False)
    for plan, out in zip(rec.plans, rec.outcomes, strict=True):
        assert list(out.rejected) == [plan.clients[0]] and "expected n" in out.rejected[plan.clients[0]]
        assert out.applied and len(out.accepted) == 2
    assert [r["rejected"] for r in res.metrics[1:]] == [1, 1]


def test_error_feedback_keeps_the_part_of_the_update_outside_the_support(cache_dir, monkeypatch):
    rec = Recorder(monkeypatch)
    cfg = _cfg(cache_dir, 'comm.up_support="random"', "comm.error_feedback_up=true", "rounds=1")
    setup = load_setup(cfg)
    sim = Simulator(cfg, setup)
    simulate(cfg, setup, sim=sim)
    plan = rec.plans[0]
    support = round_support(plan)
    inside = torch.zeros(setup.flat.numel, dtype=torch.bool)
    inside[support] = True
    for c in plan.clients:  # fp32 values: nothing of S is kept, and the update outside S is kept whole
        residual = sim.client_states[c].pending_residual
        assert torch.equal(residual[inside], torch.zeros(int(inside.sum())))
        assert (residual[~inside] != 0).float().mean() > 0.5


def test_the_head_option_adds_every_head_entry_to_the_support(cache_dir, monkeypatch):
    cfg = _cfg(cache_dir, 'comm.up_support="random"', "comm.up_support_head=true", "comm.up_density=0.25",
               "rounds=2")
    with pytest.raises(ValueError, match="head"):  # the server must be given the head's positions
        from cellm.federated.server import ServerState, plan_round
        plan_round(ServerState.initial(torch.zeros(1189)), cfg)
    setup = load_setup(cfg)
    head = head_mask(setup.flat.segments(), setup.flat.numel)
    rec = Recorder(monkeypatch, head=head)
    res = simulate(cfg, setup)
    for plan in rec.plans:
        support = round_support(plan)
        assert support.numel() == int(1189 * 0.25) and bool(torch.isin(head.nonzero().reshape(-1), support).all())
    assert all(r["accepted"] == 3 for r in res.metrics[1:])


def test_a_shared_support_run_stopped_midway_resumes_to_the_same_adapter_and_ledger(tmp_path, cache_dir,
                                                                                       monkeypatch):
    cfg = _cfg(cache_dir, 'comm.up_support="download+random"', *IR_INT4, "rounds=4", "run.checkpoint_every=1",
               "run.threads=1")
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    api.run(cfg, full)

    class Stop(Exception):
        pass

    real = rf.save_checkpoint

    def save_then_stop(out, state):
        real(out, state)
        if state["server"]["round"] == 2:
            raise Stop

    monkeypatch.setattr(rf, "save_checkpoint", save_then_stop)
    with pytest.raises(Stop):
        api.run(cfg, stopped)
    monkeypatch.setattr(rf, "save_checkpoint", real)
    api.resume(stopped)
    a = load_file(full / "adapter" / "adapter_model.safetensors")
    b = load_file(stopped / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = ("wall_s", "round_s", "eval_s", "overhead_s")
    assert [{k: v for k, v in r.items() if k not in strip} for r in rf.read_metrics(full)] == \
           [{k: v for k, v in r.items() if k not in strip} for r in rf.read_metrics(stopped)]


def test_the_config_refuses_shared_support_settings_that_mean_nothing(cache_dir):
    with pytest.raises(ConfigError, match="comm.up_support_head"):
        _cfg(cache_dir, "comm.up_support_head=true")
    with pytest.raises(ConfigError, match="comm.up_support"):
        _cfg(cache_dir, "comm.client_freeze=true", 'comm.up_support="random"')
    with pytest.raises(ConfigError, match="comm.up_support"):
        _cfg(cache_dir, 'comm.up_support="everything"')
    with pytest.raises(ConfigError, match="comm.up_support_head"):
        _cfg(cache_dir, 'comm.up_support="random"', "comm.up_support_head=true", "slora.stage1_rounds=1")
    with pytest.raises(ConfigError, match="comm.download_mode"):
        _cfg(cache_dir, 'comm.up_support="server"', 'comm.download_mode="delta"')
    _cfg(cache_dir, "comm.client_freeze=true", 'comm.up_support="download"')


def test_a_node_refuses_a_task_with_an_unknown_upload_support():
    pytest.importorskip("flwr")
    from cellm.federated.messages import ClientTask
    from cellm.runtime.flower import protocol as P

    task = ClientTask(round=2, client=1, download=b"x", up_density=0.5, codec_up=CodecSpec(), up_support="random",
                      up_support_head=True)
    content = P.task_content([task], "d" * 64)
    assert P.read_tasks(content)[0] == [task]
    assert "up_support" not in P.task_content([dataclasses.replace(task, up_support="topk", up_support_head=False)],
                                              "d" * 64).config_records[P.TASKS]  # the default costs no bytes
    content.config_records[P.TASKS]["up_support"] = "all-of-it"
    with pytest.raises(P.ProtocolError, match="up_support must be one of"):
        P.read_tasks(content)
    content.config_records[P.TASKS]["up_support"] = "topk"
    with pytest.raises(P.ProtocolError, match="up_support_head needs a shared"):
        P.read_tasks(content)
