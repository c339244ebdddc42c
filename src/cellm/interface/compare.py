"""``cellm compare``: run several methods on the same data, seeds and client sampling, then report.

A sweep is a TOML file (or method names on the command line):

    base_preset = "minilm-l6-bbc"          # or base_config = "path.toml"
    set = ["rounds=60"]                    # overrides applied to every method
    methods = ["dense", "flasc-1/16", "mine"]
    reference = "dense"                    # the target comes from its final metric
    slack = 0.01                           # target = reference final - 0.01 (accuracy) or x1.01 (perplexity)
    [custom.mine]
    set = ["comm.up_density=0.1"]

Each method runs in <out>/runs/<method>/ as a normal run folder. A finished method (summary.json present) is
not run again; a method with a checkpoint is resumed; so a sweep cut short continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tomllib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from cellm.config import CellmConfig, load_config, task_of
from cellm.errors import ConfigError
from cellm.interface.api import resume, run
from cellm.interface.report import build_rows, build_seed_rows, markdown_table, seed_table
from cellm.methods import METHODS, method_overrides
from cellm.models.evaluate import primary_metric
from cellm.runtime import runfolder as rf
from cellm.runtime.plot import plot_runs


@dataclass
class Sweep:
    methods: list[str]
    base_preset: str | None = None
    base_config: str | None = None
    overrides: list[str] = field(default_factory=list)
    reference: str = "dense"
    slack: float = 0.01
    custom: dict[str, list[str]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=list)  # empty: the base config's own seed, one run a method

    def base(self) -> CellmConfig:
        return load_config(self.base_config, preset=self.base_preset, overrides=self.overrides)

    def config_for(self, method: str, seed: int | None = None) -> CellmConfig:
        base = self.base()
        extra = self.custom[method] if method in self.custom else method_overrides(method, base)
        seed_set = [] if seed is None else [f"seed={seed}"]
        return load_config(self.base_config, preset=self.base_preset,
                           overrides=[*self.overrides, *extra, *seed_set])

    def jobs(self) -> list[tuple[str, int | None]]:
        """(method, seed) of every run, seed None without a seeds list."""
        return [(m, s) for m in self.methods for s in (self.seeds or [None])]


SWEEP_KEYS = {"methods", "base_preset", "base_config", "set", "reference", "slack", "custom", "seeds"}


def load_sweep(path: str | Path) -> Sweep:
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"sweep file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"sweep file {path} is not valid TOML: {exc}") from None
    unknown = set(raw) - SWEEP_KEYS
    if unknown:
        raise ConfigError(f"unknown sweep key(s) {sorted(unknown)} in {path} (valid: {sorted(SWEEP_KEYS)})")
    custom = {k: list(v.get("set", [])) for k, v in raw.get("custom", {}).items()}
    sweep = Sweep(methods=list(raw.get("methods", [])), base_preset=raw.get("base_preset"),
                  base_config=raw.get("base_config"), overrides=list(raw.get("set", [])),
                  reference=raw.get("reference", "dense"), slack=float(raw.get("slack", 0.01)), custom=custom,
                  seeds=list(raw.get("seeds", [])))
    check_sweep(sweep)
    return sweep


_METHOD_NAME = re.compile(r"[A-Za-z0-9_.+=/-]{1,100}")


def check_sweep(sweep: Sweep) -> None:
    """Every method resolves to a valid config before anything runs."""
    if not sweep.methods:
        raise ConfigError("sweep has no methods")
    if any(not isinstance(x, int) or isinstance(x, bool) or x < 0 for x in sweep.seeds) or \
            len(set(sweep.seeds)) != len(sweep.seeds):
        raise ConfigError(f"sweep seeds must be distinct integers >= 0; got {sweep.seeds}")
    if sweep.reference not in sweep.methods:
        raise ConfigError(f"sweep reference '{sweep.reference}' is not among its methods {sweep.methods}")
    folders: dict[str, str] = {}
    for m in sweep.methods:
        if not isinstance(m, str) or not _METHOD_NAME.fullmatch(m) or m.replace("/", "_").startswith("."):
            raise ConfigError(f"sweep method name {m!r} must be letters, digits and . _ + = / - and not start with "
                              "'.' (it names the method's folder)")
        folder = m.replace("/", "_")
        if folder in folders:
            raise ConfigError(f"sweep methods {folders[folder]!r} and {m!r} would share the folder runs/{folder}")
        folders[folder] = m
        if m not in sweep.custom and m not in METHODS:
            raise ConfigError(f"unknown method '{m}' (built in: {', '.join(METHODS)}; or define [custom.{m}])")
        sweep.config_for(m)


def method_dir(out: Path, method: str, seed: int | None = None) -> Path:
    if not _METHOD_NAME.fullmatch(method) or method.replace("/", "_").startswith("."):
        raise ConfigError(f"method name {method!r} cannot name a folder")
    d = out / "runs" / method.replace("/", "_")
    return d if seed is None else d / f"seed{seed}"


def _label(method: str, seed: int | None) -> str:
    return method if seed is None else f"{method} seed {seed}"


def _status(d: Path) -> str:
    if (d / rf.SUMMARY).exists():
        return "done"
    if rf.checkpoint_path(d) is not None:  # a legacy pickle one too: resume() refuses it, nothing is deleted
        return "resume"
    return "new"


def _run_one(cfg_toml: str, out: str, threads: int) -> str:
    """Run or resume one method; a config that leaves run.threads at 0 gets the sweep's share of the cores."""

    d = Path(out)
    status = _status(d)
    if status == "resume":
        resume(d)
    else:
        if d.exists():
            shutil.rmtree(d)  # stopped before its first checkpoint: nothing worth keeping
        cfg = load_config(data=tomllib.loads(cfg_toml))
        if cfg.run.threads == 0:
            cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, threads=threads))
        run(cfg, d)
    return out


def run_sweep(sweep: Sweep, out: str | Path, *, jobs: int = 1, log=print, report: bool = True) -> str:
    """Run (or resume) every method, then write report.md, report.json and plot.png into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    todo = []
    for m, seed in sweep.jobs():
        d = method_dir(out, m, seed)
        st = _status(d)
        if st == "done":
            log(f"[{_label(m, seed)}] already finished: kept")
        else:
            todo.append((m, seed, d, st))
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    if jobs <= 1:
        for m, seed, d, st in todo:
            log(f"[{_label(m, seed)}] {'resuming' if st == 'resume' else 'running'} -> {d}")
            _run_one(sweep.config_for(m, seed).to_toml(), str(d), threads)
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            futs = {pool.submit(_run_one, sweep.config_for(m, seed).to_toml(), str(d), threads): _label(m, seed)
                    for m, seed, d, _ in todo}
            for fut in as_completed(futs):
                fut.result()
                log(f"[{futs[fut]}] finished")
    return write_report(sweep, out) if report else ""


def write_report(sweep: Sweep, out: Path) -> str:

    base = sweep.base()
    metric, higher = primary_metric(task_of(base))
    title = f"{base.model.name} on {base.data.name}"
    if sweep.seeds:
        per_seed = {m: {s: rf.read_metrics(method_dir(out, m, s)) for s in sweep.seeds} for m in sweep.methods}
        target, seed_rows = build_seed_rows(per_seed, metric, higher, sweep.reference, sweep.slack)
        table = seed_table(title, metric, target, sweep.reference, seed_rows)
        report = {"metric": metric, "target": target, "reference": sweep.reference, "seeds": sweep.seeds,
                  "rows": [r.__dict__ for r in seed_rows]}
        lines = [(_label(m, s), rows) for m, by_seed in per_seed.items() for s, rows in by_seed.items()]
    else:
        runs = {m: rf.read_metrics(method_dir(out, m)) for m in sweep.methods}
        target, rows = build_rows(runs, metric, higher, sweep.reference, sweep.slack)
        table = markdown_table(title, metric, target, sweep.reference, rows)
        report = {"metric": metric, "target": target, "reference": sweep.reference,
                  "rows": [r.__dict__ for r in rows]}
        lines = list(runs.items())
    rf.atomic_write_text(out / "report.md", table)
    rf.atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    plot_runs(lines, metric, out / "plot.png", title=title)
    return table


def sweep_from_args(methods: list[str], preset: str | None, config: str | None, overrides: list[str],
                    reference: str, slack: float) -> Sweep:
    sweep = Sweep(methods=methods, base_preset=preset, base_config=config, overrides=overrides,
                  reference=reference, slack=slack)
    check_sweep(sweep)
    return sweep
