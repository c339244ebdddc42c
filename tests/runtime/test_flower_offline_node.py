"""A node that dies mid-round: Flower's SuperLink answers its messages with an error of its own once the node has
missed two heartbeats; the ServerApp counts that as the node's failure at once instead of waiting out the round.

The grid here is a stand-in that answers the way Flower 1.42's SuperLink does (its own error reply, made by its own
function), so no processes are needed; the loopback test in ``test_flower.py`` does the same with real ones.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

flwr = pytest.importorskip("flwr", reason="Flower is not installed: pip install 'cellm[flower]' (make test does)")

from flwr.app import Message, MessageType, RecordDict  # noqa: E402
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message  # noqa: E402

import cellm  # noqa: E402
from cellm.runtime.flower.server_app import CellmStrategy  # noqa: E402

DEAD, LIVE = 7, 8


@pytest.fixture(autouse=True)
def serverapp_identity():
    """Messages are made as a ServerApp process makes them (Flower needs its task identity); restored after."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


class SuperLinkGrid:
    """Pushes messages (ids as Flower sets them); each pull answers with ``answers(pushed)``. Pulling more than
    ``max_pulls`` times means the strategy kept waiting for a message that was already answered."""

    def __init__(self, answers, max_pulls: int = 3) -> None:
        self.answers, self.max_pulls, self.pulls, self.pushed = answers, max_pulls, 0, {}

    def push_messages(self, messages: list[Message]) -> list[str]:
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id
            self.pushed[m.metadata.message_id] = m
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids: list[str]) -> list[Message]:
        self.pulls += 1
        if self.pulls > self.max_pulls:
            raise AssertionError(f"still waiting for {ids} after {self.max_pulls} pulls")
        return self.answers(self.pushed) if self.pulls == 1 else []

    def get_node_ids(self) -> list[int]:
        return [LIVE]


def offline(msg: Message) -> Message:
    """What Flower's SuperLink returns for a message whose node went offline."""
    return create_message_error_unavailable_res_message(msg.metadata, "node_unavail")


def train(node: int) -> Message:
    return Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN, group_id="1")


def strategy(grid: SuperLinkGrid) -> CellmStrategy:
    return CellmStrategy(grid, cellm.load_config(preset="tiny"))  # type: ignore[arg-type]


def test_the_superlinks_error_for_an_offline_node_fails_its_clients_without_waiting_out_the_round():
    grid = SuperLinkGrid(lambda pushed: [offline(m) for m in pushed.values()])
    s = strategy(grid)
    replies = s.send_and_receive([train(DEAD)], timeout=3600)
    assert grid.pulls == 1 and len(replies) == 1
    got, lost = s.collect(SimpleNamespace(round=1), replies, [1, 3], {1: DEAD, 3: DEAD}, s.last_sent)
    assert got == {} and lost == {1: "failed", 3: "failed"}
    assert s.take_refused() == 0  # the SuperLink's answer is not a refused message


def test_a_superlink_error_answers_only_the_message_it_names():
    """An error from the SuperLink for a message the round did not send counts for no node: it is refused, and the
    node whose message is unanswered stays late."""
    stray = train(DEAD)
    stray.metadata.__dict__["_message_id"] = stray.object_id
    grid = SuperLinkGrid(lambda pushed: [offline(stray)], max_pulls=10**6)
    s = strategy(grid)
    replies = s.send_and_receive([train(LIVE)], timeout=0)
    got, lost = s.collect(SimpleNamespace(round=1), replies, [0, 2], {0: LIVE, 2: LIVE}, s.last_sent)
    assert got == {} and lost == {0: "late", 2: "late"}
    assert s.take_refused() == 1


def test_a_setup_query_to_a_node_that_went_offline_marks_that_node_not_set_up():
    """The setup query's answer from the SuperLink counts as that node's failed setup, never as a refusal."""
    grid = SuperLinkGrid(lambda pushed: [offline(m) for m in pushed.values()])
    grid.get_node_ids = lambda: [DEAD]
    s = strategy(grid)
    s.discover(grid, 0.0, require_all=False)  # type: ignore[arg-type]
    assert s.pending == {} and DEAD in s.bad_nodes and "Node Unavailable" in s.bad_nodes[DEAD]
    assert s.take_refused() == 0 and s.client_node == {}
