"""Secure aggregation (secagg.enabled) on Flower: the same adapter and ledger as the embedded runtime on nodes that
serve several clients, with clients dropping after sharing; a node's malformed stage answer is refused, counted,
and its client dropped while the round sums the others exactly; nodes refuse tasks and stage messages whose ring or
round parameters differ from their own config; the stage messages' fields are checked both ways."""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("flwr", reason="Flower is not installed: pip install 'cellm[flower]' (make test does)")

import test_flower  # noqa: E402
import test_secure_aggregation as embedded_secagg  # noqa: E402
import torch  # noqa: E402
from flwr.app import ConfigRecord, Message, MessageType, RecordDict  # noqa: E402

import cellm  # noqa: E402
from cellm.core.codec import CodecSpec  # noqa: E402
from cellm.federated import secure  # noqa: E402
from cellm.federated.messages import ClientTask  # noqa: E402
from cellm.runtime.flower import protocol as P  # noqa: E402

flower_env = test_flower.flower_env  # the Flower tests' settings fixture (FLWR_HOME, one torch thread, ...)
spied = embedded_secagg.spied  # records each client's ring values before masking and the server's sums
NODES = [{"partition-id": 0, "num-partitions": 2}, {"cellm-clients": "1,3,5"}]  # three clients a node


def _cfg(cache_dir, *extra):
    return cellm.load_config(preset="tiny", overrides=[
        f"data.cache_dir='{cache_dir}'", *embedded_secagg.SECURE, "data.num_clients=6", "fl.clients_per_round=4",
        *extra])


class CountingGrid(test_flower.LoopbackGrid):
    """A LoopbackGrid that adds up the Flower bytes of every round's messages (train and secagg stages) and replies."""

    def __init__(self, node_configs) -> None:
        super().__init__(node_configs)
        self.down = self.up = 0

    @staticmethod
    def counted(msg) -> bool:
        return msg.metadata.message_type not in (MessageType.QUERY, P.FINISH_TYPE)  # not the setup, not the end

    def push_messages(self, messages):
        ids = super().push_messages(messages)
        self.down += sum(P.transport_size(m) for m in messages if self.counted(m))
        return ids

    def pull_messages(self, message_ids):
        replies = super().pull_messages(message_ids)
        self.up += sum(P.transport_size(r) for r in replies if self.counted(r))
        return replies


def test_secure_aggregation_on_shared_nodes_matches_embedded_when_clients_drop_after_sharing(flower_env, cache_dir):
    from cellm.runtime.flower.server_app import DriverOptions, run_server

    cfg = _cfg(cache_dir, "faults.failure_prob=0.3")
    embedded = cellm.run(cfg, save=False)
    grid = CountingGrid(NODES)
    flower = run_server(grid, cfg, None, DriverOptions(node_wait_s=5))
    assert sum(r["failed"] for r in flower.metrics[1:]) > 0, "the seed should drop someone after sharing"
    test_flower.assert_same_run(embedded, flower)  # adapter bit for bit; ledger with the protocol's own bytes
    assert flower.totals["secagg.up_bytes"] > 0 and flower.totals["secagg.down_bytes"] > 0
    assert all(r["refused"] == 0 for r in flower.metrics)
    # every round's Flower bytes, the stage messages' included, are in its row (and exceed the payloads')
    rows = flower.metrics[1:]
    assert (sum(r["down_transport_bytes"] for r in rows), sum(r["up_transport_bytes"] for r in rows)) == (
        grid.down, grid.up)
    assert all(r["up_transport_bytes"] > r["up_bytes"] and r["down_transport_bytes"] > r["down_bytes"] for r in rows)
    # the clients' secrets stayed on their nodes, and are gone once the run completed
    assert all(sorted(node.state.keys()) == [P.STATE_CONFIG] for node in grid.nodes.values())


class GarblingGrid(test_flower.LoopbackGrid):
    """A LoopbackGrid whose node ``bad`` truncates its first client's answer to every ``stage`` message."""

    def __init__(self, node_configs, bad: int, stage: str) -> None:
        super().__init__(node_configs)
        self.bad, self.type = bad, P.SECAGG_TYPES[stage]

    def push_messages(self, messages):
        ids = super().push_messages(messages)
        for m in messages:
            reply = self.replies.get(m.metadata.message_id)
            if m.metadata.dst_node_id == self.bad and m.metadata.message_type == self.type and not reply.has_error():
                rec = reply.content.config_records[P.SECAGG]
                rec[P.PAYLOADS] = [rec[P.PAYLOADS][0][:-1], *rec[P.PAYLOADS][1:]]
        return ids


@pytest.mark.parametrize("stage", P.SECAGG_STAGES)
def test_a_malformed_stage_answer_is_refused_and_the_round_sums_the_others_exactly(flower_env, cache_dir, spied,
                                                                                   stage):
    from cellm.runtime.flower.server_app import DriverOptions, run_server

    cfg = _cfg(cache_dir, "rounds=2")
    grid = GarblingGrid(NODES, bad=101, stage=stage)
    result = run_server(grid, cfg, None, DriverOptions(node_wait_s=5))
    odd = [min(c for c in plan.clients if c % 2) for _, _, _, plan in spied["sums"]]  # node 101's first client
    assert len(spied["sums"]) == 2 and all(r["applied"] for r in result.metrics[1:])
    assert [r["refused"] for r in result.metrics[1:]] == [1, 1]
    for (_, total, contributors, plan), bad in zip(spied["sums"], odd, strict=True):
        if stage == "unmask":  # its masked vector came: its neighbours' shares remove the masks
            assert contributors == plan.clients
        else:  # dropped before it trained
            assert contributors == [c for c in plan.clients if c != bad]
        assert torch.equal(total, embedded_secagg._expected_sum(spied, cfg, plan, contributors))
    if stage != "unmask":
        assert [r["rejected"] for r in result.metrics[1:]] == [1, 1]


# ------------------------------------------------------------------ what a node refuses


@pytest.fixture
def node(flower_env, cache_dir):
    """A set-up node serving every client, and the strategy that set it up."""
    from cellm.runtime.flower.server_app import CellmStrategy

    grid = test_flower.LoopbackGrid([{"partition-id": 0, "num-partitions": 1}])
    strategy = CellmStrategy(grid, _cfg(cache_dir))
    strategy.discover(grid, 5)
    return grid, strategy


def _ask(grid, content, message_type) -> Message:
    msg = Message(content, dst_node_id=100, message_type=message_type, group_id="1")
    (i,) = grid.push_messages([msg])
    (reply,) = grid.pull_messages([i])
    return reply


def _task(cfg, **ring) -> ClientTask:
    return ClientTask(round=1, client=0, download=b"\x00" * 8, up_density=0.25, codec_up=CodecSpec(),
                      up_support="random", **ring)


def test_a_node_refuses_a_task_whose_ring_differs_from_its_config_or_that_asks_for_a_plain_upload(node):
    grid, strategy = node
    cfg = strategy.cfg
    routed = b"\x01" * 64
    good = {"ring_bits": cfg.secagg.value_bits, "ring_clip": cfg.secagg.clip,
            "ring_clients": secure.quant_spec(cfg).max_clients, "secagg_routed": routed}
    for ring in ({**good, "ring_clip": cfg.secagg.clip * 2}, {**good, "ring_bits": 16},
                 {**good, "ring_clients": 16}, {}):
        reply = _ask(grid, P.task_content([_task(cfg, **ring)], strategy.digest), MessageType.TRAIN)
        assert reply.has_error() and "ring" in reply.error.reason and "this node's config" in reply.error.reason


def test_a_node_refuses_stage_messages_whose_round_parameters_differ_from_its_config(node, cache_dir):
    grid, strategy = node
    clients = [0, 2, 5]
    ok = secure.round_params(strategy.cfg, 1, clients, 40)
    other = secure.round_params(_cfg(cache_dir, "secagg.clip=0.5"), 1, clients, 40)
    reply = _ask(grid, P.secagg_content("advertise", 1, other, strategy.digest, {0: b""}), P.SECAGG_TYPES["advertise"])
    assert reply.has_error() and "parameters differ" in reply.error.reason
    assert P.STATE_SECAGG not in grid.nodes[100].state  # nothing kept from a refused message
    reply = _ask(grid, P.secagg_content("advertise", 1, ok, strategy.digest, {0: b"", 5: b""}),
                 P.SECAGG_TYPES["advertise"])
    assert not reply.has_error()
    kept = grid.nodes[100].state.config_records[P.STATE_SECAGG]
    assert kept["clients"] == [0, 5] and kept["round"] == 1
    ads = P.read_secagg_reply(reply.content, "advertise", 1, ok)
    assert sorted(ads) == [0, 5] and all(P.read_secagg_part(ok, "advertise", c, m, b"") for c, m in ads.items())
    assert all(secret not in m for m in ads.values() for secret in kept["states"])  # the keys stay on the node
    # a share message of another round, or before this node's clients made keys, is refused
    reply = _ask(grid, P.secagg_content("share", 2, secure.round_params(strategy.cfg, 2, clients, 40),
                                        strategy.digest, {0: b"x"}), P.SECAGG_TYPES["share"])
    assert reply.has_error() and "no secure-aggregation keys for round 2" in reply.error.reason


# ------------------------------------------------------------------ the messages' fields


def test_tasks_carry_the_ring_and_routed_shares_and_refuse_oversized_or_stray_shares():
    codec = CodecSpec()
    ring = {"ring_bits": 8, "ring_clip": 0.05, "ring_clients": 3}
    tasks = [ClientTask(round=2, client=c, download=b"d", up_density=0.25, codec_up=codec, up_support="random",
                        secagg_routed=bytes([c]) * 100, **ring) for c in (1, 4)]
    got, _, _ = P.read_tasks(P.task_content(tasks, "0" * 64))
    assert got == tasks
    limit = P.max_routed_bytes(3)
    big = dataclasses.replace(tasks[0], secagg_routed=b"\x00" * (limit + 1))
    with pytest.raises(P.ProtocolError, match=f"secagg_routed has {limit + 1} bytes"):
        P.read_tasks(P.task_content([big], "0" * 64))
    stray = dataclasses.replace(tasks[0], ring_bits=0, ring_clip=0.0, ring_clients=0)
    with pytest.raises(P.ProtocolError, match="must be unset when ring_bits is 0"):
        P.read_tasks(P.task_content([stray], "0" * 64))
    topk = dataclasses.replace(tasks[0], up_support="topk")
    with pytest.raises(P.ProtocolError, match="needs a shared up_support"):
        P.read_tasks(P.task_content([topk], "0" * 64))


def _params(clients=(0, 2, 5)):
    cfg = cellm.load_config(preset="tiny", overrides=[*embedded_secagg.SECURE, "data.num_clients=6",
                                                      "fl.clients_per_round=4"])
    return secure.round_params(cfg, 3, list(clients), 40)


@pytest.mark.parametrize("field, value, error", [
    (P.STAGE, "unmask", "'stage' field says"),
    (P.ROUND, 2, "not this round"),
    (P.CLIENTS, [0, 0], "distinct client ids"),
    (P.CLIENTS, [1], "not sampled in round 3"),
    (P.PAYLOADS, [b"\x00" * 10_000], "byte strings of 1 to"),
    (P.PAYLOADS, ["text"], "byte strings of 1 to"),
    ("extra", 1, "unknown fields"),
])
def test_the_server_refuses_a_stage_reply_with_a_bad_field_naming_it(field, value, error):
    params = _params()
    content = P.secagg_reply_content("share", 3, {0: b"\x01" * 30})
    content.config_records[P.SECAGG][field] = value
    with pytest.raises(P.ProtocolError, match=error):
        P.read_secagg_reply(content, "share", 3, params)


def test_a_stage_answer_that_is_not_its_clients_or_not_what_it_was_asked_is_refused():
    from cellm.core import secagg

    params = _params()
    states, ads = {}, {}
    for c in params.client_ids:
        states[c], ads[c] = secagg.client_advertise(params, c)
    assert P.read_secagg_part(params, "advertise", 0, ads[0], b"") == ads[0]
    with pytest.raises(P.ProtocolError, match="names client 2 as its sender"):
        P.read_secagg_part(params, "advertise", 0, ads[2], b"")
    with pytest.raises(P.ProtocolError, match="client 0: ADVERTISE message"):
        P.read_secagg_part(params, "advertise", 0, ads[0][:-1], b"")
    _, keys = secagg.server_route_keys(params, ads)
    _, shares = secagg.client_share(states[0], keys[0])
    assert P.read_secagg_part(params, "share", 0, shares, keys[0]) == shares
    fewer = dict(ads)
    del fewer[5]
    _, keys_without_5 = secagg.server_route_keys(params, fewer)  # shares for a neighbour it was not sent
    with pytest.raises(P.ProtocolError, match="not addressed to exactly the neighbours"):
        P.read_secagg_part(params, "share", 0, shares, keys_without_5[0])


def test_a_node_reads_a_stage_message_only_with_every_field_in_range():
    params = _params()
    good = P.secagg_content("share", 3, params, "a" * 64, {0: b"\x01" * 30, 2: b"\x02" * 30})
    q = P.read_secagg_query(good, "share")
    assert (q.round, q.round_clients, q.length, q.parts) == (3, [0, 2, 5], 40, {0: b"\x01" * 30, 2: b"\x02" * 30})
    for field, value, error in [(P.ROUND_CLIENTS, [5, 2, 0], "increasing client ids"),
                                (P.ROUND_CLIENTS, [0], "2 to"), (P.CLIENTS, [1], "not among the round's"),
                                (P.LENGTH, 0, "length must be an int"), (P.PARAMS_DIGEST, "X", "hex digits"),
                                (P.PAYLOADS, [b"\x01" * 10_000, b"\x02"], "byte strings of 1 to")]:
        bad = P.secagg_content("share", 3, params, "a" * 64, {0: b"\x01" * 30, 2: b"\x02" * 30})
        bad.config_records[P.SECAGG][field] = value
        with pytest.raises(P.ProtocolError, match=error):
            P.read_secagg_query(bad, "share")
    with pytest.raises(P.ProtocolError, match="'stage' field says"):
        P.read_secagg_query(good, "unmask")
    with pytest.raises(P.ProtocolError, match="unknown fields"):  # an advertise message carries no inputs
        P.read_secagg_query(RecordDict({P.SECAGG: ConfigRecord({**good.config_records[P.SECAGG],
                                                                 P.STAGE: "advertise"})}), "advertise")
