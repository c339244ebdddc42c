"""Comparison reports: bytes to reach a target, the markdown table and the shared plot. Pure over metrics rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def eval_points(rows: list[dict[str, Any]], metric: str) -> list[tuple[int, int, float]]:
    """(round, cum_bytes, metric) of every evaluated round."""
    return [(r["round"], r["cum_bytes"], r["eval"][metric]) for r in rows if "eval" in r and metric in r["eval"]]


def reached(value: float, target: float, higher_better: bool) -> bool:
    return value >= target if higher_better else value <= target


def bytes_to_target(rows: list[dict[str, Any]], metric: str, target: float, higher_better: bool) -> int | None:
    """Cumulative up+down bytes at the first evaluation whose metric reaches ``target``; None if it never does."""
    for _, cum, value in eval_points(rows, metric):
        if reached(value, target, higher_better):
            return cum
    return None


def target_from_reference(final: float, higher_better: bool, slack: float) -> float:
    """The reference's final metric minus ``slack`` points (accuracy), or times (1 + slack) (perplexity)."""
    return final - slack if higher_better else final * (1.0 + slack)


@dataclass
class MethodRow:
    method: str
    final: float
    best: float
    up_bytes: int
    down_bytes: int
    total_bytes: int
    to_target: int | None
    ratio: float | None  # reference's bytes-to-target / this method's (higher is better)
    rounds: int


def build_rows(runs: dict[str, list[dict[str, Any]]], metric: str, higher_better: bool, reference: str,
               slack: float) -> tuple[float, list[MethodRow]]:
    ref_final = eval_points(runs[reference], metric)[-1][2]
    target = target_from_reference(ref_final, higher_better, slack)
    ref_bytes = bytes_to_target(runs[reference], metric, target, higher_better)
    out = []
    for name, rows in runs.items():
        pts = eval_points(rows, metric)
        values = [v for _, _, v in pts]
        up = sum(r["up_bytes"] for r in rows)
        down = sum(r["down_bytes"] for r in rows)
        btt = bytes_to_target(rows, metric, target, higher_better)
        ratio = (ref_bytes / btt) if (btt and ref_bytes) else None
        out.append(MethodRow(name, values[-1], max(values) if higher_better else min(values), up, down, up + down,
                             btt, ratio, rows[-1]["round"]))
    return target, out


def _fmt_bytes(b: int | None) -> str:
    if b is None:
        return "never"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= size:
            return f"{b / size:.2f} {unit}"
    return f"{b} B"


def markdown_table(title: str, metric: str, target: float, reference: str, rows: list[MethodRow]) -> str:
    lines = [f"### {title}", "",
             f"Target: {metric} {'>=' if metric != 'perplexity' else '<='} {target:.4g} "
             f"(from `{reference}`'s final). Ratio = {reference}'s bytes-to-target / the method's.", "",
             f"| method | final {metric} | best {metric} | up | down | total | bytes to target | ratio vs {reference} |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "—" if r.ratio is None else f"{r.ratio:.1f}x"
        lines.append(f"| {r.method} | {r.final:.4f} | {r.best:.4f} | {_fmt_bytes(r.up_bytes)} | "
                     f"{_fmt_bytes(r.down_bytes)} | {_fmt_bytes(r.total_bytes)} | {_fmt_bytes(r.to_target)} | {ratio} |")
    return "\n".join(lines) + "\n"
