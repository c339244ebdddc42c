"""The GPU checks of tests/gpu/test_gpu.py, run CPU-vs-CPU (bf16 against fp32), so that they are known to work
before a GPU runs them. A few seconds with the tiny setup."""

import dataclasses

import pytest

from gpu.gpu_checks import BF16, FP32, check_placement, compare, observe, save_small_bert


def test_the_gpu_checks_pass_for_a_bf16_cpu_run_against_fp32_and_fail_on_a_changed_byte(tmp_path, cache_dir):
    base_bytes = save_small_bert(tmp_path)
    fp32 = observe("cpu", "fp32", tmp_path, cache_dir, base_bytes)
    bf16 = observe("cpu", "bf16", tmp_path, cache_dir, base_bytes)
    for run in (fp32, bf16):
        check_placement(run)
    compare(fp32, bf16, BF16)

    with pytest.raises(AssertionError, match="ledger totals differ"):
        compare(fp32, dataclasses.replace(bf16, totals={**bf16.totals, "up_bytes": bf16.totals["up_bytes"] + 1}), BF16)
    with pytest.raises(AssertionError, match="fp32 run computed in"):
        check_placement(dataclasses.replace(fp32, linear_dtypes={*fp32.linear_dtypes, *bf16.linear_dtypes}))
    with pytest.raises(AssertionError, match="2 different base models"):
        check_placement(dataclasses.replace(fp32, embedding_storages={*fp32.embedding_storages, 0}))
    with pytest.raises(AssertionError, match="eval loss"):
        shifted = [{**r, "eval": {**r["eval"], "loss": r["eval"]["loss"] + 2 * FP32.loss}} for r in fp32.rows]
        compare(fp32, dataclasses.replace(fp32, rows=shifted), FP32)
