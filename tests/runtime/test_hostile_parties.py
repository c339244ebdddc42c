"""A hostile party, over real Flower messages: a node that lies in its setup and train replies, and a server that
sends a node crafted tasks.

Nodes run the real ClientApp in this process; every message and reply goes through Flower's wire format, so a
crafted reply is only what a party could put on the wire. What is checked: nothing crashes, a refused reply leaves
the global model exactly as if the node had never answered (bit for bit, in a stateful mode, across the next
round too), every refusal is counted in the round's metrics row, and a node refuses a malformed task with an
error that names the field, before it trains or writes anything.
"""

from __future__ import annotations

import functools
import math
import uuid
from collections.abc import Callable
from typing import Any

import pytest

flwr = pytest.importorskip("flwr", reason="Flower is not installed: pip install 'cellm[flower]' (make test does)")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from conftest import one_thread_env  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict  # noqa: E402

import cellm  # noqa: E402
from cellm.runtime.flower import protocol as P  # noqa: E402

STATEFUL = ["comm.error_feedback_up=true", 'comm.download_mode="delta"', 'comm.codec_up="int8"']
HOSTILE, HONEST = 101, 100  # node ids: 100 serves clients 0 and 2, 101 serves 1 and 3
ATTACK_ROUND = 2
# Every column of a round's row that the model and the ledger decide (not timings, not how clients were lost).
SAME_KEYS = ("round", "down_bytes", "down_nonzeros", "down_messages", "up_bytes", "up_nonzeros", "up_messages",
             "cum_bytes", "clients", "accepted", "applied", "eval", "d_down", "d_up")


@pytest.fixture(scope="module", autouse=True)
def node_env(tmp_path_factory):
    """One torch thread, node state in a temporary folder; restored afterwards."""
    home = tmp_path_factory.mktemp("hostile")
    env = {"CELLM_TORCH_THREADS": "1", "CELLM_NODE_STATE_DIR": str(home / "node-state"),
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    with one_thread_env(env):
        yield home


def config(*overrides: str):
    """Tiny, 4 clients all sampled each round, stateful (the next round shows whether a refused round leaked into
    the clients' state), weighted aggregation (a lie about example counts would show)."""
    return cellm.load_config(preset="tiny", overrides=["rounds=3", "data.num_clients=4", "fl.clients_per_round=4",
                                                       "fl.aggregation='weighted'", *STATEFUL, *overrides])


def wire(content: RecordDict) -> RecordDict:
    """``content`` as the other side receives it: through Flower's serialization (a fresh copy)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    objects = {k: v.deflate() for k, v in get_all_nested_objects(content).items()}
    return inflate_object_from_contents(content.object_id, objects)


# A tamper function gets the request, the node's honest reply (or its error) and the grid, and returns what the
# node sends instead: any number of messages.
Tamper = Callable[[Message, Message, "Grid"], list[Message]]


class Grid:
    """A Flower Grid in this process: each node is a Context running the real ClientApp; ``tamper[node]`` rewrites
    what that node sends back (every message still crosses Flower's wire format)."""

    def __init__(self, node_configs: list[dict[str, Any]], tamper: dict[int, Tamper] | None = None) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        from cellm.runtime.flower.client_app import app

        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self.app, self.tamper = app, dict(tamper or {})
        self.nodes = {100 + i: Context(run_id=1, node_id=100 + i, node_config=nc, state=RecordDict(), run_config={})
                      for i, nc in enumerate(node_configs)}
        self.replies: dict[str, list[Message]] = {}
        self.history: list[tuple[Message, Message]] = []  # (request, honest reply) of every message, for replays
        self.offline: set[int] = set()

    def get_node_ids(self) -> list[int]:
        return [n for n in self.nodes if n not in self.offline]

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            ids.append(m.metadata.message_id)
            node = m.metadata.dst_node_id
            m.content = wire(m.content)
            try:
                reply = self.app(m, self.nodes[node])
                reply.content = wire(reply.content)
            except Exception as exc:  # what Flower sends back when a ClientApp raises  # noqa: BLE001
                reply = Message(Error(code=0, reason=repr(exc)), reply_to=m)
            out = self.tamper[node](m, reply, self) if node in self.tamper else [reply]
            for r in out:
                if r.has_content():
                    r.content = wire(r.content)
            self.history.append((m, reply))
            self.replies[m.metadata.message_id] = out
        return ids

    def pull_messages(self, message_ids: list[str]) -> list[Message]:
        return [r for i in list(message_ids) for r in self.replies.pop(i, [])]


def two_nodes(tamper: dict[int, Tamper] | None = None, extra: list[dict] | None = None) -> Grid:
    return Grid([{"partition-id": 0, "num-partitions": 2}, {"partition-id": 1, "num-partitions": 2}, *(extra or [])],
                tamper)


def run(grid: Grid, cfg=None):
    """A whole run over ``grid`` (whose nodes answer at once); a refused node is not asked again during it (so
    refusals per row are exact)."""
    from cellm.runtime.flower.server_app import DriverOptions, run_server

    options = DriverOptions(node_wait_s=5, poll_s=0.01, round_timeout_s=1, setup_retry_s=3600)
    return run_server(grid, cfg or config(), None, options)


def in_round(t: int, message_type: str, attack: Tamper) -> Tamper:
    """``attack`` on the node's replies to round ``t``'s messages of ``message_type``; honest otherwise."""
    def tamper(m: Message, honest: Message, grid: Grid) -> list[Message]:
        if m.metadata.message_type == message_type and (message_type != MessageType.TRAIN
                                                          or m.metadata.group_id == str(t)):
            return attack(m, honest, grid)
        return [honest]
    return tamper


def crash(m: Message, honest: Message, grid: Grid) -> list[Message]:
    return [Message(Error(code=0, reason="RuntimeError('this node crashes while training')"), reply_to=m)]


@pytest.fixture(scope="module")
def honest_run():
    return run(two_nodes())


@pytest.fixture(scope="module")
def crashed_run():
    """Node 101 fails in round 2: its clients never answer that round."""
    return run(two_nodes({HOSTILE: in_round(ATTACK_ROUND, MessageType.TRAIN, crash)}))


def assert_same_model(a, b) -> None:
    """Bit-identical adapter, and every round's ledger, sampling and evaluation the same."""
    assert a.adapter.keys() == b.adapter.keys()
    for k in a.adapter:
        assert torch.equal(a.adapter[k], b.adapter[k]), f"adapter tensor {k} differs"
    for ra, rb in zip(a.metrics, b.metrics, strict=True):
        assert {k: ra.get(k) for k in SAME_KEYS} == {k: rb.get(k) for k in SAME_KEYS}


# ------------------------------------------------------------------ crafted train replies

def edit(change: Callable[[RecordDict], Any]) -> Tamper:
    """The honest reply with ``change`` applied to (a copy of) its content."""
    def attack(m: Message, honest: Message, grid: Grid) -> list[Message]:
        content = wire(honest.content)
        change(content)
        return [Message(content, reply_to=m)]
    return attack


def fields(**values: Any) -> Tamper:
    """The honest reply with these fields of its ``cellm.replies`` record replaced (``extra__k`` is ``extra.k``)."""
    def change(content: RecordDict) -> None:
        rec = content.config_records[P.REPLIES]
        for k, v in values.items():
            rec[k.replace("__", ".")] = v
    return edit(change)


def payload(client: int, arr: Array | None) -> Tamper:
    def change(content: RecordDict) -> None:
        arrays = content.array_records[P.UPLOADS]
        if arr is None:
            del arrays[str(client)]
        else:
            arrays[str(client)] = arr
    return edit(change)


@functools.cache
def numel() -> int:
    from cellm.runtime.setup import load_setup

    return load_setup(config()).flat.numel


def oversized(m: Message, honest: Message, grid: Grid) -> list[Message]:
    return payload(1, P.payload_array(b"\x00" * (P.max_payload_bytes(numel()) + 1)))(m, honest, grid)


def clients(ids: list[int], keys: list[str]) -> Tamper:
    """A reply listing ``ids`` as its clients, with payloads (copies of client 1's upload) under ``keys``."""
    def change(content: RecordDict) -> None:
        rec, arrays = content.config_records[P.REPLIES], content.array_records[P.UPLOADS]
        upload = P.array_payload(arrays["1"])
        content.config_records[P.REPLIES] = ConfigRecord({P.CLIENTS: ids, **{
            k: (v[0] if isinstance(v, list) else v) for k, v in rec.items() if k != P.CLIENTS}})
        content.array_records[P.UPLOADS] = ArrayRecord({k: P.payload_array(upload) for k in keys})
    return edit(change)


def replayed_content(m: Message, honest: Message, grid: Grid) -> list[Message]:
    """The node's reply of the round before, sent again as this round's reply."""
    old = [r for q, r in grid.history if q.metadata.dst_node_id == HOSTILE and q.metadata.group_id == "1"]
    return [Message(wire(old[0].content), reply_to=m)]


def replayed_message(m: Message, honest: Message, grid: Grid) -> list[Message]:
    """The node's reply message of the round before, delivered again instead of this round's."""
    return [next(r for q, r in grid.history if q.metadata.dst_node_id == HOSTILE and q.metadata.group_id == "1")]


def forged_sender(m: Message, honest: Message, grid: Grid) -> list[Message]:
    """The reply claims to come from the other node."""
    honest.metadata.__dict__["_src_node_id"] = HONEST
    return [honest]


def stolen_client(m: Message, honest: Message, grid: Grid) -> list[Message]:
    """An upload for client 0, which the other node serves, instead of its own."""
    return clients([0], ["0"])(m, honest, grid)


def replace_record(m: Message, honest: Message, grid: Grid) -> list[Message]:
    return [Message(RecordDict({P.REPLIES: ConfigRecord({"evil": b"\x00" * 100})}), reply_to=m)]


def duplicate(m: Message, honest: Message, grid: Grid) -> list[Message]:
    return [honest, Message(wire(honest.content), reply_to=m)]


# name -> (attack on node 101's round-2 reply, what happens to its clients, refusals counted in round 2)
REFUSED_REPLIES: dict[str, tuple[Tamper, int]] = {
    "num_examples a string": (fields(num_examples="12"), 1),
    "num_examples -1": (fields(num_examples=-1), 1),
    "num_examples 2**62": (fields(num_examples=2**62), 1),
    "num_examples a float": (fields(num_examples=1.5), 1),
    "nonzeros -1": (fields(nonzeros=-1), 1),
    "nonzeros 2**62": (fields(nonzeros=2**62), 1),
    "nonzeros a string": (fields(nonzeros="3"), 1),
    "train_loss inf": (fields(train_loss=math.inf), 1),
    "train_loss -inf": (fields(train_loss=-math.inf), 1),
    "train_loss negative": (fields(train_loss=-1.0), 1),
    "train_loss a string": (fields(train_loss="low"), 1),
    "codec_s a string": (fields(extra__codec_s="slow"), 1),
    "codec_s negative": (fields(extra__codec_s=-1.0), 1),
    "codec_s inf": (fields(extra__codec_s=math.inf), 1),
    "codec_s nan": (fields(extra__codec_s=math.nan), 1),
    "codec_s huge": (fields(extra__codec_s=1e300), 1),
    "an unknown extra": (fields(extra__evil=1.0), 1),
    "an unknown field": (fields(evil=1), 1),
    "round a string": (fields(round="2"), 1),
    "round 0": (fields(round=0), 1),
    "round 2**62": (fields(round=2**62), 1),
    "round of the round before": (fields(round=1), 2),  # each upload refused
    "round of the round after": (fields(round=3), 2),
    "replay of the round before's reply": (replayed_content, 2),
    "clients out of range": (clients([1, 4], ["1", "4"]), 1),
    "clients negative": (clients([1, -1], ["1", "-1"]), 1),
    "clients repeated": (clients([1, 1], ["1"]), 1),
    "clients a string": (clients("1", ["1"]), 1),  # type: ignore[arg-type]
    "clients empty": (clients([], []), 1),
    "clients a huge list": (clients(list(range(100_000)), ["1"]), 1),
    "a payload too large": (oversized, 1),
    "a payload of floats": (payload(1, Array(np.zeros(10, dtype=np.float32))), 1),
    "a payload missing": (payload(3, None), 1),
    "no replies record": (replace_record, 1),
}
LATE_REPLIES: dict[str, tuple[Tamper, int]] = {  # no usable reply: the node's clients are late, as if silent
    "a reply that claims another sender": (forged_sender, 1),
    "the round before's reply message again": (replayed_message, 1),
    "an upload for the other node's client": (stolen_client, 1),
}


@pytest.mark.parametrize("name", list(REFUSED_REPLIES))
def test_a_refused_train_reply_leaves_the_model_as_if_the_node_had_failed(name, crashed_run):
    """Each malformed reply is refused (logged, counted, its clients rejected), never used: the adapter and the
    ledger are those of a run where the node failed that round, also in the next round (its clients' state
    saved while training is dropped, since the server did not acknowledge that round)."""
    attack, refusals = REFUSED_REPLIES[name]
    result = run(two_nodes({HOSTILE: in_round(ATTACK_ROUND, MessageType.TRAIN, attack)}))
    assert_same_model(result, crashed_run)
    rows = result.metrics
    assert [r["refused"] for r in rows] == [0, 0, refusals, 0]
    assert rows[ATTACK_ROUND]["rejected"] == 2 and rows[ATTACK_ROUND]["failed"] == rows[ATTACK_ROUND]["late"] == 0
    assert rows[ATTACK_ROUND]["accepted"] == 2 and crashed_run.metrics[ATTACK_ROUND]["failed"] == 2


@pytest.mark.parametrize("name", list(LATE_REPLIES))
def test_a_reply_from_the_wrong_sender_or_for_the_wrong_client_is_never_used(name, crashed_run):
    attack, refusals = LATE_REPLIES[name]
    result = run(two_nodes({HOSTILE: in_round(ATTACK_ROUND, MessageType.TRAIN, attack)}))
    assert_same_model(result, crashed_run)
    assert [r["refused"] for r in result.metrics] == [0, 0, refusals, 0]
    assert result.metrics[ATTACK_ROUND]["late"] == 2 and result.metrics[ATTACK_ROUND]["rejected"] == 0


@pytest.mark.parametrize("name,attack,refusals", [
    ("the same reply twice", duplicate, 1),
    ("num_examples 0", fields(num_examples=0), 0),
    ("num_examples 2**31", fields(num_examples=2**31), 0),
    ("nonzeros 0", fields(nonzeros=0), 0),
    ("no codec_s", edit(lambda c: c.config_records[P.REPLIES].pop("extra.codec_s")), 0),
])
def test_claims_the_server_does_not_rely_on_change_nothing(name, attack, refusals, honest_run):
    """A duplicate is refused once the first copy is used; example counts, nonzeros and timings within bounds are
    accepted but never weigh in: the run is the honest one (weighted aggregation uses the sizes the server
    knows)."""
    result = run(two_nodes({HOSTILE: in_round(ATTACK_ROUND, MessageType.TRAIN, attack)}))
    assert_same_model(result, honest_run)
    assert [r["refused"] for r in result.metrics] == [0, 0, refusals, 0]
    assert result.metrics[ATTACK_ROUND]["accepted"] == 4


def test_a_round_whose_every_reply_is_refused_leaves_the_global_model_unchanged():
    """Both nodes send garbage in round 2: nothing is applied, the model after round 2 is the model after round 1."""
    attack = in_round(ATTACK_ROUND, MessageType.TRAIN, fields(num_examples=-1))
    result = run(two_nodes({HONEST: attack, HOSTILE: attack}), config("rounds=2"))
    row = result.metrics[ATTACK_ROUND]
    assert (row["accepted"], row["rejected"], row["refused"], row["applied"]) == (0, 4, 2, False)
    assert row["eval"] == result.metrics[1]["eval"] and result.metrics[1]["accepted"] == 4
    assert row["up_bytes"] == 0  # a refused upload is not even decoded


def test_the_driver_survives_a_client_timing_that_is_not_a_number():
    """Whatever a runtime passes on in ``extra``, a round's overhead sum does not crash."""
    from cellm.federated.messages import ClientReply
    from cellm.runtime.driver import play_round

    class Runner:
        transport = None

        def available_clients(self):
            return None

        def run_clients(self, plan, arrived):
            bad = [{"codec_s": "slow"}, {"codec_s": math.nan}, {"codec_s": None}, {"codec_s": 1e300}, {}]
            return {c: ClientReply(b"", 1, 0.0, 0, bad[i % len(bad)]) for i, c in enumerate(arrived)}, {}

    from cellm.federated.server import ServerState
    from cellm.runtime.setup import load_setup

    cfg = config("rounds=1")
    state = ServerState.initial(load_setup(cfg).w0)
    outcome = play_round(state, cfg, None, Runner())
    assert len(outcome.rejected) == 4 and math.isfinite(outcome.overhead_s) and outcome.overhead_s < 1e6


# ------------------------------------------------------------------ crafted setup replies

def claim(value: Any) -> Tamper:
    def attack(m: Message, honest: Message, grid: Grid) -> list[Message]:
        return [Message(RecordDict({P.NODE: ConfigRecord({"clients": value})}), reply_to=m)]
    return attack


CLAIMS = {
    "clients of another node": [0, 2],
    "one client of another node": [1, 0],
    "an id out of range": [4],
    "a negative id": [-1],
    "a huge id": [2**62],
    "ids repeated": [3, 3],
    "ids as strings": ["0", "1"],
    "ids as floats": [0.0],
    "ids as bools": [True],
    "not a list": 0,
    "a comma-separated string": "0,1,2,3",
    "a huge list": list(range(100_000)),
}


@pytest.mark.parametrize("name", list(CLAIMS))
def test_a_node_cannot_take_over_other_nodes_clients_or_invent_some(name, honest_run):
    """A third node that answers the setup with a crafted claim is refused (counted in round 0's row) and serves
    nothing: the run is the honest one."""
    third = {"partition-id": 1, "num-partitions": 2}
    result = run(two_nodes({102: in_round(0, MessageType.QUERY, claim(CLAIMS[name]))}, extra=[third]))
    assert_same_model(result, honest_run)
    assert [r["refused"] for r in result.metrics] == [1, 0, 0, 0]


def test_a_refused_node_is_asked_again_with_growing_waits_and_keeps_what_it_claims_once_free():
    """First come keeps a client: a node claiming clients another live node serves is refused, then asked again
    after 5 s, 10 s, ...; once the other node is offline its claim is accepted."""
    from cellm.runtime.flower.server_app import CellmStrategy, DriverOptions

    thief = {"cellm-clients": "0,2"}  # an honest node config that overlaps node 100's clients
    grid = two_nodes(extra=[thief])
    strategy = CellmStrategy(grid, config(), DriverOptions(setup_retry_s=5, setup_retry_max_s=300))
    now = [0.0]
    strategy.clock = lambda: now[0]
    asked = lambda: sum(1 for q, _ in grid.history if q.metadata.dst_node_id == 102)  # noqa: E731
    strategy.discover(grid, 0.0)
    assert strategy.client_node == {0: 100, 1: 101, 2: 100, 3: 101} and asked() == 1
    assert strategy.take_refused() == 1 and "other nodes serve" in strategy.bad_nodes[102]
    for t, expected in [(4.9, 1), (5.0, 2), (14.9, 2), (15.0, 3), (34.9, 3), (35.0, 4)]:  # waits of 5, 10, 20 s
        now[0] = t
        strategy.discover(grid, 0.0, require_all=False)
        assert asked() == expected, t
    assert strategy.take_refused() == 3 and 102 not in strategy.node_clients
    grid.offline.add(100)
    now[0] = 75.0  # the next try (40 s later)
    strategy.discover(grid, 0.0)
    assert strategy.client_node == {0: 102, 1: 101, 2: 102, 3: 101} and asked() == 5
    assert 102 not in strategy.bad_nodes and 102 not in strategy.retry


def test_a_node_whose_setup_failed_is_asked_again():
    """A node that answers the setup with an error (say, still loading) is set up at a later try."""
    from cellm.runtime.flower.server_app import CellmStrategy, DriverOptions

    failures = [2]

    def flaky(m: Message, honest: Message, grid: Grid) -> list[Message]:
        if failures[0]:
            failures[0] -= 1
            return [Message(Error(code=0, reason="not ready"), reply_to=m)]
        return [honest]

    grid = two_nodes({HOSTILE: in_round(0, MessageType.QUERY, flaky)})
    strategy = CellmStrategy(grid, config(), DriverOptions(setup_retry_s=1))
    now = [0.0]
    strategy.clock = lambda: now[0]
    for t in (0.0, 1.0, 3.0):
        now[0] = t
        strategy.discover(grid, 0.0, require_all=False)
    assert strategy.client_node == {0: 100, 1: 101, 2: 100, 3: 101} and strategy.take_refused() == 0


# ------------------------------------------------------------------ a hostile server's tasks to a node

@pytest.fixture(scope="module")
def node():
    """A node set up for a run by a real setup message, and an honest train message for its clients 1 and 3."""
    from cellm.federated.server import ServerState, plan_round
    from cellm.runtime.flower.server_app import CellmStrategy
    from cellm.runtime.setup import load_setup

    cfg = config()
    grid = two_nodes()
    strategy = CellmStrategy(grid, cfg)
    strategy.discover(grid, 0.0)
    setup = load_setup(cfg)
    plan = plan_round(ServerState.initial(setup.w0), cfg)
    content = P.task_content([plan.tasks[1], plan.tasks[3]], strategy.digest, 0)
    return grid, grid.nodes[HOSTILE], content, setup.flat.numel, strategy.run_id


def send(grid: Grid, context: Context, content: RecordDict, group: str = "1") -> Message:
    msg = Message(wire(content), dst_node_id=context.node_id, message_type=MessageType.TRAIN, group_id=group)
    msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    return grid.app(msg, context)


def task_field(key: str, value: Any) -> Callable[[RecordDict, int], None]:
    def change(content: RecordDict, numel: int) -> None:
        content.config_records[P.TASKS][key] = value
    return change


def download(arr: Callable[[int], Array]) -> Callable[[RecordDict, int], None]:
    def change(content: RecordDict, numel: int) -> None:
        content.array_records[P.DOWNLOADS]["1"] = arr(numel)
    return change


def task_clients(ids: Any, keys: list[str]) -> Callable[[RecordDict, int], None]:
    def change(content: RecordDict, numel: int) -> None:
        content.config_records[P.TASKS][P.CLIENTS] = ids
        arrays = content.array_records[P.DOWNLOADS]
        one = arrays["1"]
        content.array_records[P.DOWNLOADS] = ArrayRecord({k: one for k in keys})
    return change


# name -> (change to an honest train message, what the node's error says)
BAD_TASKS: dict[str, tuple[Callable[[RecordDict, int], None], str]] = {
    "round a string": (task_field("round", "1"), "round"),
    "round negative": (task_field("round", -1), "round"),
    "round 0": (task_field("round", 0), "round"),
    "round 2**62": (task_field("round", 2**62), "round"),
    "acked_round the task's own round": (task_field("acked_round", 1), "acked_round"),
    "acked_round negative": (task_field("acked_round", -1), "acked_round"),
    "acked_round a string": (task_field("acked_round", "0"), "acked_round"),
    "acked_round a bool": (task_field("acked_round", False), "acked_round"),
    "up_density 0": (task_field("up_density", 0.0), "up_density"),
    "up_density 2": (task_field("up_density", 2.0), "up_density"),
    "up_density nan": (task_field("up_density", math.nan), "up_density"),
    "up_density a string": (task_field("up_density", "0.5"), "up_density"),
    "download_mode unknown": (task_field("download_mode", "evil"), "download_mode"),
    "error_feedback a string": (task_field("error_feedback", "yes"), "error_feedback"),
    "codec values unknown": (task_field("codec_up.values", "fp64"), "values"),
    "codec block size 0": (task_field("codec_up.block_size", 0), "block_size"),
    "stage 9": (task_field("stage", 9), "stage"),
    "init_digest a path": (task_field("init_digest", "../../etc/passwd"), "init_digest"),
    "an unknown field": (task_field("evil", 1), "does not know"),
    "checkpoint-round at the task's round": (task_field(P.CHECKPOINT_ROUND, 1), P.CHECKPOINT_ROUND),
    "checkpoint-round negative": (task_field(P.CHECKPOINT_ROUND, -1), P.CHECKPOINT_ROUND),
    "config digest of another config": (task_field(P.CONFIG_DIGEST, "ab" * 32), "config"),
    "config digest not a digest": (task_field(P.CONFIG_DIGEST, 5), P.CONFIG_DIGEST),
    "a client the node does not serve": (task_clients([1, 0], ["1", "0"]), "serves"),
    "clients out of any range": (task_clients([1, 2**40], ["1", str(2**40)]), "clients"),
    "clients a huge list": (task_clients(list(range(100_000)), ["1"]), "clients"),
    "clients a string": (task_clients("1", ["1"]), "clients"),
    "a download too large": (download(lambda n: P.payload_array(b"\x00" * (P.max_payload_bytes(n) + 1))), "exceed"),
    "a download of floats": (download(lambda n: Array(np.zeros(n, dtype=np.float32))), "payload array"),
    "a download that is not a cellm message": (download(lambda n: P.payload_array(b"\x00" * 64)), "magic|header"),
}


@pytest.mark.parametrize("name", list(BAD_TASKS))
def test_a_node_refuses_a_crafted_task_before_training_or_writing_anything(name, node, node_env):
    """The ClientApp raises a clear error naming the field (Flower answers the server with it); no client state
    is written."""
    grid, context, content, numel, run_id = node
    change, match = BAD_TASKS[name]
    bad = wire(content)
    change(bad, numel)
    files = lambda: sorted((node_env / "node-state").glob(f"{run_id}/client-*/round-*"))  # noqa: E731
    before = files()
    with pytest.raises(ValueError, match=match):  # ProtocolError, CodecError: both say what is wrong
        send(grid, context, bad)
    assert files() == before


def test_a_node_still_trains_an_honest_task_after_crafted_ones(node, node_env):
    """Crafted tasks leave the node as it was: the honest task trains and keeps its clients' state."""
    grid, context, content, numel, run_id = node
    reply = send(grid, context, content)
    assert [c for c, _, _ in P.read_replies(reply.content, num_clients=4, numel=numel)] == [1, 3]
    assert len(list((node_env / "node-state").glob(f"{run_id}/client-*/round-1.safetensors"))) == 2
