"""Comparison reports: bytes to reach a target, the markdown table and the shared plot. Pure over metrics rows."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from cellm.errors import ConfigError


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


# ------------------------------------------------------------------ several seeds

@dataclass
class SeedRow:
    """One method over several seeds: spread of its final metric, median bytes to the target, hits."""

    method: str
    seeds: list[int]
    finals: list[float]
    mean: float
    sd: float  # sample standard deviation (0 with one seed)
    total_bytes: float  # mean over seeds
    to_target: list[int | None]  # per seed
    hits: int
    median_to_target: float | None  # over seeds, a miss counting as infinitely many bytes; None if most missed
    ratio: float | None  # reference's median bytes-to-target / this method's


def _median_with_misses(values: list[int | None]) -> float | None:
    """Median where a miss is +inf: None when the median itself is a miss."""
    xs = sorted(float("inf") if v is None else float(v) for v in values)
    n = len(xs)
    med = xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2
    return None if med == float("inf") else med


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def recorded_reference(data: Any, reference: str, metric: str, source: str) -> tuple[float, SeedRow]:
    """(target, the reference's row) from an earlier sweep's report.json, every field checked (a file is input)."""
    def bad(why: str) -> ConfigError:
        return ConfigError(f"reference report {source}: {why}")

    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise bad("is not a several-seed report.json (an object with 'rows')")
    if data.get("metric") != metric:
        raise bad(f"measures {data.get('metric')!r}, this sweep measures {metric!r}")
    if not _number(data.get("target")):
        raise bad("has no finite 'target'")
    row = next((r for r in data["rows"] if isinstance(r, dict) and r.get("method") == reference), None)
    if row is None:
        raise bad(f"has no row for the reference method {reference!r}")
    seeds, finals, btt = row.get("seeds"), row.get("finals"), row.get("to_target")
    if not (isinstance(seeds, list) and seeds and all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)
            and isinstance(finals, list) and len(finals) == len(seeds) and all(_number(f) for f in finals)
            and isinstance(btt, list) and len(btt) == len(seeds)
            and all(b is None or (isinstance(b, int) and not isinstance(b, bool) and b >= 0) for b in btt)
            and _number(row.get("total_bytes"))):
        raise bad(f"row {reference!r} needs seeds, finals, to_target (one per seed) and total_bytes")
    mean = sum(finals) / len(finals)
    sd = (sum((f - mean) ** 2 for f in finals) / (len(finals) - 1)) ** 0.5 if len(finals) > 1 else 0.0
    return float(data["target"]), SeedRow(reference, list(seeds), [float(f) for f in finals], mean, sd,
                                          float(row["total_bytes"]), list(btt), sum(b is not None for b in btt),
                                          _median_with_misses(btt), 1.0)


def build_seed_rows(runs: dict[str, dict[int, list[dict[str, Any]]]], metric: str, higher_better: bool,
                    reference: str, slack: float,
                    recorded: tuple[float, SeedRow] | None = None) -> tuple[float, list[SeedRow]]:
    """Target from the reference's MEAN final metric over its seeds, then one SeedRow per method.

    ``recorded`` = (target, row) of a reference measured by an earlier sweep (:func:`recorded_reference`): its
    row comes first and sets the target and the ratios, and ``runs`` need not hold it.
    """
    if recorded is not None:
        target, ref_row = recorded
        rows_out = [ref_row]
    else:
        ref_finals = [eval_points(rows, metric)[-1][2] for rows in runs[reference].values()]
        target = target_from_reference(sum(ref_finals) / len(ref_finals), higher_better, slack)
        rows_out = []
    for name, per_seed in runs.items():
        seeds = sorted(per_seed)
        finals = [eval_points(per_seed[s], metric)[-1][2] for s in seeds]
        mean = sum(finals) / len(finals)
        sd = (sum((f - mean) ** 2 for f in finals) / (len(finals) - 1)) ** 0.5 if len(finals) > 1 else 0.0
        btt = [bytes_to_target(per_seed[s], metric, target, higher_better) for s in seeds]
        totals = [per_seed[s][-1]["cum_bytes"] for s in seeds]
        rows_out.append(SeedRow(name, seeds, finals, mean, sd, sum(totals) / len(totals), btt,
                                sum(b is not None for b in btt), _median_with_misses(btt), None))
    ref_med = next(r.median_to_target for r in rows_out if r.method == reference)
    for r in rows_out:
        r.ratio = (ref_med / r.median_to_target) if (ref_med and r.median_to_target) else None
    return target, rows_out


def seed_table(title: str, metric: str, target: float, reference: str, rows: list[SeedRow]) -> str:
    n = max(len(r.seeds) for r in rows)
    lines = [f"### {title}", "",
             f"{n} seeds a method. Target: {metric} {'>=' if metric != 'perplexity' else '<='} {target:.4g} (from "
             f"`{reference}`'s mean final). Bytes to target: median over seeds (a miss counts as never). "
             f"Ratio = {reference}'s median / the method's.", "",
             f"| method | final {metric}, mean ± sd | per seed | total bytes (mean) | reached | "
             f"bytes to target (median) | ratio vs {reference} |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "—" if r.ratio is None else f"{r.ratio:.1f}x"
        med = None if r.median_to_target is None else int(r.median_to_target)
        per = ", ".join(f"{f:.4f}" for f in r.finals)
        lines.append(f"| {r.method} | {r.mean:.4f} ± {r.sd:.4f} | {per} | {_fmt_bytes(int(r.total_bytes))} | "
                     f"{r.hits}/{len(r.seeds)} | {_fmt_bytes(med)} | {ratio} |")
    return "\n".join(lines) + "\n"
