"""Wire-codec cost and speed: position bits against log2 C(N, k), message bytes, encode/decode throughput.

Run:  .venv/bin/python bench/codec.py [--out codec-bench.md] [--n 1e5 1e6 1e7] [--reps 5]
Quick check (seconds):  .venv/bin/python bench/codec.py --n 1e5 1e6 --reps 2

For each N and density d in {1, 1/2, ..., 1/256} it draws k = floor(N d) uniformly random positions with
gaussian values and prints three markdown tables:

1. bits per kept position for the bitmap and the Golomb gap code, next to the bound log2(C(N, k)) / k and the
   ratio to it (the claim: gaps within 5% of the bound for d <= 1/8), and which scheme "auto" picks;
2. bytes per message (auto positions) for fp32 / fp16 / int8 values, without and with zstd;
3. encode and decode time (median of --reps, fp32 values, auto positions, no zstd) and throughput in MB/s of
   the *dense fp32 input* (4 N bytes), so rows of different density compare on the same footing.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cellm.core.codec import CodecSpec, bound_bits, decode, encode
from cellm.core.sparse import SparseVector

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "core"))  # the fuzz harness lives with its tests
from codec_fuzzing import split  # noqa: E402

DENSITIES = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # as 1/x
INT8 = CodecSpec(values="int8")


def ratio(bits: float, bound: float) -> str:
    return f"{bits / bound:.4f}" if bound > 0 else "-"


def make_vector(n: int, inv_d: int, rng: np.random.Generator) -> SparseVector:
    k = n if inv_d == 1 else n // inv_d
    idx = np.arange(n) if k == n else np.sort(rng.choice(n, size=k, replace=False))
    vals = rng.standard_normal(k, dtype=np.float32)
    return SparseVector(n, torch.from_numpy(idx.astype(np.int64)), torch.from_numpy(vals))


def timed(fn, reps: int) -> float:
    """Median seconds over reps, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def fmt_n(n: int) -> str:
    return f"1e{len(str(n)) - 1}" if str(n).strip("0") == "1" else str(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", nargs="+", type=float, default=[1e5, 1e6, 1e7], help="vector sizes N")
    ap.add_argument("--reps", type=int, default=5, help="timing repetitions (median)")
    ap.add_argument("--zstd-level", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the tables (markdown) to this file")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    z = args.zstd_level

    pos_rows, byte_rows, time_rows = [], [], []
    for n in (int(x) for x in args.n):
        for inv_d in DENSITIES:
            vec = make_vector(n, inv_d, rng)
            k, d = vec.k, f"1/{inv_d}" if inv_d > 1 else "1"
            bound = bound_bits(n, k) / max(k, 1)
            pos_bits = {}
            for scheme in ("bitmap", "gaps"):
                h, _ = split(encode(vec, CodecSpec(positions=scheme)))
                pos_bits[scheme] = h.pos_len * 8 / max(k, 1)
            h_auto, _ = split(encode(vec))
            picked = {0: "dense", 1: "bitmap", 2: "gaps"}[h_auto.positions]
            pos_rows.append(
                [
                    fmt_n(n),
                    d,
                    str(k),
                    f"{bound:.4f}",
                    f"{pos_bits['bitmap']:.4f}",
                    f"{pos_bits['gaps']:.4f}",
                    ratio(pos_bits["gaps"], bound),
                    picked,
                    ratio(h_auto.pos_len * 8 / max(k, 1), bound),
                ]
            )
            sizes = []
            for values in ("fp32", "fp16", "int8"):
                for level in (0, z):
                    sizes.append(len(encode(vec, CodecSpec(values=values, zstd_level=level))))
            byte_rows.append([fmt_n(n), d, str(k), *(f"{s:,}" for s in sizes), f"{sizes[4] / max(k, 1):.3f}"])

            reps = max(1, args.reps if n <= 1_000_000 else args.reps // 2)
            data = encode(vec)
            t_enc = timed(lambda v=vec: encode(v), reps)
            t_dec = timed(lambda b=data, m=n: decode(b, max_n=m), reps)
            data8 = encode(vec, INT8)
            t_enc8 = timed(lambda v=vec: encode(v, INT8), reps)
            t_dec8 = timed(lambda b=data8, m=n: decode(b, max_n=m), reps)
            mb = 4 * n / 1e6
            time_rows.append(
                [
                    fmt_n(n),
                    d,
                    f"{t_enc * 1e3:.2f}",
                    f"{t_dec * 1e3:.2f}",
                    f"{mb / t_enc:,.0f}",
                    f"{mb / t_dec:,.0f}",
                    f"{t_enc8 * 1e3:.2f}",
                    f"{t_dec8 * 1e3:.2f}",
                ]
            )
            print(f"  done N={n} d={d}", flush=True)

    out = "\n\n".join(
        [
            f"# cellm wire codec benchmark\n\nmachine: {platform.machine()} {platform.processor() or ''}, "
            f"numpy {np.__version__}, torch threads {torch.get_num_threads()}; random positions, gaussian values",
            "## Position bits per kept entry (section bytes x 8 / k)\n\n"
            + table(
                [
                    "N",
                    "d",
                    "k",
                    "bound log2C(N,k)/k",
                    "bitmap",
                    "gaps",
                    "gaps/bound",
                    "auto picks",
                    "auto/bound",
                ],
                pos_rows,
            ),
            f"## Bytes per message (auto positions; zstd level {z} kept only where smaller)\n\n"
            + table(
                [
                    "N",
                    "d",
                    "k",
                    "fp32",
                    f"fp32+zstd{z}",
                    "fp16",
                    f"fp16+zstd{z}",
                    "int8",
                    f"int8+zstd{z}",
                    "int8 bytes/entry",
                ],
                byte_rows,
            ),
            "## Speed (median ms; MB/s of the dense fp32 input, 4N bytes; auto positions, no zstd)\n\n"
            + table(
                [
                    "N",
                    "d",
                    "fp32 enc ms",
                    "fp32 dec ms",
                    "enc MB/s",
                    "dec MB/s",
                    "int8 enc ms",
                    "int8 dec ms",
                ],
                time_rows,
            ),
        ]
    )
    print(out)
    if args.out:
        with open(args.out, "w") as f:
            f.write(out + "\n")


if __name__ == "__main__":
    main()
