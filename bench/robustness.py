"""How one hostile client a round moves the model, under each aggregation rule.

Run:  .venv/bin/python bench/robustness.py --out runs/robustness [--preset cellm-bbc] [--seeds 0] [--jobs 1]
          [--set KEY=VALUE ...] [--rules off default trimmed_mean median krum] [--attacks none scale signflip random]

Each cell is one ``cellm run`` (a separate process) of the preset with one aggregation rule and one attack:
- rules: ``off`` (the plain mean, no bound: ``robust.clip_factor=0``), ``default`` (the shipped defaults: the
  per-upload L2 bound, then the mean), ``trimmed_mean``, ``median``, ``krum`` (each after the default bound),
  ``cosine`` (the default, and uploads pointing against the round's consensus refused: ``robust.min_cosine=0``);
- attacks: ``none`` (clean), or ``faults.byzantine=0.2`` (1 of the 5 sampled clients a round) with
  ``faults.attack`` = scale / signflip / random at the default ``faults.attack_scale`` (1e30).
It prints a markdown table of final accuracy (mean and spread over seeds), the first round at which the run
reaches the clean default run's final accuracy minus 1 point, and the uploads clipped; and writes report.json.
A finished cell (summary.json present) is not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RULES = {
    "off": ["robust.clip_factor=0"],
    "default": [],
    "trimmed_mean": ["robust.aggregator=trimmed_mean"],
    "median": ["robust.aggregator=median"],
    "krum": ["robust.aggregator=krum"],
    "cosine": ["robust.min_cosine=0"],
}
ATTACKS = {
    "none": [],
    "scale": ["faults.byzantine=0.2", "faults.attack=scale"],
    "signflip": ["faults.byzantine=0.2", "faults.attack=signflip"],
    "random": ["faults.byzantine=0.2", "faults.attack=random"],
}
CLI = "import sys; from cellm.cli import main; sys.exit(main())"


def cell_dir(out: Path, rule: str, attack: str, seed: int) -> Path:
    return out / f"{rule}-{attack}-seed{seed}"


def run_cell(out: Path, preset: str, rule: str, attack: str, seed: int, extra: list[str], threads: int) -> Path:
    d = cell_dir(out, rule, attack, seed)
    if (d / "summary.json").exists():
        return d
    sets = [f"seed={seed}", f"run.threads={threads}", *RULES[rule], *ATTACKS[attack], *extra]
    cmd = [sys.executable, "-c", CLI, "run", "--preset", preset, "--out", str(d), "--no-progress"]
    if (d / "checkpoint.safetensors").exists():
        cmd = [sys.executable, "-c", CLI, "run", "--resume", str(d), "--no-progress"]
    else:
        for s in sets:
            cmd += ["--set", s]
        if d.exists():
            import shutil

            shutil.rmtree(d)
    log = out / f"{d.name}.log"
    with open(log, "w") as fh:
        r = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        print(f"{d.name}: exit {r.returncode}, see {log}", flush=True)
    else:
        print(f"{d.name}: done", flush=True)
    return d


def metrics(d: Path) -> list[dict]:
    p = d / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


def final_accuracy(rows: list[dict]) -> float | None:
    evs = [r["eval"]["accuracy"] for r in rows if "eval" in r]
    return evs[-1] if evs and (rows[-1].get("eval") is not None) else None


def first_round(rows: list[dict], target: float) -> int | None:
    for r in rows:
        if "eval" in r and r["eval"]["accuracy"] >= target:
            return r["round"]
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="cellm-bbc")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="Torch threads a run (0: cores / jobs).")
    ap.add_argument("--rules", nargs="+", default=[r for r in RULES if r != "cosine"], choices=list(RULES))
    ap.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS))
    ap.add_argument("--set", dest="extra", action="append", default=[])
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    cells = [(r, a, s) for a in args.attacks for r in args.rules for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda c: run_cell(out, args.preset, *c, args.extra, threads), cells))

    finals = {c: final_accuracy(metrics(cell_dir(out, *c))) for c in cells}
    clean = [finals[("default", "none", s)] for s in args.seeds if finals.get(("default", "none", s)) is not None]
    target = statistics.mean(clean) - 0.01 if clean else None
    rows = []
    print(f"\ntarget: clean default run's final accuracy minus 1 point = {target}")
    print("| attack | rule | final accuracy (mean ± sd) | per seed | first round >= target | uploads clipped |")
    print("|---|---|---|---|---|---|")
    for a in args.attacks:
        for r in args.rules:
            per = [finals[(r, a, s)] for s in args.seeds]
            got = [x for x in per if x is not None]
            mean = statistics.mean(got) if got else None
            sd = statistics.stdev(got) if len(got) > 1 else 0.0
            reach = [first_round(metrics(cell_dir(out, r, a, s)), target) if target is not None else None
                     for s in args.seeds]
            clipped = [sum(x.get("clipped", 0) for x in metrics(cell_dir(out, r, a, s))) for s in args.seeds]
            rows.append({"attack": a, "rule": r, "final": per, "mean": mean, "sd": sd, "reach": reach,
                         "clipped": clipped})
            shown = "failed" if mean is None else f"{mean:.4f} ± {sd:.4f}"
            print(f"| {a} | {r} | {shown} | {', '.join('-' if x is None else f'{x:.4f}' for x in per)} | "
                  f"{', '.join('never' if x is None else str(x) for x in reach)} | "
                  f"{', '.join(str(x) for x in clipped)} |")
    (out / "report.json").write_text(json.dumps({"target": target, "seeds": args.seeds, "preset": args.preset,
                                                 "extra": args.extra, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
