"""The ``cellm`` command. Input errors print one line naming the problem and exit with code 2."""

from __future__ import annotations

import argparse
import sys

from cellm.config import describe_fields, load_config, presets
from cellm.errors import CellmError, ConfigError
from cellm.interface import flower_cli
from cellm.interface.api import resume, run
from cellm.interface.cliargs import add_config_args, print_summary
from cellm.interface.compare import load_sweep, run_sweep, sweep_from_args
from cellm.interface.search import SearchSpec, run_search
from cellm.interface.use import export, generate
from cellm.methods import METHODS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cellm", description="Federated LoRA fine-tuning with sparse communication.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="Run federated fine-tuning (default: the demo preset).")
    add_config_args(r)
    r.add_argument("--out", help="Run folder (default runs/<model>-<data>-<time>).")
    r.add_argument("--resume", metavar="DIR", help="Continue the run in DIR from its last checkpoint.")
    r.add_argument("--no-progress", action="store_true", help="No progress bar.")
    cp = sub.add_parser("compare", help="Run several methods on the same data and seeds; write a report.")
    cp.add_argument("methods", nargs="*", help="Method names (see `cellm methods`), when no --sweep file.")
    cp.add_argument("--sweep", help="Sweep TOML file (methods, base preset/config, overrides, custom methods).")
    add_config_args(cp, " of the methods given on the command line")
    cp.add_argument("--reference", default="dense", help="Method whose final metric sets the target.")
    cp.add_argument("--slack", type=float, default=0.01, help="Target = reference final - slack (x(1+slack) for perplexity).")
    cp.add_argument("--out", required=True, help="Sweep folder (re-running it resumes).")
    cp.add_argument("--jobs", type=int, default=1, help="Methods run in parallel processes.")
    sr = sub.add_parser("search", help="Choose LoRA rank and density under a byte budget (FLASC-Search).")
    add_config_args(sr)
    sr.add_argument("--budget", type=float, required=True, help="Most bytes a short run may use (e.g. 5e7).")
    sr.add_argument("--short-rounds", type=int, default=10, help="Rounds of each short run.")
    sr.add_argument("--start-rank", type=int, default=1)
    sr.add_argument("--start-density", type=float, default=1 / 64)
    sr.add_argument("--max-rank", type=int, default=64)
    sr.add_argument("--min-gain", type=float, default=0.005, help="Smallest metric gain that counts as progress.")
    sr.add_argument("--patience", type=int, default=2, help="Steps without progress before the search stops.")
    sr.add_argument("--out", required=True, help="Search folder (re-running it reuses finished short runs).")
    sr.add_argument("--jobs", type=int, default=1, help="Candidates run in parallel processes.")
    sub.add_parser("methods", help="List the built-in methods for `cellm compare`.")
    g = sub.add_parser("generate", help="Complete a prompt with a run's model (base + its adapter).")
    g.add_argument("run_dir", metavar="RUN_DIR", help="A finished run folder.")
    g.add_argument("prompt", metavar="PROMPT")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default).")
    g.add_argument("--seed", type=int, default=0, help="Sampling seed (temperature > 0).")
    e = sub.add_parser("export", help="Write a run's merged model (base + adapter) as a plain transformers folder.")
    e.add_argument("run_dir", metavar="RUN_DIR", help="A finished run folder.")
    e.add_argument("out_dir", metavar="OUT_DIR", help="New folder for the merged model and its tokenizer.")

    flower_cli.add_parser(sub)
    sub.add_parser("presets", help="List presets.")
    c = sub.add_parser("config", help="Print the resolved config, or every field with its help.")
    add_config_args(c)
    c.add_argument("--fields", action="store_true", help="List every config field, its default and help.")
    return p


def _run(args: argparse.Namespace) -> int:
    if args.resume:
        if args.config or args.preset or args.overrides or args.out:
            raise ConfigError("--resume DIR takes the config from DIR; drop --config/--preset/--set/--out")
        result = resume(args.resume, progress=not args.no_progress)
    else:
        cfg = load_config(args.config, preset=args.preset, overrides=args.overrides)
        result = run(cfg, args.out, progress=not args.no_progress)
    print_summary(result)
    return 0


def _compare(args: argparse.Namespace) -> int:
    if args.sweep:
        sweep = load_sweep(args.sweep)
    else:
        if not args.methods:
            raise ConfigError("cellm compare needs --sweep FILE or method names")
        sweep = sweep_from_args(args.methods, args.preset, args.config, args.overrides, args.reference, args.slack)
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1; got {args.jobs}")
    print(run_sweep(sweep, args.out, jobs=args.jobs))
    return 0


def _search(args: argparse.Namespace) -> int:
    if args.short_rounds < 1:
        raise ConfigError(f"--short-rounds must be >= 1; got {args.short_rounds}")
    base = load_config(args.config, preset=args.preset, overrides=args.overrides)
    spec = SearchSpec(budget_bytes=int(args.budget), start_rank=args.start_rank, start_density=args.start_density,
                      max_rank=args.max_rank, min_gain=args.min_gain, patience=args.patience)
    res = run_search(base, args.overrides, args.preset, args.config, spec, args.out, args.short_rounds,
                     jobs=args.jobs)
    print(f"chosen: rank {res.rank}, density {res.density:g} -> {args.out}/chosen.toml")
    return 0


def _methods(args: argparse.Namespace) -> int:
    for name, (help_, _) in METHODS.items():
        print(f"{name:18} {help_}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    print(generate(args.run_dir, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   seed=args.seed))
    return 0


def _export(args: argparse.Namespace) -> int:
    print(f"merged model written to {export(args.run_dir, args.out_dir)}")
    return 0


def _presets(args: argparse.Namespace) -> int:
    print("\n".join(presets()))
    return 0


def _config(args: argparse.Namespace) -> int:
    if args.fields:
        for key, default, help_ in describe_fields():
            print(f"{key:28} {default:16} {help_}")
    else:
        print(load_config(args.config, preset=args.preset, overrides=args.overrides).to_toml(), end="")
    return 0


HANDLERS = {"run": _run, "compare": _compare, "search": _search, "methods": _methods, "presets": _presets,
            "config": _config, "flower": flower_cli.main, "generate": _generate, "export": _export}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return HANDLERS[args.command](args)
    except CellmError as exc:
        print(f"cellm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
