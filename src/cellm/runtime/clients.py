"""The client side of a round, written once: every runtime runs a batch of tasks through :func:`run_tasks` (the
embedded simulator for the clients it samples, a Flower SuperNode for the clients of its train message).

What a client keeps between rounds (:class:`~cellm.federated.client.ClientState`) sits behind a
:class:`ClientStore`: in memory for the embedded runtime (:class:`MemoryStore`, saved in its checkpoints), on the
node's disk for Flower (:class:`cellm.runtime.flower.node_state.RoundStore`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol

from cellm.config import CellmConfig
from cellm.core import secagg
from cellm.core.secagg import SecAggError, SecAggParams
from cellm.core.secagg.quantize import unpack_ring
from cellm.federated.client import ClientState, client_update
from cellm.federated.messages import ClientReply, ClientTask, train_spec
from cellm.runtime.setup import Setup
from cellm.runtime.stages import StageError, follow


class ClientStore(Protocol):
    """Where clients keep their state between the rounds they take part in."""

    def load(self, client: int, round_: int) -> ClientState:
        """The state ``client`` starts round ``round_`` from (empty if it keeps none)."""

    def save(self, client: int, round_: int, state: ClientState) -> None:
        """Keep ``client``'s state after ``round_`` (its pending part included)."""


@dataclass
class MemoryStore:
    """Client state in this process: the embedded runtime's (its checkpoints save ``states``)."""

    states: dict[int, ClientState] = field(default_factory=dict)

    def load(self, client: int, round_: int) -> ClientState:
        return self.states.get(client, ClientState())

    def save(self, client: int, round_: int, state: ClientState) -> None:
        self.states[client] = state


SecureStates = dict  # client id -> its secure-aggregation state this round (secrets: never leaves the client)


def secure_advertise(params: SecAggParams, clients: list[int], states: SecureStates) -> dict[int, bytes]:
    """Secure aggregation, stage 1 on each client: fresh key pairs, public keys out."""
    out = {}
    for c in clients:
        states[c], out[c] = secagg.client_advertise(params, c)
    return out


def secure_share(keys: dict[int, bytes], states: SecureStates) -> dict[int, bytes]:
    """Stage 2 on each client that got its neighbours' keys: shares of its secrets, encrypted to each."""
    out = {}
    for c, msg in keys.items():
        states[c], out[c] = secagg.client_share(states[c], msg)
    return out


def secure_unmask(requests: dict[int, bytes], states: SecureStates) -> dict[int, bytes]:
    """Stage 4 on each client asked: the shares that remove the round's masks (and nothing that unmasks one)."""
    return {c: secagg.client_unmask(states[c], msg) for c, msg in requests.items()}


def run_tasks(setup: Setup, cfg: CellmConfig, tasks: list[ClientTask], store: ClientStore,
              secure: SecureStates | None = None) -> dict[int, ClientReply]:
    """Run ``tasks`` one after another on the one base model in ``setup``; returns the replies by client.

    The model first follows the tasks' stage (SLoRA's stage 2 once the server has switched). Each client starts
    from its stored state (settled by the task's ``acked_round``) and its new state is stored at once, before any
    reply is sent, so a late or refused reply loses nothing. A client that keeps nothing stores nothing.
    """
    stages = {t.stage for t in tasks}
    if len(stages) > 1:
        raise StageError(f"the tasks are for different stages {sorted(stages)}")
    if tasks:
        follow(setup, cfg, tasks[0].stage)
    spec = train_spec(cfg)
    replies: dict[int, ClientReply] = {}
    for task in tasks:
        state = store.load(task.client, task.round)
        reply, new_state = client_update(setup.loaded.model, setup.flat, setup.data.clients[task.client], task, spec,
                                         state, seed=cfg.seed, w0=setup.w0)
        if new_state.keeps_anything():
            store.save(task.client, task.round, new_state)
        if task.ring_bits:
            if secure is None or task.client not in secure:
                raise SecAggError(f"client {task.client} has a secure-aggregation task but no keys for this round")
            st = secure[task.client]
            q = unpack_ring(reply.payload, st.params.length, st.params.ring_bits, "this client's ring values")
            secure[task.client], masked = secagg.client_masked_input(st, task.secagg_routed, q)
            reply = dataclasses.replace(reply, payload=masked)
        replies[task.client] = reply
    return replies
