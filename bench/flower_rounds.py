"""The same run three ways: embedded, Flower's simulation, and a loopback deployment with 2 SuperNodes.

Run:  .venv/bin/python bench/flower_rounds.py [--preset minilm-l6-bbc] [--rounds 4] [--set KEY=VALUE ...]

Each way runs the same resolved config (1 torch thread per process, evaluation only after the last round) in its
own processes, started here:
- embedded: ``cellm run``;
- Flower simulation: ``cellm flower sim --supernodes 2 --workers 2`` (Ray; 2 virtual SuperNodes, as below);
- loopback deployment: ``flower-superlink`` and 2 ``flower-supernode`` on 127.0.0.1 (insecure), then
  ``cellm flower run``; every train message starts a fresh ClientApp process on its node (one per node and round).
It prints, per way: the time per round after the first (training and communication, from the run's metrics,
without the server's evaluation), the first round's time, the whole run's wall time, the peak resident memory of
all its processes together (sampled every 0.2 s), and the payload bytes cellm's ledger counts next to the bytes
Flower serialized for its messages. Timings depend on the machine and on other load: run it alone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from cellm.runtime import runfolder as rf
from cellm.runtime.flower import deploy as D

BIN = Path(sys.executable).parent
RAY_TMP = tempfile.mkdtemp(prefix="ray")  # short: Ray's socket paths must stay under 108 bytes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _tree(roots: list[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(roots), list(roots)
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    return found


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakMemory:
    """The largest sum of resident memory over a set of processes and all their descendants, sampled."""

    def __init__(self) -> None:
        self.roots: list[int] = []
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            if self.roots:
                self.peak_kb = max(self.peak_kb, sum(_rss_kb(p) for p in _tree(self.roots)))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_kb / 2**20  # GiB


def env(tmp: Path) -> dict[str, str]:
    e = D.child_env()
    e.update({"FLWR_HOME": str(tmp / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_USAGE_STATS_ENABLED": "0",
              "RAY_TMPDIR": RAY_TMP, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "TOKENIZERS_PARALLELISM": "false", "CELLM_NODE_STATE_DIR": str(tmp / "node-state")})
    return e


def cellm_cmd(*args: str) -> list[str]:
    return [str(BIN / "cellm"), *args]


def run_embedded(config: list[str], out: Path, tmp: Path, mem: PeakMemory) -> None:
    proc = subprocess.Popen(cellm_cmd("run", *config, "--out", str(out), "--no-progress"), env=env(tmp),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    mem.roots = [proc.pid]
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"embedded run failed:\n{err[-3000:]}")


def run_sim(config: list[str], out: Path, tmp: Path, mem: PeakMemory) -> None:
    proc = subprocess.Popen(cellm_cmd("flower", "sim", *config, "--out", str(out), "--supernodes", "2",
                                      "--workers", "2", "--no-progress"), env=env(tmp), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    mem.roots = [proc.pid]
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"Flower simulation failed:\n{err[-3000:]}")


def run_loopback(config: list[str], out: Path, tmp: Path, mem: PeakMemory) -> None:
    e = env(tmp)
    port = free_port()
    address = f"127.0.0.1:{port}"
    home = Path(e["FLWR_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f'[superlink.bench]\naddress = "{address}"\ninsecure = true\n')
    procs: list[subprocess.Popen] = []
    logs = []

    def start(name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 (closed below)
        logs.append(log)
        p = subprocess.Popen([str(BIN / cmd[0]), *cmd[1:]], stdout=log, stderr=subprocess.STDOUT, env=e, cwd=tmp,
                             start_new_session=True)
        procs.append(p)
        return p

    try:
        start("superlink", D.superlink_command(address, database=tmp / "superlink.db"))
        deadline = time.monotonic() + 30
        while not _listening(port):
            if time.monotonic() > deadline:
                raise SystemExit("the SuperLink did not start")
            time.sleep(0.2)
        for i in range(2):
            start(f"supernode{i}", D.supernode_command(address, free_port(), f"partition-id={i} num-partitions=2"))
        run = subprocess.Popen(cellm_cmd("flower", "run", "--superlink", "bench", *config, "--out", str(out),
                                         "--node-wait-s", "120"), env=e, cwd=tmp, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        mem.roots = [p.pid for p in procs] + [run.pid]
        text, _ = run.communicate()
        if run.returncode != 0:
            raise SystemExit(f"loopback run failed:\n{text[-3000:]}")
    finally:
        everything = _tree([p.pid for p in procs])
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        time.sleep(3)
        for pid in everything:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in procs:
            p.wait(timeout=30)
        for log in logs:
            log.close()


def summarize(out: Path) -> dict[str, float]:
    rows = rf.read_metrics(out)[1:]
    train = [r["round_s"] - r.get("eval_s", 0.0) for r in rows]
    return {
        "per_round_s": statistics.mean(train[1:]) if len(train) > 1 else float("nan"),
        "first_round_s": train[0],
        "payload_mb": sum(r["down_bytes"] + r["up_bytes"] for r in rows) / 1e6,
        "transport_mb": (sum(r.get("down_transport_bytes", 0) + r.get("up_transport_bytes", 0) for r in rows) / 1e6
                         if "down_transport_bytes" in rows[0] else float("nan")),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="minilm-l6-bbc")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--only", nargs="+", default=["embedded", "flower-sim", "loopback"])
    args = ap.parse_args()
    base = tempfile.mkdtemp(prefix="cellm-bench-flower-")
    try:
        cache = Path(base) / "cache"
        config = ["--preset", args.preset, "--set", f"rounds={args.rounds}", "--set", f"fl.eval_every={args.rounds}",
                  "--set", "run.threads=1", "--set", "run.checkpoint_every=0", "--set", f"data.cache_dir='{cache}'"]
        for o in args.overrides:
            config += ["--set", o]
        # Fill the node-local caches (tokenized data, de-quantized GGUF) once, as a node's first run would.
        warm = subprocess.run(cellm_cmd("run", *config, "--set", "rounds=1", "--out", str(Path(base) / "warm"),
                                        "--no-progress"), env=env(Path(base)), capture_output=True, text=True)
        if warm.returncode != 0:
            raise SystemExit(f"warm-up run failed:\n{warm.stderr[-3000:]}")
        ways = {"embedded": run_embedded, "flower-sim": run_sim, "loopback": run_loopback}
        print(f"{args.preset}, {args.rounds} rounds, {' '.join(args.overrides) or 'preset settings'}; "
              "1 torch thread per process", flush=True)
        print("| runtime | s / round after the first | first round s | wall s | peak RSS GiB | payload MB | "
              "Flower transport MB |")
        print("|---|---|---|---|---|---|---|")
        for name in args.only:
            tmp = Path(base) / name
            tmp.mkdir()
            out = tmp / "run"
            mem = PeakMemory()
            t0 = time.perf_counter()
            ways[name](config, out, tmp, mem)
            wall = time.perf_counter() - t0
            peak = mem.stop()
            s = summarize(out)
            print(f"| {name} | {s['per_round_s']:.2f} | {s['first_round_s']:.2f} | {wall:.1f} | {peak:.2f} | "
                  f"{s['payload_mb']:.3f} | {s['transport_mb']:.3f} |", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(RAY_TMP, ignore_errors=True)


if __name__ == "__main__":
    main()
