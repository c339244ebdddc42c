import math

import cellm
from cellm.core.dp import epsilon
from cellm.models.flat import FlatView
from cellm.models.registry import load_model


def _n():
    return FlatView(load_model("tiny-bert", lora_rank=4, lora_alpha=8, lora_dropout=0, num_labels=5).model).numel


def test_each_density_tier_respects_its_own_density_in_the_ledger(cache_dir):
    cfg = cellm.load_config(preset="tiny", overrides=[
        f"data.cache_dir='{cache_dir}'", "rounds=3", "hetero.mode=density", "comm.down_density=1.0",
        "comm.up_density=1.0", "fl.clients_per_round=6"])
    res = cellm.run(cfg, save=False)
    n = _n()
    seen = set()
    for r in res.metrics[1:]:
        for tier in range(3):
            d = 4.0 ** -(2 - tier)
            k = n if d == 1 else math.floor(n * d)
            ups = [c for c in r["clients"] if c % 3 == tier]
            if not ups:
                continue
            seen.add(tier)
            assert r[f"tier.{tier}.up_nonzeros"] <= len(ups) * k
            assert r[f"tier.{tier}.down_nonzeros"] <= len(ups) * k
        assert "tier0.accuracy" in res.final_eval and "tier2.accuracy" in res.final_eval
    assert seen == {0, 1, 2}
    assert res.metrics[-1].get("tier.0.up_bytes", 0) < res.metrics[-1].get("tier.2.up_bytes", 1)


def test_rank_tiers_send_only_their_ranks(cache_dir):
    cfg = cellm.load_config(preset="tiny", overrides=[
        f"data.cache_dir='{cache_dir}'", "rounds=2", "hetero.mode=rank", "hetero.num_tiers=2",
        "comm.down_density=1.0", "comm.up_density=1.0", "fl.clients_per_round=6"])
    res = cellm.run(cfg, save=False)
    r = res.metrics[1]
    per0 = r["tier.0.up_nonzeros"] / sum(1 for c in r["clients"] if c % 2 == 0)
    per1 = r["tier.1.up_nonzeros"] / sum(1 for c in r["clients"] if c % 2 == 1)
    assert per0 < per1


def test_a_dp_run_reports_the_accountants_epsilon_each_round(cache_dir):
    cfg = cellm.load_config(preset="tiny", overrides=[
        f"data.cache_dir='{cache_dir}'", "rounds=2", "dp.noise_multiplier=1.0", "dp.clip_norm=0.5"])
    res = cellm.run(cfg, save=False)
    for r in res.metrics[1:]:
        assert r["epsilon"] == epsilon(1.0, 3 / 10, r["round"], 1e-5)
