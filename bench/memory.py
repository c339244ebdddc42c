"""Peak memory of the embedded simulator with 10 versus 200 clients, same model (one base model in memory).

Run:  .venv/bin/python bench/memory.py [--model minilm-l6] [--rounds 2]

Each setting runs in a fresh child process (2 rounds, 5 clients a round, no run folder) and reports its peak
RSS (ru_maxrss). The claim checked: 200 clients take at most 1.5x the peak RSS of 10.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def child(model: str, clients: int, rounds: int) -> None:
    import cellm

    overrides = [f"model.name='{model}'", f"data.num_clients={clients}", "data.min_client_size=1", "data.dirichlet_alpha=10.0",
                 f"rounds={rounds}", "fl.clients_per_round=5", f"fl.eval_every={rounds}",
                 "data.max_test_examples=128", "comm.error_feedback_up=true"]
    cfg = cellm.load_config(preset="demo", overrides=overrides)
    res = cellm.run(cfg, save=False)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"clients": clients, "peak_rss_mb": peak_mb, "final": res.final_eval}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", type=int, default=0)
    args = ap.parse_args()
    if args.child:
        child(args.model, args.child, args.rounds)
        return
    rows = []
    for n in (10, 200):
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--rounds", str(args.rounds),
                              "--child", str(n)], check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print("| clients | peak RSS (MB) |\n|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['peak_rss_mb']:.0f} |")
    ratio = rows[1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    print(f"\nratio 200/10 = {ratio:.3f} (limit 1.5) -> {'OK' if ratio <= 1.5 else 'OVER'}")


if __name__ == "__main__":
    main()
