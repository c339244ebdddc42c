import dataclasses
import json

import torch

import cellm
from cellm.runtime import runfolder as rf


def test_a_three_round_tiny_run_writes_a_complete_run_folder(tmp_path, tiny_overrides):
    cfg = cellm.load_config(preset="tiny", overrides=tiny_overrides)
    res = cellm.run(cfg, tmp_path / "run")
    out = tmp_path / "run"
    for name in (rf.CONFIG, rf.METRICS, rf.PLOT, rf.SUMMARY, "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (out / name).exists(), name
    rows = rf.read_metrics(out)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        for key in ("round", "down_bytes", "up_bytes", "down_nonzeros", "up_nonzeros", "cum_bytes",
                    "train_loss", "wall_s"):
            assert key in r
    assert "eval" in rows[0] and "accuracy" in rows[0]["eval"]
    assert rows[0]["train_loss"] is None and rows[1]["train_loss"] > 0
    # cumulative bytes are the running sum of both directions
    running = 0
    for r in rows:
        running += r["down_bytes"] + r["up_bytes"]
        assert r["cum_bytes"] == running
    assert res.totals["down_bytes"] + res.totals["up_bytes"] == rows[-1]["cum_bytes"]
    # every round sends one download per sampled client, and one upload back
    assert all(r["down_messages"] == 3 and r["up_messages"] == 3 for r in rows[1:])
    # the folder's config is the run's, with the thread count resolved to a number
    saved = cellm.load_config(out / rf.CONFIG)
    assert saved == res.config and saved.run.threads >= 1
    assert dataclasses.replace(saved, run=cfg.run) == cfg
    assert json.loads((out / rf.SUMMARY).read_text())["final"] == res.final_eval["accuracy"]


def test_the_same_seed_gives_the_same_run_bit_for_bit(tiny_overrides):
    cfg = cellm.load_config(preset="tiny", overrides=tiny_overrides + ["rounds=2", "model.lora_dropout=0.1"])
    a, b = cellm.run(cfg, save=False), cellm.run(cfg, save=False)
    assert a.adapter.keys() == b.adapter.keys()
    assert all(torch.equal(a.adapter[k], b.adapter[k]) for k in a.adapter)
    strip = [{k: v for k, v in r.items() if k not in ("wall_s", "round_s", "overhead_s", "eval_s")} for r in a.metrics]
    assert strip == [{k: v for k, v in r.items() if k not in ("wall_s", "round_s", "overhead_s", "eval_s")} for r in b.metrics]
    c = cellm.run(cellm.load_config(preset="tiny", overrides=tiny_overrides + ["rounds=2", "seed=1"]), save=False)
    assert any(not torch.equal(a.adapter[k], c.adapter[k]) for k in a.adapter)


def test_sparse_messages_carry_the_configured_number_of_nonzeros(tiny_overrides):
    cfg = cellm.load_config(preset="tiny", overrides=tiny_overrides + ["rounds=2", "comm.down_density=0.25",
                                                                        "comm.up_density=0.125"])
    res = cellm.run(cfg, save=False)
    from cellm.models.flat import FlatView
    from cellm.models.registry import load_model

    n = FlatView(load_model("tiny-bert", lora_rank=4, lora_alpha=8, lora_dropout=0, num_labels=5).model).numel
    for r in res.metrics[1:]:
        assert r["down_nonzeros"] <= 3 * int(n * 0.25)
        assert 0 < r["up_nonzeros"] <= 3 * int(n * 0.125)
    dense = cellm.run(cellm.load_config(preset="tiny", overrides=tiny_overrides + ["rounds=2",
                      "comm.down_density=1.0", "comm.up_density=1.0"]), save=False)
    assert dense.totals["up_bytes"] > 4 * res.totals["up_bytes"]


def test_a_tiny_causal_lm_run_reports_token_accuracy_and_perplexity(tiny_overrides):
    cfg = cellm.load_config(preset="tiny", overrides=tiny_overrides + [
        "rounds=1", "model.name=tiny-llama", "data.name=shakespeare", "data.num_clients=4",
        "fl.clients_per_round=2", "data.max_test_examples=16"])
    res = cellm.run(cfg, save=False)
    ev = res.final_eval
    assert 0 <= ev["token_accuracy"] <= 1 and ev["perplexity"] > 1
