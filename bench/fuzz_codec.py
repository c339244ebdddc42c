"""Long fuzz run of the strict decoder: mutated valid messages must decode to a valid vector or raise CodecError.

Run:  .venv/bin/python bench/fuzz_codec.py 100000
Quick check:  .venv/bin/python bench/fuzz_codec.py 5000
One value scheme only:  .venv/bin/python bench/fuzz_codec.py 20000 --values rot3

Each case (seed = case number + --seed) encodes a random small vector with a random spec (any value scheme:
fp32/fp16/bf16, int8/int4/int2, rot4/rot3/rot2; or the one --values names), applies one mutation from
tests/core/codec_fuzzing.py's MUTATIONS (truncation, bit flips, insertions, deletions, trailing bytes, crafted header
fields and huge sizes; NaN/Inf/out-of-range values, bad scales, set padding bits, changed rotation seeds and
scrambled positions behind a correct CRC; zstd bombs and bad frames; garbage), and decodes it with max_n = 2**20.
Reports how many cases decoded OK, raised CodecError, or failed -- raised any other exception, hit the last-resort
internal guard, or returned a malformed vector (must all be 0; their seeds are printed to reproduce with
fuzz_case(seed)) -- the slowest case, and the process's max RSS. Exits 1 if any case failed.
"""

from __future__ import annotations

import argparse
import collections
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "core"))  # the fuzz harness lives with its tests
from codec_fuzzing import fuzz_case  # noqa: E402

from cellm.core.codec.spec import VALUE_CHOICES  # noqa: E402

FAILURES = ("other", "internal", "invalid")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="?", type=int, default=100_000, help="number of cases (default 100000)")
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--values", choices=VALUE_CHOICES, default=None, help="one value scheme (default: any)")
    args = ap.parse_args()

    base_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # torch + numpy imports
    outcomes: collections.Counter[str] = collections.Counter()
    by_mutation: collections.Counter[tuple[str, str]] = collections.Counter()
    failed: list[tuple[int, str, str]] = []
    slowest = (0.0, -1)
    t0 = time.perf_counter()
    for seed in range(args.seed, args.seed + args.cases):
        t = time.perf_counter()
        name, outcome = fuzz_case(seed, values=args.values)
        dt = time.perf_counter() - t
        slowest = max(slowest, (dt, seed))
        outcomes[outcome] += 1
        by_mutation[(name, outcome)] += 1
        if outcome in FAILURES:
            failed.append((seed, name, outcome))
        if (seed - args.seed + 1) % 10_000 == 0:
            print(f"  {seed - args.seed + 1} cases, {len(failed)} failures", flush=True)
    wall = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    scope = f", values={args.values}" if args.values else ""
    print(f"cases: {args.cases}  (seeds {args.seed}..{args.seed + args.cases - 1}{scope}, {wall:.1f} s)")
    print(f"decoded OK: {outcomes['ok']}")
    print(f"raised CodecError: {outcomes['rejected']}")
    print(
        f"raised anything else / internal guard / malformed result: "
        f"{outcomes['other']} / {outcomes['internal']} / {outcomes['invalid']}  (must be 0)"
    )
    print(f"slowest case: {slowest[0] * 1e3:.1f} ms (seed {slowest[1]})")
    print(f"max RSS: {rss_mb:.1f} MiB (after imports, before the first case: {base_mb:.1f} MiB)")
    print("\n| mutation | ok | CodecError | failed |\n|---|---:|---:|---:|")
    for name in sorted({m for m, _ in by_mutation}):
        bad = sum(by_mutation[(name, f)] for f in FAILURES)
        print(f"| {name} | {by_mutation[(name, 'ok')]} | {by_mutation[(name, 'rejected')]} | {bad} |")
    for seed, name, outcome in failed[:20]:
        print(f"FAILED seed={seed} mutation={name} outcome={outcome}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
