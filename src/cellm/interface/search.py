"""``cellm search``: choose LoRA rank and density under a communication budget (FLASC-Search).

From a small rank and a low density, each step runs two short federated runs — one with the rank raised, one
with the density raised — and moves to the one that gains more metric per byte (within the budget). It stops
when neither candidate fits the budget, or when ``patience`` steps in a row have not raised the best metric by
at least ``min_gain`` (short runs are noisy: one bad step should not end the search). The result is the best
configuration seen on the path. Short runs are ordinary run folders
under ``<out>/runs/`` run through the sweep runner, so a repeated search reuses every finished run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cellm.config import CellmConfig, load_config, task_of
from cellm.errors import ConfigError
from cellm.interface.compare import Sweep, method_dir, run_sweep
from cellm.models.evaluate import primary_metric
from cellm.runtime import runfolder as rf

Evaluate = Callable[[list[tuple[int, float]]], list[tuple[float, int]]]  # [(rank, d)] -> [(metric, bytes)]


@dataclass
class SearchSpec:
    budget_bytes: int
    start_rank: int = 1
    start_density: float = 1 / 64
    rank_factor: int = 2
    density_factor: float = 2.0
    max_rank: int = 64
    min_gain: float = 0.005
    max_steps: int = 12
    patience: int = 2
    higher_better: bool = True

    def validate(self) -> None:
        if self.budget_bytes <= 0:
            raise ConfigError(f"search budget must be > 0 bytes; got {self.budget_bytes}")
        if self.start_rank < 1 or self.max_rank < self.start_rank:
            raise ConfigError(f"search start rank must be in [1, max_rank]; got {self.start_rank}")
        if not 0 < self.start_density <= 1:
            raise ConfigError(f"search start density must be in (0, 1]; got {self.start_density}")
        if self.patience < 1:
            raise ConfigError(f"search patience must be >= 1; got {self.patience}")
        if self.rank_factor < 2 or self.density_factor <= 1:
            raise ConfigError("search rank_factor must be >= 2 and density_factor > 1")


@dataclass
class Step:
    current: tuple[int, float]
    current_metric: float
    current_bytes: int
    candidates: list[dict] = field(default_factory=list)  # rank, density, metric, bytes, gain_per_byte, fits
    choice: str = ""  # "rank", "density" or "stop: <why>"


@dataclass
class SearchResult:
    steps: list[Step]
    rank: int
    density: float
    metric: float
    bytes: int
    runs: int  # short runs made (or found finished)


def search(spec: SearchSpec, evaluate: Evaluate, log: Callable[[str], None] = print) -> SearchResult:
    """The search loop over (rank, density), independent of how a configuration is evaluated."""
    spec.validate()
    sign = 1.0 if spec.higher_better else -1.0
    seen: dict[tuple[int, float], tuple[float, int]] = {}

    def ev(points: list[tuple[int, float]]) -> None:
        todo = [p for p in points if p not in seen]
        if todo:
            for p, r in zip(todo, evaluate(todo), strict=True):
                seen[p] = r

    cur = (spec.start_rank, spec.start_density)
    ev([cur])
    best_point, stale = cur, 0
    steps: list[Step] = []
    while len(steps) < spec.max_steps:
        m, b = seen[cur]
        step = Step(cur, m, b)
        cands = []
        if cur[0] * spec.rank_factor <= spec.max_rank:
            cands.append(("rank", (cur[0] * spec.rank_factor, cur[1])))
        if cur[1] < 1.0:
            cands.append(("density", (cur[0], min(1.0, cur[1] * spec.density_factor))))
        ev([p for _, p in cands])
        move = None
        for kind, p in cands:
            cm, cb = seen[p]
            gain = sign * (cm - m)
            gpb = gain / max(cb - b, 1)
            fits = cb <= spec.budget_bytes
            step.candidates.append({"move": kind, "rank": p[0], "density": p[1], "metric": cm, "bytes": cb,
                                    "gain": gain, "gain_per_byte": gpb, "fits": fits})
            if fits and (move is None or gpb > move[0]):
                move = (gpb, kind, p)
        if move is None:
            step.choice = ("stop: nothing left to raise" if not cands
                           else "stop: every candidate exceeds the budget")
            steps.append(step)
            log(_describe(step))
            break
        cur = move[2]
        if sign * (seen[cur][0] - seen[best_point][0]) >= spec.min_gain:
            best_point, stale = cur, 0
        else:
            stale += 1
        step.choice = move[1]
        if stale >= spec.patience:
            step.choice += f"; stop: {stale} steps without a gain of >= {spec.min_gain} over the best"
            steps.append(step)
            log(_describe(step))
            break
        steps.append(step)
        log(_describe(step))
    m, b = seen[best_point]
    return SearchResult(steps, best_point[0], best_point[1], m, b, len(seen))


def _describe(step: Step) -> str:
    r, d = step.current
    parts = [f"at rank {r}, density {d:g}: metric {step.current_metric:.4f}, {step.current_bytes:,} B"]
    for c in step.candidates:
        parts.append(f"  {c['move']:7} -> rank {c['rank']}, d {c['density']:g}: metric {c['metric']:.4f}, "
                     f"{c['bytes']:,} B, gain/MB {c['gain_per_byte'] * 1e6:+.4f}{'' if c['fits'] else ' (over budget)'}")
    parts.append(f"  choice: {step.choice}")
    return "\n".join(parts)


def candidate_overrides(rank: int, density: float, alpha_per_rank: float) -> list[str]:
    return [f"model.lora_rank={rank}", f"model.lora_alpha={alpha_per_rank * rank}",
            f"comm.down_density={density}", f"comm.up_density={density}"]


def run_search(base: CellmConfig, base_overrides: list[str], base_preset: str | None, base_config: str | None,
               spec: SearchSpec, out: str | Path, short_rounds: int, jobs: int = 1,
               log: Callable[[str], None] = print) -> SearchResult:
    """FLASC-Search with short federated runs through the sweep runner; writes search.md/json + chosen.toml."""

    metric, higher = primary_metric(task_of(base))
    spec.higher_better = higher
    out = Path(out)
    alpha_per_rank = base.model.lora_alpha / base.model.lora_rank
    short = [*base_overrides, f"rounds={short_rounds}", f"fl.eval_every={short_rounds}"]

    def name(p: tuple[int, float]) -> str:
        return f"r{p[0]}-d{p[1]:.6g}"

    def evaluate(points: list[tuple[int, float]]) -> list[tuple[float, int]]:
        custom = {name(p): candidate_overrides(p[0], p[1], alpha_per_rank) for p in points}
        sweep = Sweep(methods=list(custom), base_preset=base_preset, base_config=base_config, overrides=short,
                      reference=next(iter(custom)), custom=custom)
        run_sweep(sweep, out, jobs=min(jobs, len(points)), log=lambda s: log("   " + s), report=False)
        res = []
        for p in points:
            s = json.loads((method_dir(out, name(p)) / rf.SUMMARY).read_text())
            res.append((float(s["final"]), int(s["total_bytes"])))
        return res

    result = search(spec, evaluate, log)
    chosen = load_config(base_config, preset=base_preset,
                         overrides=[*base_overrides, *candidate_overrides(result.rank, result.density, alpha_per_rank)])
    rf.atomic_write_text(out / "chosen.toml", chosen.to_toml())
    rf.atomic_write_text(out / "search.json", json.dumps(
        {"metric": metric, "spec": asdict(spec), "short_rounds": short_rounds, "runs": result.runs,
         "chosen": {"rank": result.rank, "density": result.density, "metric": result.metric, "bytes": result.bytes},
         "steps": [asdict(s) for s in result.steps]}, indent=2))
    lines = [f"# FLASC-Search: {base.model.name} on {base.data.name}", "",
             f"Budget {spec.budget_bytes:,} bytes per short run of {short_rounds} rounds; metric {metric}; "
             f"{result.runs} short runs.", "", "| step | at (rank, d) | metric | bytes | raise rank -> | raise density -> | choice |",
             "|---|---|---|---|---|---|---|"]
    for i, s in enumerate(result.steps):
        cells = {c["move"]: f"r{c['rank']} d{c['density']:g}: {c['metric']:.4f}, {c['bytes']:,} B"
                 + ("" if c["fits"] else " (over)") for c in s.candidates}
        lines.append(f"| {i} | r{s.current[0]}, d{s.current[1]:g} | {s.current_metric:.4f} | {s.current_bytes:,} | "
                     f"{cells.get('rank', '—')} | {cells.get('density', '—')} | {s.choice} |")
    lines += ["", f"Chosen: rank {result.rank}, density {result.density:g} ({metric} {result.metric:.4f} in "
              f"{short_rounds} rounds, {result.bytes:,} bytes). Run it: `cellm run --config {out / 'chosen.toml'}`", ""]
    rf.atomic_write_text(out / "search.md", "\n".join(lines))
    return result
