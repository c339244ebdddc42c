"""What a Flower ClientApp process pays before its first upload: interpreter and imports, model, data, one step.

Run:  .venv/bin/python bench/coldstart.py [--presets tiny minilm-l6-bbc smollm2-135m-shakespeare] [--repeat 2]

On a SuperNode every train message starts a fresh ``flwr-clientapp`` process (see cellm.runtime.flower), so this is
paid once per node and round. Each figure comes from a fresh Python process started here, which imports what the
ClientApp imports, loads the run's setup (``cellm.runtime.setup.load_setup``: model with adapter, federated data)
and trains one client once (``client_update`` on the round-1 task), with 1 torch thread. The first process of a
preset fills the node-local caches (tokenized data, de-quantized GGUF weights) in a fresh cache folder; the
figures printed are the medians of the ``--repeat`` processes after it (a node's steady state). For models loaded
from GGUF, the "GGUF each time" row bypasses the kept de-quantized weights, as every process did before they were
kept. Timings depend on the machine and on other load: run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, sys, time
t0 = time.time()
import torch
torch.set_num_threads(1)
import cellm.runtime.flower.client_app  # noqa: F401  what flwr-clientapp loads
import peft, transformers  # noqa: F401  imported by the model load anyway; counted here
t1 = time.time()
import cellm
from cellm.federated.client import ClientState, client_update
from cellm.federated.messages import train_spec
from cellm.federated.server import ServerState, plan_round
from cellm.models import registry
from cellm.runtime.setup import load_setup
if sys.argv[3] == "gguf-each-time":
    registry._load_base = lambda spec, num_labels, cache_dir: spec.loader(num_labels)
cfg = cellm.load_config(preset=sys.argv[1], overrides=[f"data.cache_dir='{sys.argv[2]}'", "run.threads=1"])
setup = load_setup(cfg)
t2 = time.time()
plan = plan_round(ServerState.initial(setup.w0, setup.stage), cfg)
c = plan.clients[0]
client_update(setup.loaded.model, setup.flat, setup.data.clients[c], plan.tasks[c], train_spec(cfg), ClientState(),
              seed=cfg.seed, w0=setup.w0)
t3 = time.time()
print(json.dumps({"start": t0, "imports_s": t1 - t0, "model_s": setup.load_s["model_s"],
                  "data_s": setup.load_s["data_s"], "setup_s": t2 - t1, "step_s": t3 - t2, "end": t3}))
"""


def one_process(preset: str, cache: str, mode: str) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    t = time.time()
    out = subprocess.run([sys.executable, "-c", CHILD, preset, cache, mode], capture_output=True, text=True,
                         env=env, check=False)
    done = time.time()
    if out.returncode != 0:
        raise SystemExit(f"{preset}: the measuring process failed:\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["python_s"] = row["start"] - t  # interpreter start until the first line runs
    row["total_s"] = done - t
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "minilm-l6-bbc", "smollm2-135m-shakespeare"])
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    cols = ["python_s", "imports_s", "model_s", "data_s", "step_s", "total_s"]
    print("| preset | model load | " + " | ".join(c.removesuffix("_s") for c in cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for preset in args.presets:
        with tempfile.TemporaryDirectory(prefix="cellm-coldstart-") as cache:
            first = one_process(preset, cache, "kept")  # a node's first message: fills the caches
            modes = ["kept"]
            if preset.startswith("smollm2"):
                modes.append("gguf-each-time")
            print(f"| {preset} | first message on a node | " + " | ".join(f"{first[c]:.2f}" for c in cols) + " |",
                  flush=True)
            for mode in modes:
                rows = [one_process(preset, cache, mode) for _ in range(args.repeat)]
                med = {c: statistics.median(r[c] for r in rows) for c in cols}
                label = "kept de-quantized weights" if mode == "kept" and preset.startswith("smollm2") else (
                    "GGUF each time" if mode != "kept" else "from files")
                print(f"| {preset} | {label} | " + " | ".join(f"{med[c]:.2f}" for c in cols) + " |", flush=True)


if __name__ == "__main__":
    main()
