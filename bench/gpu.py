"""Seconds a round and peak GPU memory of a preset on CUDA, in fp32 and bf16 (and on CPU, for comparison).

Run:  .venv/bin/python bench/gpu.py [--preset demo] [--rounds 6] [--warmup 1] [--precisions fp32 bf16] [--cpu]
                                    [--set KEY=VALUE ...]

Each setting runs in a fresh child process (``cellm.run`` without a run folder, evaluating only at round 0 and
after the last round) so that its peak memory and CUDA start-up are its own. A round's time is the metrics row's
``round_s`` less its ``eval_s``: training, coding and aggregation. Round 0 only evaluates and is left out; the
first ``--warmup`` rounds (CUDA's lazy start: kernels, cuBLAS handles) are shown apart and left out of the mean
and spread. Peak GPU memory is ``torch.cuda.max_memory_allocated()`` over the whole child (load, rounds, eval).
``--cpu`` adds the same run on CPU in fp32. ``--set`` takes config overrides as ``cellm run --set`` does, e.g.
``--set data.max_test_examples=256``. Exits with a message when torch sees no GPU. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys


def child(preset: str, rounds: int, device: str, precision: str, overrides: list[str]) -> None:
    import torch

    import cellm

    cfg = cellm.load_config(preset=preset, overrides=[
        f"rounds={rounds}", f"fl.eval_every={rounds}", f"run.device='{device}'", f"run.precision='{precision}'",
        *overrides])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    res = cellm.run(cfg, save=False)
    rows = [r for r in res.metrics if r["round"] > 0]
    print(json.dumps({
        "device": device, "precision": precision,
        "train_s": [r["round_s"] - r.get("eval_s", 0.0) for r in rows],
        "eval_s": next((r["eval_s"] for r in reversed(rows) if "eval_s" in r), None),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final": {res.primary: res.final_eval[res.primary]},
    }))


def summary(row: dict, warmup: int) -> str:
    timed = row["train_s"][warmup:]
    mean = statistics.fmean(timed)
    sd = statistics.stdev(timed) if len(timed) > 1 else 0.0
    first = ", ".join(f"{s:.3f}" for s in row["train_s"][:warmup]) or "-"
    gpu = f"{row['peak_gpu_mb']:.0f}" if row["peak_gpu_mb"] is not None else "-"
    ev = f"{row['eval_s']:.3f}" if row["eval_s"] is not None else "-"
    (name, value), = row["final"].items()
    return (f"| {row['device']} | {row['precision']} | {len(timed)} | {mean:.3f} | {sd:.3f} | {min(timed):.3f} | "
            f"{max(timed):.3f} | {first} | {ev} | {gpu} | {row['peak_rss_mb']:.0f} | {name} {value:.4g} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1, help="first rounds shown apart, not in the mean and spread")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--cpu", action="store_true", help="also run on CPU (fp32) for comparison")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--child", nargs=2, metavar=("DEVICE", "PRECISION"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.preset, args.rounds, *args.child, args.overrides)
        return
    if args.rounds <= args.warmup:
        sys.exit(f"bench/gpu.py: --rounds ({args.rounds}) must exceed --warmup ({args.warmup}): no round left to time")
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA GPU here (torch.cuda.is_available() is False, torch "
                 f"{torch.__version__}, CUDA build {torch.version.cuda}); run it on a machine with a GPU")
    print(f"{args.preset}, {args.rounds} rounds ({args.warmup} warm-up); {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}; overrides {args.overrides or 'none'}\n")
    settings = [("cuda", p) for p in args.precisions] + ([("cpu", "fp32")] if args.cpu else [])
    rows = []
    for device, precision in settings:
        cmd = [sys.executable, __file__, "--preset", args.preset, "--rounds", str(args.rounds),
               "--child", device, precision, *(f"--set={o}" for o in args.overrides)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"bench/gpu.py: the {device}/{precision} run failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print("| device | precision | rounds timed | s/round mean | sd | min | max | warm-up rounds (s) | final eval (s) "
          "| peak GPU MB | peak RSS MB | final |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(summary(row, args.warmup))
    cpu = next((r for r in rows if r["device"] == "cpu"), None)
    if cpu is not None:
        base = statistics.fmean(cpu["train_s"][args.warmup:])
        for r in rows:
            if r["device"] == "cuda":
                print(f"\ncuda/{r['precision']}: {base / statistics.fmean(r['train_s'][args.warmup:]):.1f}x the "
                      "CPU's speed a round", end="")
        print()


if __name__ == "__main__":
    main()
