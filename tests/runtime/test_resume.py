import json
import os
import signal
import subprocess
import sys
import time
import tomllib

from safetensors.torch import load_file

from cellm.runtime import runfolder as rf


def _env(omp_threads: str | None) -> dict[str, str]:
    """This environment with OMP_NUM_THREADS set to ``omp_threads``, or removed (torch's default) when None."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if omp_threads is not None:
        env["OMP_NUM_THREADS"] = omp_threads
    return env


def _start(args, cwd):
    return subprocess.Popen([sys.executable, "-m", "cellm.cli", "run", "--no-progress", *args], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env("1"))


def _last_round(out):
    try:
        with open(out / rf.METRICS) as fh:
            lines = [json.loads(x) for x in fh if x.strip()]
        return lines[-1]["round"] if lines else -1
    except FileNotFoundError:
        return -1


def test_a_run_killed_under_one_thread_resumes_under_the_default_to_the_same_adapter_and_ledger(
        tmp_path, cache_dir):
    """The trap: the run starts under OMP_NUM_THREADS=1 and is resumed in a shell without it. The run folder
    records its thread count, so the resumed rounds run with 1 thread too and equal an uninterrupted 1-thread
    run (started, here, also from a shell without OMP_NUM_THREADS, with the count given as run.threads)."""
    overrides = ["--preset", "tiny", "--set", "rounds=30", "--set", f"data.cache_dir='{cache_dir}'",
                 "--set", "comm.error_feedback_up=true", "--set", "fl.eval_every=5",
                 "--set", "model.lora_rank=16", "--set", "fl.batch_size=32"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    proc = _start([*overrides, "--out", str(killed)], tmp_path)
    deadline = time.time() + 180
    while _last_round(killed) < 4 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert _last_round(killed) < 30
    with open(killed / rf.CONFIG, "rb") as fh:
        assert tomllib.load(fh)["run"]["threads"] == 1  # resolved from OMP_NUM_THREADS and recorded
    res = subprocess.run([sys.executable, "-m", "cellm.cli", "run", "--no-progress", "--resume", str(killed)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300, env=_env(None))
    assert res.returncode == 0, res.stderr
    ref = subprocess.run([sys.executable, "-m", "cellm.cli", "run", "--no-progress", *overrides,
                          "--set", "run.threads=1", "--out", str(full)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env=_env(None))
    assert ref.returncode == 0, ref.stderr
    a = load_file(full / "adapter" / "adapter_model.safetensors")
    b = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    ledger_keys = ("round", "down_bytes", "up_bytes", "down_nonzeros", "up_nonzeros", "cum_bytes", "train_loss",
                   "eval")
    ra, rb = rf.read_metrics(full), rf.read_metrics(killed)
    assert [r["round"] for r in rb] == list(range(31))
    assert [{k: r.get(k) for k in ledger_keys} for r in ra] == [{k: r.get(k) for k in ledger_keys} for r in rb]


def test_resume_without_a_checkpoint_says_so(tmp_path, capsys):
    from cellm.interface.cli import main

    (tmp_path / "run").mkdir()
    assert main(["run", "--resume", str(tmp_path / "run")]) == 2
    assert "checkpoint" in capsys.readouterr().err
