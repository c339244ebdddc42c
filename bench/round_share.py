"""Share of round time spent on communication work in real runs: masks and top-k, encoding, decoding,
aggregation and the server step (``overhead_s`` of each metrics row), against the round's time without
evaluation (``round_s - eval_s``).

Run:  .venv/bin/python bench/round_share.py RUN_DIR [RUN_DIR ...]
      (e.g. the method folders of a sweep: runs/bbc-sweep/runs/*)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def share(run: Path) -> tuple[int, float, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r["round"] > 0 and "overhead_s" in r]
    over = sum(r["overhead_s"] for r in rows)
    train = sum(r["round_s"] - r.get("eval_s", 0.0) for r in rows)
    return len(rows), over, train


def main(paths: list[str]) -> None:
    if not paths:
        sys.exit(__doc__)
    print("| run | rounds | coding + aggregation + server step (s) | round time (s; without eval where eval_s "
          "is recorded) | share |")
    print("|---|---|---|---|---|")
    for p in paths:
        n, over, train = share(Path(p))
        if n:
            print(f"| {Path(p).name} | {n} | {over:.2f} | {train:.1f} | {100 * over / train:.2f}% |")


if __name__ == "__main__":
    main(sys.argv[1:])
