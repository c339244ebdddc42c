"""cellm on Flower: same adapter and ledger as the embedded engine; a TLS + authenticated loopback deployment.

Skipped only when Flower is not installed (``pip install 'cellm[flower]'``; ``make test`` installs it).
Every process a test starts runs in its own process group and is stopped (TERM, then KILL) even on failure.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

import pytest
import tomli_w

flwr = pytest.importorskip("flwr", reason="Flower is not installed: pip install 'cellm[flower]' (make test does)")

import torch  # noqa: E402
from conftest import one_thread_env  # noqa: E402

import cellm  # noqa: E402
from cellm.runtime.flower import protocol as P  # noqa: E402

BIN = Path(sys.executable).parent
# Every column of a metrics row except timings (wall_s, round_s, overhead_s).
LEDGER_KEYS = ("round", "down_bytes", "down_nonzeros", "down_messages", "up_bytes", "up_nonzeros", "up_messages",
               "cum_bytes", "clients", "accepted", "rejected", "failed", "late", "applied", "eval", "train_loss",
               "d_down", "d_up", "epsilon")


@pytest.fixture(scope="module")
def flower_env(tmp_path_factory):
    """Flower, Ray and torch settings for this module (one torch thread per process), restored afterwards."""
    home = tmp_path_factory.mktemp("flwr")
    env = {"FLWR_HOME": str(home / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_TMPDIR": str(home / "ray"), "CELLM_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "CELLM_NODE_STATE_DIR": str(home / "node-state")}
    (home / "ray").mkdir()
    with one_thread_env(env):
        yield home


def tiny(*overrides: str):
    return cellm.load_config(preset="tiny", overrides=["rounds=2", *overrides])


@pytest.fixture(scope="module")
def embedded_tiny(flower_env):
    return cellm.run(tiny(), save=False)


def assert_same_run(a, b) -> None:
    """Bit-identical adapter, identical ledger (every round's bytes, nonzeros, messages) and evaluations."""
    assert a.adapter.keys() == b.adapter.keys()
    for k in a.adapter:
        assert torch.equal(a.adapter[k], b.adapter[k]), f"adapter tensor {k} differs"
    assert a.totals == b.totals
    assert len(a.metrics) == len(b.metrics)
    for ra, rb in zip(a.metrics, b.metrics, strict=True):
        assert {k: ra.get(k) for k in LEDGER_KEYS} == {k: rb.get(k) for k in LEDGER_KEYS}


# ------------------------------------------------------------------ the message format

def test_messages_carry_cellm_payloads_byte_for_byte():
    from cellm.core.codec import CodecSpec
    from cellm.federated.messages import ClientReply, ClientTask

    payload = bytes(range(256)) * 3
    task = ClientTask(round=4, client=7, download=payload, up_density=0.25, codec_up=CodecSpec(values="int8"),
                      download_mode="delta", client_freeze=True, error_feedback=True)
    other = dataclasses.replace(task, client=9, download=payload[:10], up_density=0.5)
    content = P.task_content([task, other], "d" * 64, checkpoint_round=2)  # one message, a node's two clients
    # The array's data is the payload itself: what Flower counts is what cellm's ledger counts (+ the keys).
    assert content.array_records[P.DOWNLOADS].count_bytes() == len(payload) + 10 + len("7") + len("9")
    # shared settings travel once, differing ones as a list aligned with the clients
    rec = content.config_records[P.TASKS]
    assert rec["clients"] == [7, 9] and rec["round"] == 4 and rec["up_density"] == [0.25, 0.5]
    # What Flower serializes for the content: the payloads, plus their envelope (records, keys, object headers)
    assert len(payload) + 10 < P.transport_size(content) < len(payload) + 10 + 2048
    back, digest, checkpoint_round = P.read_tasks(content)
    assert back == [task, other] and digest == "d" * 64 and checkpoint_round == 2
    reply = ClientReply(payload=payload[:100], num_examples=12, train_loss=0.5, nonzeros=9, extra={"codec_s": 0.1})
    other_reply = dataclasses.replace(reply, payload=payload[:50], train_loss=0.25)
    assert P.read_replies(P.reply_content([(7, 4, reply), (9, 4, other_reply)])) == [(7, 4, reply),
                                                                                       (9, 4, other_reply)]
    with pytest.raises(P.ProtocolError, match="payloads for"):
        del content.array_records[P.DOWNLOADS]["9"]
        P.read_tasks(content)
    with pytest.raises(P.ProtocolError, match="2 values for 3 clients"):
        content = P.task_content([task, other], "d" * 64)
        content.config_records[P.TASKS]["clients"] = [7, 9, 11]
        content.array_records[P.DOWNLOADS]["11"] = P.payload_array(b"x")
        P.read_tasks(content)
    with pytest.raises(P.ProtocolError):
        P.array_payload(flwr.app.Array(torch.zeros(3)))
    text, digest, run_id = P.read_setup(P.setup_content("rounds = 2\n", "ab" * 16))
    assert (text, run_id) == ("rounds = 2\n", "ab" * 16) and P.read_finish(P.finish_content("cd" * 16)) == "cd" * 16


def test_node_state_replays_the_rounds_a_resumed_server_lost(tmp_path):
    """A task for round t starts from the newest state before t, pending part included; replayed rounds overwrite
    lost ones; files no resume can need are removed."""
    from cellm.federated.client import ClientState
    from cellm.runtime.flower.node_state import NodeStateStore

    store = NodeStateStore(tmp_path, "0123abcd" * 4)
    states = {t: ClientState(residual=torch.randn(50), copy=torch.randn(20) if t % 2 else None, pending_round=t,
                             pending_residual=torch.randn(50), pending_copy=torch.randn(20) if t % 2 else None)
              for t in range(20)}
    files = lambda: sorted(int(p.stem.split("-")[1]) for p in (store.dir / "client-5").glob("round-*"))  # noqa: E731

    def same(a: ClientState, b: ClientState) -> bool:
        return a.pending_round == b.pending_round and a.tensors().keys() == b.tensors().keys() and all(
            torch.equal(x, b.tensors()[k]) for k, x in a.tensors().items())

    assert not store.load(5, 1).keeps_anything()  # a client that never trained starts empty
    store.save(5, 3, states[3], checkpoint_round=0)
    store.save(5, 7, states[7], checkpoint_round=4)
    assert same(store.load(5, 8), states[7]) and same(store.load(5, 7), states[3])
    store.save(5, 12, states[12], checkpoint_round=8)
    assert files() == [7, 12]  # round 3 can no longer be resumed into
    # the server died after round 12 and resumed from its round-8 checkpoint: round 9 is replayed
    store.save(5, 9, states[9], checkpoint_round=8)
    assert files() == [7, 9] and same(store.load(5, 10), states[9])
    assert store.clients() == [5]
    store.remove()
    assert not store.dir.exists()
    with pytest.raises(ValueError, match="run id"):
        NodeStateStore(tmp_path, "../../etc")


def test_node_state_keeps_a_rounds_outcome_until_the_server_says_whether_it_accepted_it(tmp_path):
    """Saved right after training, a round's outcome is pending: the next task's acked_round keeps it (accepted)
    or drops it (refused, late, lost), so the client continues from where the server thinks it is."""
    from cellm.federated.client import ClientState
    from cellm.runtime.flower.node_state import NodeStateStore

    store = NodeStateStore(tmp_path, "0123abcd" * 4)
    before, after = torch.randn(30), torch.randn(30)
    store.save(2, 4, ClientState(residual=before, pending_round=4, pending_residual=after), checkpoint_round=3)
    loaded = store.load(2, 6, numel=30)
    assert loaded.pending_round == 4
    assert torch.equal(loaded.settle(acked_round=4).residual, after)  # the server accepted round 4's upload
    assert torch.equal(loaded.settle(acked_round=3).residual, before)  # it did not: round 4 never happened
    store.save(2, 5, ClientState(), checkpoint_round=3)  # a state with nothing to keep is still a round's file
    assert not store.load(2, 6).keeps_anything() and store.load(2, 5).pending_round == 4


def test_node_state_writes_of_one_client_from_two_writers_never_tear_a_file(tmp_path):
    """Two ClientApps saving the same client and round at once (a relaunched task, a leftover of a dead ServerApp),
    while a third reads: every read sees one writer's whole state, and no temporary file is left behind."""
    import threading

    from cellm.federated.client import ClientState
    from cellm.runtime.flower.node_state import NodeStateStore

    store = NodeStateStore(tmp_path, "0123abcd" * 4)
    n, errors, done = 200_000, [], threading.Event()

    def write(value: float) -> None:
        try:
            for _ in range(15):
                st = ClientState(residual=torch.full((n,), value), pending_round=3,
                                 pending_residual=torch.full((n,), -value))
                store.save(7, 3, st, checkpoint_round=2)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def read() -> None:
        try:
            while not done.is_set():
                st = store.load(7, 4, numel=n)
                if st.keeps_anything():
                    value = float(st.residual[0])
                    assert value in (1.0, 2.0) and bool((st.residual == value).all())
                    assert bool((st.pending_residual == -value).all()) and st.pending_round == 3
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    writers = [threading.Thread(target=write, args=(v,)) for v in (1.0, 2.0)]
    reader = threading.Thread(target=read)
    for t in [*writers, reader]:
        t.start()
    for t in writers:
        t.join()
    done.set()
    reader.join()
    assert not errors, errors
    assert sorted(p.name for p in (store.dir / "client-7").iterdir()) == [".lock", "round-3.safetensors"]


def test_node_state_refuses_a_torn_or_foreign_file_with_an_error_naming_it(tmp_path):
    """Nothing on the node's disk is unpickled or half-read: a torn, foreign or mis-sized file is a clear error."""
    from safetensors.torch import save_file

    from cellm.federated.client import ClientState
    from cellm.runtime.flower.node_state import NodeStateError, NodeStateStore

    store = NodeStateStore(tmp_path, "0123abcd" * 4)
    store.save(1, 2, ClientState(residual=torch.randn(40), pending_round=2, pending_residual=torch.randn(40)), 0)
    path = store.dir / "client-1" / "round-2.safetensors"
    whole = path.read_bytes()
    cases = {
        "torn": whole[: len(whole) // 2],
        "garbage": b"\x00" * 64,
        "a torch.save file": None,
        "no cellm format": None,
        "wrong size": None,
        "unknown tensor": None,
        "bad pending round": None,
    }
    for what, data in cases.items():
        if what == "a torch.save file":
            torch.save({"residual": torch.zeros(40)}, path)
        elif what == "no cellm format":
            save_file({"residual": torch.zeros(40)}, str(path))
        elif what == "wrong size":
            save_file({"residual": torch.zeros(41)}, str(path), metadata={"format": "cellm-client-state/1",
                                                                         "pending_round": "0"})
        elif what == "unknown tensor":
            save_file({"weights": torch.zeros(40)}, str(path), metadata={"format": "cellm-client-state/1",
                                                                        "pending_round": "0"})
        elif what == "bad pending round":
            save_file({"residual": torch.zeros(40)}, str(path), metadata={"format": "cellm-client-state/1",
                                                                         "pending_round": "99"})
        else:
            path.write_bytes(data)
        with pytest.raises(NodeStateError, match=re.escape(str(path))):
            store.load(1, 3, numel=40)


def test_node_config_selects_clients():
    assert P.served_clients({"partition-id": 1, "num-partitions": 3}, 10) == [1, 4, 7]
    assert P.served_clients({"cellm-clients": "5, 2,2"}, 10) == [2, 5]
    for bad in ({}, {"partition-id": 3, "num-partitions": 3}, {"cellm-clients": "11"}, {"cellm-clients": "x"}):
        with pytest.raises(P.ProtocolError):
            P.served_clients(bad, 10)


def test_app_folder_and_cli(tmp_path):
    """The Flower app folder validates (components importable); the CLI prints a secure deployment."""
    import argparse

    from flwr.cli.config_utils import load_and_validate

    from cellm.interface import flower_cli
    from cellm.runtime.flower import APP_DIR
    from cellm.runtime.flower import deploy as D
    from cellm.runtime.flower.server_app import config_from_run_config

    conf, _ = load_and_validate(APP_DIR / "pyproject.toml", check_module=True)
    defaults = conf["tool"]["flwr"]["app"]["config"]
    cfg, out, opts = config_from_run_config({**defaults, "preset": "tiny", "set": "rounds=2; comm.up_density=0.25",
                                             "out": "-"})
    assert (cfg.rounds, cfg.comm.up_density, out) == (2, 0.25, None)
    again, _, _ = config_from_run_config({**defaults, "config-toml": cfg.to_toml()})
    assert again == cfg
    # a resume names only the folder: the config is read from it, on the SuperLink machine
    none, folder, _ = config_from_run_config({**defaults, "resume": "true", "out": str(tmp_path / "r")})
    assert none is None and folder == (tmp_path / "r").absolute()
    with pytest.raises(cellm.ConfigError, match="takes the config from the run folder"):
        config_from_run_config({**defaults, "resume": "true", "out": str(tmp_path / "r"), "preset": "tiny"})
    with pytest.raises(cellm.ConfigError, match="resume must be true or false"):
        config_from_run_config({**defaults, "resume": "yes", "out": str(tmp_path / "r")})
    rc = D.run_config_file(tmp_path / "rc.toml", None, tmp_path / "r")
    assert tomllib.loads(rc.read_text()) == {"out": str((tmp_path / "r").absolute()), "resume": "true"}
    parser = argparse.ArgumentParser(prog="cellm")
    flower_cli.add_parser(parser.add_subparsers(dest="command"))
    text = flower_cli.commands_text("127.0.0.1:9093", 2, str(tmp_path / "certs"), str(tmp_path / "keys"))
    for needle in ("--enable-supernode-auth", "--ssl-ca-certfile", "flwr supernode register",
                   "--auth-supernode-private-key", "partition-id=1 num-partitions=2", "cellm flower run"):
        assert needle in text
    assert "--insecure" not in text
    args = parser.parse_args(["flower", "node-key", str(tmp_path / "keys"), "node0"])
    assert flower_cli.main(args) == 0 and (tmp_path / "keys" / "node0.pub").read_text().startswith("ecdsa-sha2-")


# ------------------------------------------------------------------ equivalence with the embedded engine

class LoopbackGrid:
    """A Flower Grid in this process: each node is a Context; every message goes through Flower's wire format."""

    def __init__(self, node_configs):
        from flwr.app import Context, RecordDict
        from flwr.supercore.task_identity import TaskIdentity

        from cellm.runtime.flower.client_app import app

        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self.app, self.replies = app, {}
        self.nodes = {100 + i: Context(run_id=1, node_id=100 + i, node_config=nc, state=RecordDict(), run_config={})
                      for i, nc in enumerate(node_configs)}

    @staticmethod
    def wire(content):
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
        from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

        objects = {k: v.deflate() for k, v in get_all_nested_objects(content).items()}
        return inflate_object_from_contents(content.object_id, objects)

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        from flwr.app import Error, Message

        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            ids.append(m.metadata.message_id)
            context = self.nodes[m.metadata.dst_node_id]
            if context.node_config.get("silent"):
                continue  # a node that never answers
            m.content = self.wire(m.content)
            try:
                if context.node_config.get("crash") and m.metadata.message_type == "train":
                    raise RuntimeError("this node crashes while training")
                reply = self.app(m, context)
                reply.content = self.wire(reply.content)
            except Exception as exc:  # what Flower sends back when a ClientApp raises
                reply = Message(Error(code=0, reason=repr(exc)), reply_to=m)
            self.replies[m.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


MODES = {
    "stateful": ["comm.error_feedback_up=true", 'comm.download_mode="delta"', 'comm.codec_up="int8"'],
    "rank-tiers+faults": ['hetero.mode="rank"', "hetero.num_tiers=2", "faults.failure_prob=0.3"],
    "density-tiers+dp+deadline": ['hetero.mode="density"', "hetero.num_tiers=2", "dp.noise_multiplier=0.5",
                                  "faults.deadline_s=12"],
    "pruned+client-freeze": ["comm.freeze_mask_after=1", "comm.client_freeze=true", "comm.zstd_level=3",
                             'comm.codec_down="fp16"'],
    "init-relative+int4+int2": ["comm.init_relative=true", 'comm.codec_down="int4"', 'comm.codec_up="int2"',
                                "comm.error_feedback_up=true", 'comm.download_mode="delta"'],
    "slora-switch+ef+int4": ["slora.stage1_rounds=1", "comm.error_feedback_up=true", 'comm.codec_up="int4"'],
    "shared-support+ir+int4": ['comm.up_support="download+random"', "comm.init_relative=true",
                               'comm.codec_up="int4"', "comm.error_feedback_up=true", "comm.down_density=0.25"],
    "topk-block+delta+int4": ["comm.topk_block=16", 'comm.download_mode="delta"', 'comm.codec_down="int4"',
                              'comm.codec_up="int4"', "comm.error_feedback_up=true", "comm.down_density=0.25",
                              "comm.up_density=0.25"],
}


@pytest.mark.parametrize("mode", list(MODES))
def test_modes_on_shared_nodes_match_embedded(flower_env, mode):
    """Each mode over Flower messages (two nodes serving three clients each; client state in context.state)."""
    from cellm.runtime.flower.server_app import DriverOptions, run_server

    cfg = tiny("rounds=3", "data.num_clients=6", "fl.clients_per_round=4", *MODES[mode])
    embedded = cellm.run(cfg, save=False)
    grid = LoopbackGrid([{"partition-id": 0, "num-partitions": 2}, {"cellm-clients": "1,3,5"}])
    flower = run_server(grid, cfg, None, DriverOptions(node_wait_s=5))
    assert_same_run(embedded, flower)
    # Flower's envelope is counted beside the payload (simulated dropouts are never sent a message, so only
    # rounds where every sampled client took part compare whole). Downloads can cost less than the ledger's sum:
    # a node's message carries a payload that several of its clients share (weights mode) once.
    whole = [r for r in flower.metrics[1:] if not r["failed"] and not r["late"]]
    assert whole and all(r["up_transport_bytes"] > r["up_bytes"] and r["down_transport_bytes"] > 0 for r in whole)
    if mode.startswith("slora"):
        assert [r["stage"] for r in flower.metrics] == [1, 1, 2, 2]
    if mode == "stateful":  # kept on the node's disk until the run completed, then removed
        assert sorted(grid.nodes[100].state.keys()) == ["cellm.config"]
        assert not any((flower_env / "node-state").glob("*/client-*"))


def test_a_failing_node_drops_its_clients(flower_env):
    """A node whose ClientApp raises: its clients count as failed; the round goes on with the others."""
    from cellm.runtime.flower.server_app import DriverOptions, run_server

    grid = LoopbackGrid([{"partition-id": 0, "num-partitions": 2}, {"partition-id": 1, "num-partitions": 2,
                                                                     "crash": True}])
    result = run_server(grid, tiny(), None, DriverOptions(node_wait_s=5))
    odd = [[c for c in r["clients"] if c % 2] for r in result.metrics[1:]]
    assert [r["failed"] for r in result.metrics[1:]] == [len(o) for o in odd] and any(odd)
    assert all(r["applied"] for r in result.metrics[1:])


def test_silent_and_misconfigured_nodes_do_not_change_the_run(flower_env, embedded_tiny):
    """A node that never answers and one whose node config is invalid are left out; the run is unchanged."""
    from cellm.runtime.flower.server_app import DriverOptions, run_server

    grid = LoopbackGrid([{"silent": True}, {"partition-id": 0, "num-partitions": 1}, {"partition-id": 5}])
    flower = run_server(grid, tiny(), None, DriverOptions(node_wait_s=5, poll_s=0.05))
    assert_same_run(embedded_tiny, flower)
    with pytest.raises(RuntimeError, match="no connected SuperNode serves cellm clients"):
        run_server(LoopbackGrid([{"cellm-clients": "0,1"}]), tiny(), None, DriverOptions(node_wait_s=0.2))


class DyingNodeGrid(LoopbackGrid):
    """Node 101 dies while its round-2 task is in flight (Flower answers it with an error), is offline in round
    3, and comes back for round 4 as a new node: a new id, empty Flower state, the same disk."""

    def __init__(self, node_configs):
        super().__init__(node_configs)
        self.round, self.dead = 0, False

    def get_node_ids(self):
        if self.dead and self.round >= 3:  # restarted after round 3
            from flwr.app import Context, RecordDict

            self.nodes[102] = Context(run_id=1, node_id=102, node_config=self.nodes[101].node_config,
                                      state=RecordDict(), run_config={})
            del self.nodes[101]
            self.dead = False
        return [n for n in self.nodes if not (self.dead and n == 101)]

    def push_messages(self, messages):
        from flwr.app import Error, Message

        alive = []
        for m in messages:
            if m.metadata.message_type == "train":
                self.round = int(m.metadata.group_id)
                if self.round == 2 and m.metadata.dst_node_id == 101:
                    self.dead = True
            if self.dead and m.metadata.dst_node_id == 101:
                m.metadata.__dict__["_message_id"] = uuid.uuid4().hex
                self.replies[m.metadata.message_id] = Message(Error(code=5, reason="node_unavail"), reply_to=m)
            else:
                alive.append(m)
        return [m.metadata.message_id for m in messages if m not in alive] + super().push_messages(alive)


def test_a_node_that_dies_is_left_out_until_it_comes_back(flower_env, tmp_path):
    """Its clients in flight count as failed, the next round samples only the survivors' clients, and once the
    node is back (new id, same disk) its clients are sampled and trained again, error feedback included."""
    from cellm.runtime.flower.server_app import DriverOptions, run_server

    cfg = tiny("rounds=5", "data.num_clients=6", "fl.clients_per_round=4", *MODES["stateful"])
    grid = DyingNodeGrid([{"partition-id": 0, "num-partitions": 2}, {"partition-id": 1, "num-partitions": 2}])
    rows = run_server(grid, cfg, None, DriverOptions(node_wait_s=5, poll_s=0.05)).metrics[1:]
    odd = [[c for c in r["clients"] if c % 2] for r in rows]
    assert rows[1]["failed"] == len(odd[1]) > 0 and rows[1]["applied"]
    assert rows[2]["clients"] == [0, 2, 4] and rows[2]["failed"] == 0 and rows[2]["accepted"] == 3
    assert all(r["accepted"] == 4 and not r["failed"] for r in rows[3:]) and any(odd[3:])
    assert 102 in grid.nodes and 101 not in grid.nodes


class CrashingGrid(LoopbackGrid):
    """A LoopbackGrid whose ServerApp dies when it sends round ``crash_round``'s tasks (after the nodes trained the
    rounds before it, some of which its last checkpoint does not hold)."""

    def __init__(self, node_configs, crash_round: int) -> None:
        super().__init__(node_configs)
        self.crash_round = crash_round

    def push_messages(self, messages):
        if any(m.metadata.group_id == str(self.crash_round) for m in messages):
            raise RuntimeError("the ServerApp process dies here")
        return super().push_messages(messages)


@pytest.mark.parametrize("mode", ["stateful", "slora-switch+ef+int4"])
def test_a_server_killed_mid_run_resumes_to_the_uninterrupted_run(flower_env, tmp_path, mode):
    """Checkpoint after round 2, death in round 4, resume on fresh nodes (their Flower state is gone, their disk
    is not): the same adapter, ledger and metrics as the embedded run, and the nodes' files are removed at the end."""
    from cellm.runtime import runfolder as rf
    from cellm.runtime.flower.server_app import DriverOptions, run_server

    cfg = tiny("rounds=5", "data.num_clients=6", "fl.clients_per_round=4", "run.checkpoint_every=2", *MODES[mode])
    embedded = cellm.run(cfg, save=False)
    nodes = [{"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path / "n0")},
             {"cellm-clients": "1,3,5", "state-dir": str(tmp_path / "n1")}]
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="dies here"):
        run_server(CrashingGrid(nodes, crash_round=4), cfg, out, DriverOptions(node_wait_s=5))
    assert [r["round"] for r in rf.read_metrics(out)] == [0, 1, 2, 3]
    assert int(rf.load_checkpoint(out)["server"]["round"]) == 2
    assert any((tmp_path / "n0").glob("*/client-*/round-3.safetensors"))  # state of a round the server lost
    with pytest.warns(UserWarning, match="restarts that state from zero"):  # the embedded engine cannot be exact
        shutil.copytree(out, tmp_path / "copy")
        cellm.resume(tmp_path / "copy")
    resumed = run_server(LoopbackGrid(nodes), None, out, DriverOptions(node_wait_s=5), resume=True)
    assert_same_run(embedded, resumed)
    assert [r["round"] for r in rf.read_metrics(out)] == list(range(6))
    assert not any((tmp_path / "n0").glob("*/client-*")) and not any((tmp_path / "n1").glob("*/client-*"))
    with pytest.raises(cellm.ConfigError, match="config given differs"):
        run_server(LoopbackGrid(nodes), tiny("rounds=7"), out, DriverOptions(node_wait_s=5), resume=True)


def test_flower_simulation_matches_embedded(flower_env, embedded_tiny, tmp_path):
    """Flower's simulation runtime (Ray), tiny preset, 2 rounds, 4 virtual SuperNodes: same adapter and ledger."""
    from cellm.runtime import runfolder as rf
    from cellm.runtime.flower.sim import run_flower_simulation

    flower = run_flower_simulation(tiny(), tmp_path / "run", num_supernodes=4, workers=2)
    assert_same_run(embedded_tiny, flower)
    assert [r["round"] for r in rf.read_metrics(tmp_path / "run")] == [0, 1, 2]
    for row in flower.metrics[1:]:  # Flower's envelope is counted beside the payload, never instead of it
        assert row["down_transport_bytes"] > row["down_bytes"] > 0
        assert row["up_transport_bytes"] > row["up_bytes"] > 0
    assert (tmp_path / "run" / rf.ADAPTER / "adapter_model.safetensors").exists()


# ------------------------------------------------------------------ loopback deployment: TLS + SuperNode auth

def write_connection(flwr_home: str | Path, name: str, address: str, root_certificates: str | Path | None) -> Path:
    """Add ``[superlink.<name>]`` to ``$FLWR_HOME/config.toml`` (insecure when no CA certificate is given)."""
    path = Path(flwr_home) / "config.toml"
    data = tomllib.loads(path.read_text()) if path.exists() else {}
    conn: dict[str, object] = {"address": address}
    if root_certificates is None:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(Path(root_certificates).absolute())
    data.setdefault("superlink", {})[name] = conn
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(data))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class Processes:
    """Starts commands in their own process groups; ``stop()`` ends every group it started, bounded in time."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.procs = folder, []

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "wb")  # noqa: SIM115 (closed in stop)
        cmd = [str(BIN / cmd[0]), *cmd[1:]]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=self.folder, env=child_env())
        self.procs.append((name, proc, log))
        return proc

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def descendants(self) -> set[int]:
        """Every live process below the ones started here (Flower detaches some: SuperExec, ServerApp)."""
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        found, todo = set(), [p.pid for _, p, _ in self.procs]
        while todo:
            for c in children.get(todo.pop(), []):
                if c not in found:
                    found.add(c)
                    todo.append(c)
        return found

    def stop(self, timeout: float = 20.0) -> None:
        """TERM every started process group and every descendant, wait (bounded), then KILL what is left."""
        seen = self.descendants()
        for _, proc, _ in reversed(self.procs):
            _signal_group(proc.pid, signal.SIGTERM)
        for pid in seen:
            _signal_pid(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _, proc, _ in self.procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
        seen |= self.descendants()
        for _, proc, _ in self.procs:
            _signal_group(proc.pid, signal.SIGKILL)
        for pid in seen:
            _signal_pid(pid, signal.SIGKILL)
        for _, proc, log in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            log.close()
        end = time.monotonic() + 15  # killed grandchildren are reaped by their parents or init: wait, bounded
        while time.monotonic() < end and any(Path(f"/proc/{pid}").exists() and not _zombie(pid) for pid in seen):
            time.sleep(0.2)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


# `cellm flower ARGS...` (until cellm.interface.cli wires the subcommand, call its module directly)
CELLM_FLOWER = """
import argparse, sys
from cellm.interface import flower_cli
parser = argparse.ArgumentParser(prog="cellm")
flower_cli.add_parser(parser.add_subparsers(dest="command"))
sys.exit(flower_cli.main(parser.parse_args(["flower", *sys.argv[1:]])))
"""


def child_env() -> dict[str, str]:
    """Flower starts flower-superexec, flwr-serverapp and flwr-clientapp by name: this venv first on PATH. Each
    SuperExec (the SuperLink's and every SuperNode's) looks for a task to start every 0.25 s instead of Flower's
    1 s (its own setting, FLWR_SUPEREXEC_TASK_POLL_INTERVAL): every message waits for that look."""
    from cellm.runtime.flower.deploy import child_env as env

    return {**env(), "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.25"}


def flwr_cli(args: list[str], timeout: float, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=child_env())


def test_loopback_deployment_tls_and_node_auth(flower_env, embedded_tiny, tmp_path):
    """SuperLink + 2 authenticated SuperNodes over TLS on 127.0.0.1, 2 rounds: the run trains and matches the
    embedded engine; a SuperNode whose key is not registered is refused."""
    from cellm.runtime import runfolder as rf
    from cellm.runtime.flower import deploy as D

    tls = D.make_certificates(tmp_path / "certs")
    keys = [D.make_node_keys(tmp_path / "keys", f"node{i}") for i in range(2)]
    intruder_key, _ = D.make_node_keys(tmp_path / "keys", "intruder")
    port = free_port()
    address = f"127.0.0.1:{port}"
    write_connection(os.environ["FLWR_HOME"], "loop", address, tls.ca_cert)
    out = tmp_path / "run"
    procs = Processes(tmp_path)
    try:
        link = procs.start("superlink", D.superlink_command(address, tls=tls, auth=True,
                                                             database=tmp_path / "superlink.db"))
        wait_port(port, link, timeout=30)
        for _, pub in keys:
            r = flwr_cli(["supernode", "register", str(pub), "loop"], timeout=30, cwd=tmp_path)
            assert r.returncode == 0, r.stdout + r.stderr
        for i, (priv, _) in enumerate(keys):
            procs.start(f"supernode{i}", D.supernode_command(address, free_port(), f"partition-id={i} num-partitions=2",
                                                             ca_cert=tls.ca_cert, private_key=priv))
        intruder = procs.start("intruder", D.supernode_command(address, free_port(), "partition-id=0 num-partitions=2",
                                                               ca_cert=tls.ca_cert, private_key=intruder_key,
                                                               max_wait_s=10))
        # `cellm flower run`: the same config options as `cellm run`; exits 0 only for a completed run.
        run = subprocess.run([sys.executable, "-c", CELLM_FLOWER, "run", "--superlink", "loop", "--preset", "tiny",
                              "--set", "rounds=2", "--out", str(out), "--node-wait-s", "90",
                              "--round-timeout-s", "120"],
                             capture_output=True, text=True, timeout=150, cwd=tmp_path, env=child_env())
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        run_id = re.search(r"started run (\d+)", run.stdout).group(1)
        info = D.run_info("loop", run_id, child_env())
        assert info["status"] == "finished:completed", info

        # The unknown node was refused (and exited); only the two registered nodes exist.
        assert intruder.wait(timeout=30) != 0
        assert "Failed to activate SuperNode" in procs.log("intruder")
        ls = flwr_cli(["supernode", "ls", "loop", "--format", "json"], timeout=30, cwd=tmp_path)
        assert ls.returncode == 0, ls.stdout + ls.stderr
        listed = json.loads(ls.stdout)
        assert len(listed["nodes"]) == 2, listed

        # The authenticated nodes trained: the run folder holds 2 rounds, identical to the embedded engine.
        rows = rf.read_metrics(out)
        assert [r["round"] for r in rows] == [0, 1, 2]
        for ra, rb in zip(embedded_tiny.metrics, rows, strict=True):
            assert {k: ra.get(k) for k in LEDGER_KEYS} == {k: rb.get(k) for k in LEDGER_KEYS}
        from safetensors.torch import load_file

        saved = load_file(out / rf.ADAPTER / "adapter_model.safetensors")
        assert saved.keys() == embedded_tiny.adapter.keys()
        for k, v in embedded_tiny.adapter.items():
            assert torch.equal(saved[k], v), f"adapter tensor {k} differs"
        # Flower's own traffic count holds cellm's payloads plus its envelopes and the setup messages.
        traffic, totals = info["network-traffic"], embedded_tiny.totals
        assert traffic["outbound-bytes"] > totals["down_bytes"] and traffic["inbound-bytes"] > totals["up_bytes"]
        print(f"Flower traffic {traffic} vs cellm ledger {totals}")
    except BaseException:
        for name, *_ in procs.procs:
            print(f"----- {name}.log (tail)\n{procs.log(name)[-4000:]}")
        raise
    finally:
        procs.stop()
        shutil.rmtree(tmp_path / "keys", ignore_errors=True)



# ------------------------------------------------------------------ loopback deployment: processes that die

# flower-supernode whose own heartbeat to the SuperLink runs at 10 s instead of 30 s (the smallest the
# SuperLink accepts), so the SuperLink sees a killed node offline after 20 s instead of 60 s. Only the two
# names that send and announce the node's heartbeat are changed. Setting Flower's constant
# (flwr.common.constant.HEARTBEAT_DEFAULT_INTERVAL) would also shorten the deadlines the node gives its
# ClientApps (10 s to start, 20 s between heartbeats), while each flwr-clientapp, a fresh interpreter, keeps
# 30 s and heartbeats every 17.5-22.5 s: the node then declared live ClientApps dead (a dead run's ClientApp
# waiting for task data its killed ServerApp never sent), and the error reply it made for one was sent in
# place of the resumed run's setup reply, which then never left the node.
FAST_HEARTBEAT_SUPERNODE = """
import sys
from flwr.supernode.cli.flower_supernode import flower_supernode
import flwr.supercore.heartbeat as sender, flwr.supernode.fleet_http_connection as announced
assert sender.HEARTBEAT_DEFAULT_INTERVAL == announced.HEARTBEAT_DEFAULT_INTERVAL == 30, "heartbeat moved"
sender.HEARTBEAT_DEFAULT_INTERVAL = announced.HEARTBEAT_DEFAULT_INTERVAL = 10
sys.argv[0] = "flower-supernode"
flower_supernode()
"""


def wait_for(what: str, check, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.5)
    raise TimeoutError(f"{what}: not after {timeout} s")


def test_loopback_deployment_survives_a_killed_serverapp_and_a_killed_supernode(flower_env, tmp_path):
    """Real processes on 127.0.0.1, killed with SIGKILL.

    1. The ServerApp, after its round-1 checkpoint: `cellm flower run --resume` finishes the run with the same
       adapter and ledger as the embedded engine (error feedback on: the nodes' client state is on their disk).
    2. A SuperNode, in the middle of a run: the run goes on; its clients in flight count as failed or late, the
       next rounds sample the survivors' clients, and once the node is restarted its clients are trained again.
    """
    from cellm.runtime import runfolder as rf
    from cellm.runtime.flower import deploy as D

    port = free_port()
    address = f"127.0.0.1:{port}"
    write_connection(os.environ["FLWR_HOME"], "faults", address, None)
    procs = Processes(tmp_path)

    def start_node(i: int, name: str) -> subprocess.Popen:
        cmd = D.supernode_command(address, free_port(), f"partition-id={i} num-partitions=2")
        return procs.start(name, ["python", "-c", FAST_HEARTBEAT_SUPERNODE, *cmd[1:]])

    def submit(*args: str) -> None:
        r = subprocess.run([sys.executable, "-c", CELLM_FLOWER, "run", "--superlink", "faults", "--no-stream",
                            "--node-wait-s", "90", "--round-timeout-s", "60", *args],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path, env=child_env())
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    def rows(out: Path) -> list[dict]:
        return rf.read_metrics(out) if (out / rf.METRICS).exists() else []

    try:
        link = procs.start("superlink", D.superlink_command(address, database=tmp_path / "superlink.db"))
        wait_port(port, link, timeout=30)
        nodes = [start_node(0, "node0"), start_node(1, "node1")]

        # 1. the ServerApp dies after a checkpoint; the run is resumed from its folder
        overrides = ["rounds=3", "run.checkpoint_every=1", "comm.error_feedback_up=true"]
        out = tmp_path / "run"
        submit("--preset", "tiny", *[a for o in overrides for a in ("--set", o)], "--out", str(out))
        wait_for("round-1 checkpoint", lambda: (out / rf.CHECKPOINT).exists(), 120)
        serverapps = [p for p in procs.descendants() if b"flwr-serverapp" in _cmdline(p)]
        assert serverapps, "no flwr-serverapp process found"
        for p in serverapps:
            _signal_pid(p, signal.SIGKILL)
        time.sleep(1)
        assert not (out / rf.SUMMARY).exists()
        embedded = cellm.run(tiny(*overrides), save=False)  # the reference, while the SuperLink notices the death
        # As the README says: resume once the SuperLink has ended the dead run (its ServerApp's heartbeat lapses),
        # on the SuperNodes left running.
        def dead_run_ended() -> bool:
            r = subprocess.run([str(Path(sys.executable).parent / "flwr"), "ls", "faults", "--format", "json"],
                               capture_output=True, text=True, timeout=60, cwd=tmp_path, env=child_env())
            runs = json.loads(r.stdout)["runs"] if r.returncode == 0 else []
            return bool(runs) and all(x["status"].startswith("finished") for x in runs)

        wait_for("the SuperLink to end the dead run", dead_run_ended, 240)
        submit("--resume", str(out), "--node-wait-s", "300")
        wait_for("the resumed run's summary", lambda: (out / rf.SUMMARY).exists(), 360)
        for ra, rb in zip(embedded.metrics, rows(out), strict=True):
            assert {k: ra.get(k) for k in LEDGER_KEYS} == {k: rb.get(k) for k in LEDGER_KEYS}
        from safetensors.torch import load_file

        saved = load_file(out / rf.ADAPTER / "adapter_model.safetensors")
        for k, v in embedded.adapter.items():
            assert torch.equal(saved[k], v), f"adapter tensor {k} differs"

        # 2. a SuperNode dies mid-run and is restarted later
        out2 = tmp_path / "run-node-killed"
        submit("--preset", "tiny", "--set", "rounds=6", "--set", "fl.clients_per_round=4", "--out", str(out2))
        wait_for("round 1", lambda: len(rows(out2)) >= 2, 120)
        _signal_group(nodes[1].pid, signal.SIGKILL)
        # Restarted once a round has lost the killed node's clients (Flower answers for it once it has missed two
        # heartbeats). The next round is planned as soon as that round's row is written, before a restarted node
        # could answer its setup query (that takes a ClientApp), so it samples the survivors only; the rounds after
        # it leave the restarted node time to be set up and trained again.
        wait_for("a round that lost the killed node's clients",
                 lambda: any(r["failed"] + r["late"] for r in rows(out2)[2:]), 150)
        start_node(1, "node1-restarted")
        survivors_only = wait_for("a round with only the surviving node's clients",
                                  lambda: [r for r in rows(out2)[2:] if r["clients"] and
                                           all(c % 2 == 0 for c in r["clients"]) and not r["failed"]], 150)
        wait_for("the run's summary", lambda: (out2 / rf.SUMMARY).exists(), 240)
        after_kill = rows(out2)[2:]
        assert sum(r["failed"] + r["late"] for r in after_kill) > 0  # the killed node's clients in flight
        assert survivors_only[0]["accepted"] == len(survivors_only[0]["clients"])
        back = [r for r in after_kill if r["round"] > survivors_only[0]["round"] and any(c % 2 for c in r["clients"])
                and not r["failed"] and not r["late"]]
        assert back, f"the restarted node's clients were never trained again: {after_kill}"
        assert all(r["applied"] for r in after_kill if r["accepted"])
    except BaseException:
        for name, *_ in procs.procs:
            print(f"----- {name}.log (tail)\n{procs.log(name)[-3000:]}")
        raise
    finally:
        procs.stop()


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
