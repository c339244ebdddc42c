import math

import pytest

import cellm
from cellm.interface.cli import main
from cellm.interface.search import SearchSpec, search


def _bytes(rank, d):
    return int(1e6 * rank * d)


def _stub(metric):
    calls = []

    def evaluate(points):
        calls.extend(points)
        return [(metric(r, d), _bytes(r, d)) for r, d in points]

    return evaluate, calls


def test_the_search_raises_whichever_of_rank_or_density_gains_more_metric_per_byte():
    # density helps a lot until 1/8; rank helps a little all along
    metric = lambda r, d: 0.5 + 0.3 * min(d, 1 / 8) * 8 + 0.01 * math.log2(r)  # noqa: E731
    evaluate, _ = _stub(metric)
    res = search(SearchSpec(budget_bytes=10**9, start_rank=1, start_density=1 / 64, min_gain=0.005), evaluate,
                 log=lambda *_: None)
    moves = [s.choice.split(";")[0] for s in res.steps]
    assert moves[:3] == ["density", "density", "density"]  # 1/64 -> 1/32 -> 1/16 -> 1/8
    assert "rank" in moves[3:]
    for s in res.steps:
        picked = [c for c in s.candidates if c["move"] == s.choice.split(";")[0]]
        if picked:
            assert all(picked[0]["gain_per_byte"] >= o["gain_per_byte"] for o in s.candidates if o["fits"])


def test_the_search_never_moves_to_a_configuration_over_the_budget():
    metric = lambda r, d: 0.5 + 0.1 * math.log2(r * d * 1024)  # noqa: E731  always improving
    evaluate, _ = _stub(metric)
    budget = _bytes(4, 1 / 8)
    res = search(SearchSpec(budget_bytes=budget, start_rank=1, start_density=1 / 64), evaluate, log=lambda *_: None)
    assert res.bytes <= budget
    assert res.steps[-1].choice == "stop: every candidate exceeds the budget"
    for s in res.steps:
        chosen = [c for c in s.candidates if c["move"] == s.choice.split(";")[0]]
        assert all(c["bytes"] <= budget for c in chosen)


def test_the_search_stops_after_patience_steps_without_improvement_and_keeps_the_best():
    metric = lambda r, d: min(0.9, 0.6 + 0.1 * math.log2(r * d * 64))  # noqa: E731  flat from r*d >= 8/64
    evaluate, calls = _stub(metric)
    res = search(SearchSpec(budget_bytes=10**12, start_rank=1, start_density=1 / 64, min_gain=0.005, patience=2),
                 evaluate, log=lambda *_: None)
    assert "stop: 2 steps without a gain" in res.steps[-1].choice
    assert res.metric == pytest.approx(0.9)
    assert res.rank * res.density == pytest.approx(8 / 64)  # the first (cheapest) point that reached 0.9
    assert len(calls) == len(set(calls))  # nothing evaluated twice


def test_one_noisy_step_down_does_not_end_the_search():
    table = {(1, 1 / 64): 0.40, (2, 1 / 64): 0.38, (1, 1 / 32): 0.39, (2, 1 / 32): 0.70, (1, 1 / 16): 0.60}
    metric = lambda r, d: table.get((r, d), 0.5)  # noqa: E731
    evaluate, _ = _stub(metric)
    res = search(SearchSpec(budget_bytes=10**12, start_rank=1, start_density=1 / 64, patience=2, max_steps=3),
                 evaluate, log=lambda *_: None)
    assert res.metric == pytest.approx(0.70) and (res.rank, res.density) == (2, 1 / 32)


def test_lower_is_better_metrics_such_as_perplexity_are_searched_downwards():
    metric = lambda r, d: 100 - 10 * math.log2(d * 64)  # noqa: E731  only density helps
    evaluate, _ = _stub(metric)
    res = search(SearchSpec(budget_bytes=_bytes(1, 1 / 4), start_density=1 / 64, higher_better=False), evaluate,
                 log=lambda *_: None)
    assert res.density == 1 / 4 and res.rank == 1


def test_a_real_short_search_writes_a_config_that_cellm_run_accepts(tmp_path, cache_dir, capsys):
    out = tmp_path / "search"
    args = ["search", "--preset", "tiny", "--set", f"data.cache_dir='{cache_dir}'", "--budget", "3e4",
            "--short-rounds", "1", "--start-rank", "1", "--start-density", "0.25", "--max-rank", "2",
            "--min-gain", "-1", "--out", str(out)]
    assert main(args) == 0
    assert (out / "search.md").exists() and (out / "chosen.toml").exists()
    first = capsys.readouterr().out
    # a repeated search reuses every finished short run
    assert main(args) == 0
    assert "already finished: kept" in capsys.readouterr().out
    assert "chosen:" in first
    run_out = tmp_path / "run"
    assert main(["run", "--config", str(out / "chosen.toml"), "--set", "rounds=1", "--out", str(run_out),
                 "--no-progress"]) == 0
    assert cellm.load_config(run_out / "config.toml").rounds == 1
