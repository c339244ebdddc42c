"""The communication ledger: encoded bytes of every message, both directions, next to nonzero counts."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

DIRECTIONS = ("down", "up")


@dataclass
class Ledger:
    """Per-round and cumulative traffic. A download counts once for each client that receives it."""

    entries: dict[int, dict[str, int]] = field(default_factory=lambda: defaultdict(_zero))

    def record(self, round_: int, direction: str, nbytes: int, nonzeros: int, tier: str | None = None,
               part: str | None = None) -> None:
        """Count one message. ``part`` names a share of the traffic that is also reported on its own (e.g.
        "secagg": the secure-aggregation protocol's keys, shares and unmasking), besides the totals."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        row = self.entries[round_]
        row[f"{direction}_bytes"] += int(nbytes)
        row[f"{direction}_nonzeros"] += int(nonzeros)
        row[f"{direction}_messages"] += 1
        if tier is not None:
            row[f"tier.{tier}.{direction}_bytes"] = row.get(f"tier.{tier}.{direction}_bytes", 0) + int(nbytes)
            row[f"tier.{tier}.{direction}_nonzeros"] = (
                row.get(f"tier.{tier}.{direction}_nonzeros", 0) + int(nonzeros))
        if part is not None:
            row[f"{part}.{direction}_bytes"] = row.get(f"{part}.{direction}_bytes", 0) + int(nbytes)
            row[f"{part}.{direction}_messages"] = row.get(f"{part}.{direction}_messages", 0) + 1

    def round_totals(self, round_: int) -> dict[str, int]:
        return dict(self.entries.get(round_, _zero()))

    def cum_bytes(self, up_to_round: int | None = None) -> int:
        return sum(r["down_bytes"] + r["up_bytes"] for t, r in self.entries.items()
                   if up_to_round is None or t <= up_to_round)

    def totals(self) -> dict[str, int]:
        """Sums over the rounds: the totals, and each named part's bytes and messages (``part.direction_...``)."""
        out = _zero()
        for row in self.entries.values():
            for k, v in row.items():
                if k in out or (not k.startswith("tier.") and "." in k):
                    out[k] = out.get(k, 0) + v
        return dict(out)

    def state_dict(self) -> dict[str, Any]:
        return {str(t): dict(row) for t, row in self.entries.items()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Ledger:
        led = cls()
        for t, row in state.items():
            led.entries[int(t)] = defaultdict(int, row)
        return led


def _zero() -> defaultdict:
    d: defaultdict = defaultdict(int)
    for direction in DIRECTIONS:
        for what in ("bytes", "nonzeros", "messages"):
            d[f"{direction}_{what}"] = 0
    return d
