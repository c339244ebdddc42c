"""``cellm compare``: run several methods on the same data, seeds and client sampling, then report.

A sweep is a TOML file (or method names on the command line):

    base_preset = "minilm-l6-bbc"          # or base_config = "path.toml"
    set = ["rounds=60"]                    # overrides applied to every method
    methods = ["dense", "flasc-1/16", "mine"]
    reference = "dense"                    # the target comes from its final metric
    slack = 0.01                           # target = reference final - 0.01 (accuracy) or x1.01 (perplexity)
    [custom.mine]
    set = ["comm.up_density=0.1"]

With ``seeds`` and ``reference_report = "../other/report.json"`` (relative to the sweep file) the reference is not
run again: its per-seed row and target come from that earlier several-seed report, measured on the same setup.

Each method runs in <out>/runs/<method>/ as a normal run folder. A finished method (summary.json present) is
not run again; a method with a checkpoint is resumed; so a sweep cut short continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import re
import shutil
import tomllib
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellm.config import CellmConfig, load_config, read_toml, task_of
from cellm.errors import ConfigError
from cellm.interface.api import resume, run
from cellm.interface.report import build_rows, build_seed_rows, markdown_table, recorded_reference, seed_table
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
    reference_report: str = ""  # a report.json whose reference row (measured earlier, same setup) is reused

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


SWEEP_KEYS = {"methods", "base_preset", "base_config", "set", "reference", "slack", "custom", "seeds",
              "reference_report"}


def load_sweep(path: str | Path) -> Sweep:
    raw = read_toml(path, "sweep")
    unknown = set(raw) - SWEEP_KEYS
    if unknown:
        raise ConfigError(f"unknown sweep key(s) {sorted(unknown)} in {path} (valid: {sorted(SWEEP_KEYS)})")
    custom = {k: list(v.get("set", [])) for k, v in raw.get("custom", {}).items()}
    sweep = Sweep(methods=list(raw.get("methods", [])), base_preset=raw.get("base_preset"),
                  base_config=raw.get("base_config"), overrides=list(raw.get("set", [])),
                  reference=raw.get("reference", "dense"), slack=float(raw.get("slack", 0.01)), custom=custom,
                  seeds=list(raw.get("seeds", [])))
    if raw.get("reference_report"):  # relative to the sweep file, like a config path would be read by its author
        sweep.reference_report = str(Path(path).parent / str(raw["reference_report"]))
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
    if sweep.reference_report:
        if not sweep.seeds:
            raise ConfigError("sweep reference_report needs a seeds list (the recorded reference is per seed)")
        if sweep.reference in sweep.methods:
            raise ConfigError(f"sweep reference '{sweep.reference}' comes from reference_report "
                              f"{sweep.reference_report}: do not list it among the methods too")
        _, row = recorded(sweep)
        if set(sweep.seeds) - set(row.seeds):
            raise ConfigError(f"sweep seeds {sweep.seeds} are not all among the recorded reference's seeds {row.seeds} "
                              f"in {sweep.reference_report}")
    elif sweep.reference not in sweep.methods:
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


def recorded(sweep: Sweep):
    """(target, row) of the reference measured by an earlier sweep, from ``sweep.reference_report``."""
    path = Path(sweep.reference_report)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"sweep reference_report {path}: cannot read it as JSON ({exc})") from None
    metric, _ = primary_metric(task_of(sweep.base()))
    return recorded_reference(data, sweep.reference, metric, str(path))


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
        target, seed_rows = build_seed_rows(per_seed, metric, higher, sweep.reference, sweep.slack,
                                            recorded(sweep) if sweep.reference_report else None)
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


def compare(
    methods: Sequence[str] = (),
    *,
    out: str | Path,
    sweep: str | Path | None = None,
    preset: str | None = None,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    reference: str = "dense",
    slack: float = 0.01,
    seeds: Sequence[int] = (),
    jobs: int = 1,
    log: Callable[[str], Any] = print,
    report: bool = True,
) -> str:
    """Run several methods on the same data, seeds and client sampling, then write a report (``cellm compare``).

    Each method runs (or resumes, or is kept when finished) in ``<out>/runs/<method>/`` as a normal run folder,
    so calling this again on the same ``out`` continues a sweep that was cut short.

    Args:
        methods: Method names (``cellm methods`` lists the built-in ones), each a set of config overrides on the
            same base. Leave empty with ``sweep``.
        out: The sweep folder: every method's run folder, then ``report.md``, ``report.json`` and ``plot.png``.
        sweep: A sweep TOML file (methods, base preset or config, overrides, reference, slack, custom methods,
            seeds; see the module docstring) instead of the arguments ``methods`` to ``seeds``.
        preset: The base config's preset (default ``demo`` when neither ``preset`` nor ``config`` is given).
        config: A TOML config file as the base, applied over ``preset``.
        overrides: ``key=value`` settings applied to every method's config, before the method's own.
        reference: The method whose final metric sets the target that the bytes-to-target column counts to.
        slack: The target's distance from the reference's final metric: ``final - slack`` for accuracy,
            ``final * (1 + slack)`` for perplexity.
        seeds: Run every method once per seed and report mean, sd and the median bytes to the target; empty:
            one run per method with the base config's seed.
        jobs: Methods run in parallel processes (each gets its share of the CPU cores unless its config sets
            ``run.threads``).
        log: Called with one line per method as it is kept, started, resumed or finished.
        report: Write the report files and return the table; False only runs the methods.

    Returns:
        The report as a Markdown table (also in ``<out>/report.md``), or ``""`` with ``report=False``.

    Raises:
        ConfigError: An unknown method or sweep key, a config that does not validate for some method, a
            reference that is not among the methods, repeated or negative seeds, ``jobs < 1``, or ``sweep``
            given together with ``methods``, ``preset``, ``config``, ``overrides`` or ``seeds``. Everything is
            checked before the first run starts.
        AssetError: A packaged model or dataset that a method needs is not installed.
    """
    if jobs < 1:
        raise ConfigError(f"jobs must be >= 1; got {jobs}")
    if sweep is not None:
        if methods or preset is not None or config is not None or overrides or seeds:
            raise ConfigError("a sweep file names its own methods, base config, overrides and seeds; pass either "
                              "sweep or those")
        plan = load_sweep(sweep)
    else:
        plan = Sweep(methods=list(methods), base_preset=preset, base_config=None if config is None else str(config),
                     overrides=list(overrides), reference=reference, slack=float(slack), seeds=list(seeds))
        check_sweep(plan)
    return run_sweep(plan, out, jobs=jobs, log=log, report=report)
