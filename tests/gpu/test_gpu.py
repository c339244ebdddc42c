"""The CUDA path (``run.device = cuda``, ``run.precision`` fp32 / bf16) against the same run on CPU.

Run on a machine with a GPU:  .venv/bin/pytest -m gpu tests/gpu -rs   (well under a minute)

Each GPU run must send the same bytes and nonzeros as the CPU run (round by round), stay within a tolerance of
its metrics (tests/gpu/gpu_checks.py says why each tolerance is what it is), keep one base model on the GPU and
everything federated (flat vectors, server and client state, the returned adapter) on CPU.
"""

import pytest
import torch

from gpu.gpu_checks import BF16, FP32, check_placement, compare, observe, save_small_bert

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda.is_available() is False"),
]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """(folder, parameter bytes) of a small BERT; wide enough (~90 MB) that a second copy of it on the GPU
    stands out above the allocator's rounding and the cuBLAS workspaces."""
    folder = tmp_path_factory.mktemp("gpu-bert")
    return folder, save_small_bert(folder, hidden=512, intermediate=1024, heads=8)


@pytest.fixture(scope="module")
def on_cpu(bert, cache_dir):
    run = observe("cpu", "fp32", bert[0], cache_dir, bert[1])
    check_placement(run)
    return run


@pytest.mark.parametrize(("precision", "tol"), [("fp32", FP32), ("bf16", BF16)])
def test_a_gpu_run_sends_the_cpu_runs_bytes_and_tracks_its_metrics_with_one_model_on_the_gpu(
        bert, cache_dir, on_cpu, precision, tol):
    on_gpu = observe("cuda", precision, bert[0], cache_dir, bert[1])
    check_placement(on_gpu)
    compare(on_cpu, on_gpu, tol)
