"""The embedded simulator: one process, one base model in memory, clients are adapter states.

It only executes clients, in process, one after another; the round loop is :func:`cellm.runtime.driver.drive`
and everything a round does is in :mod:`cellm.federated`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cellm.config import CellmConfig
from cellm.federated.client import ClientReply, ClientState, client_update
from cellm.federated.server import RoundPlan, ServerState, train_spec
from cellm.runtime.driver import OnRound, drive
from cellm.runtime.setup import Setup


@dataclass
class Simulator:
    """Runs clients in process and holds the state they keep between rounds (only when a mode needs it)."""

    cfg: CellmConfig
    setup: Setup
    client_states: dict[int, ClientState] = field(default_factory=dict)

    def prepare(self) -> None:
        """Nothing to set up: every client lives in this process."""

    def available_clients(self) -> None:
        """Every client is always reachable (simulated faults happen after sampling)."""
        return None

    def run_clients(self, plan: RoundPlan, arrived: list[int]) -> tuple[dict[int, ClientReply], dict[int, str]]:
        """Train the clients that will reply in time. Failed and late clients do no work here, so their kept
        state (residuals) does not move: in effect their round never happened."""
        spec = train_spec(self.cfg)
        replies = {}
        for c in arrived:
            st = self.client_states.get(c, ClientState())
            reply, new_state = client_update(self.setup.loaded.model, self.setup.flat, self.setup.data.clients[c],
                                             plan.tasks[c], spec, st, seed=self.cfg.seed, w0=self.setup.w0)
            if new_state.keeps_anything():
                self.client_states[c] = new_state
            replies[c] = reply
        return replies, {}


def simulate(cfg: CellmConfig, setup: Setup, state: ServerState | None = None, on_round: OnRound | None = None,
             sim: Simulator | None = None) -> ServerState:
    """Run rounds in process until cfg.rounds; ``on_round(state, row)`` after each (and after round 0's eval)."""
    return drive(cfg, setup, sim or Simulator(cfg, setup), state, on_round)
