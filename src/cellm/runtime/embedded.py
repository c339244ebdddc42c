"""The embedded simulator: one process, one base model in memory, clients are adapter states.

It only executes clients, in process, one after another (:func:`cellm.runtime.clients.run_tasks`); the round loop
is :func:`cellm.runtime.driver.drive`, the run around it :mod:`cellm.runtime.session`, and everything a round
does is in :mod:`cellm.federated`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cellm.config import CellmConfig
from cellm.core.secagg import SecAggParams
from cellm.federated.client import ClientState
from cellm.federated.messages import ClientReply
from cellm.federated.server import RoundPlan, ServerState
from cellm.runtime.clients import MemoryStore, run_tasks, secure_advertise, secure_share, secure_unmask
from cellm.runtime.driver import OnRound, drive
from cellm.runtime.setup import Setup


@dataclass
class Simulator:
    """Runs clients in process and holds the state they keep between rounds (only when a mode needs it)."""

    cfg: CellmConfig
    setup: Setup | None = None  # given by the session once loaded (:meth:`attach`)
    store: MemoryStore = field(default_factory=MemoryStore)
    secure: dict = field(default_factory=dict)  # secure aggregation: each client's protocol state this round
    runtime = "embedded"
    connects = False

    @property
    def client_states(self) -> dict[int, ClientState]:
        """Every client's kept state (what the run's checkpoints save)."""
        return self.store.states

    def connect(self) -> None:
        """Nothing to connect to."""

    def attach(self, setup: Setup, clients: dict[int, ClientState]) -> None:
        self.setup = setup
        self.store.states.update(clients)

    def kept_clients(self) -> dict[int, ClientState]:
        return self.store.states

    def on_row(self, row: dict) -> None:
        """No columns of its own."""

    def checkpointed(self, round_: int) -> None:
        """Nothing to tell anyone."""

    def close(self) -> None:
        """Nothing to release."""

    def prepare(self) -> None:
        """Nothing to set up: every client lives in this process."""

    def available_clients(self) -> None:
        """Every client is always reachable (simulated faults happen after sampling)."""
        return None

    def run_clients(self, plan: RoundPlan, arrived: list[int]) -> tuple[dict[int, ClientReply], dict[int, str]]:
        """Train the clients that will reply in time. Failed and late clients do no work here, so their kept
        state (residuals) does not move: in effect their round never happened."""
        assert self.setup is not None, "attach the setup first"
        return run_tasks(self.setup, self.cfg, [plan.tasks[c] for c in arrived], self.store, self.secure), {}

    # secure aggregation's other stages: every client answers in process (simulated faults drop clients after
    # stage 2, as a client that fails mid-round would)

    def secure_advertise(self, round_: int, params: SecAggParams, clients: list[int]) -> dict[int, bytes]:
        self.secure = {}
        return secure_advertise(params, clients, self.secure)

    def secure_share(self, keys: dict[int, bytes]) -> dict[int, bytes]:
        return secure_share(keys, self.secure)

    def secure_unmask(self, requests: dict[int, bytes]) -> dict[int, bytes]:
        return secure_unmask(requests, self.secure)


def simulate(cfg: CellmConfig, setup: Setup, state: ServerState | None = None, on_round: OnRound | None = None,
             sim: Simulator | None = None) -> ServerState:
    """Run rounds in process until cfg.rounds; ``on_round(state, row)`` after each (and after round 0's eval)."""
    return drive(cfg, setup, sim or Simulator(cfg, setup), state, on_round)


def make_simulator(cfg: CellmConfig, run_id: str, resumed_round: int) -> Simulator:
    """The embedded runtime's runner for a :class:`~cellm.runtime.session.Session`."""
    return Simulator(cfg)
