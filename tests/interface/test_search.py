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
    moves = [s.choice for s in res.steps]
    assert moves[:3] == ["density", "density", "density"]  # 1/64 -> 1/32 -> 1/16 -> 1/8
    assert "rank" in moves[3:]
    for s in res.steps:
        if s.choice in ("rank", "density"):
            picked = next(c for c in s.candidates if c["move"] == s.choice)
            other = [c for c in s.candidates if c["move"] != s.choice]
            assert all(picked["gain_per_byte"] >= o["gain_per_byte"] or not o["fits"] or o["gain"] < 0.005
                       for o in other)


def test_the_search_never_chooses_a_configuration_over_the_budget():
    metric = lambda r, d: 0.5 + 0.1 * math.log2(r * d * 1024)  # noqa: E731  always improving
    evaluate, _ = _stub(metric)
    budget = _bytes(4, 1 / 8)
    res = search(SearchSpec(budget_bytes=budget, start_rank=1, start_density=1 / 64), evaluate, log=lambda *_: None)
    assert res.bytes <= budget
    assert res.steps[-1].choice == "stop: every candidate exceeds the budget"
    for s in res.steps:
        chosen = [c for c in s.candidates if c["move"] == s.choice]
        assert all(c["bytes"] <= budget for c in chosen)


def test_the_search_stops_when_the_metric_stops_improving():
    metric = lambda r, d: min(0.9, 0.6 + 0.1 * math.log2(r * d * 64))  # noqa: E731  flat from r*d >= 8/64
    evaluate, calls = _stub(metric)
    res = search(SearchSpec(budget_bytes=10**12, start_rank=1, start_density=1 / 64, min_gain=0.005), evaluate,
                 log=lambda *_: None)
    assert res.steps[-1].choice.startswith("stop: no candidate within budget improves")
    assert res.metric == pytest.approx(0.9)
    assert len(calls) == len(set(calls))  # nothing evaluated twice


def test_lower_is_better_metrics_such_as_perplexity_are_searched_downwards():
    metric = lambda r, d: 100 - 10 * math.log2(d * 64)  # noqa: E731  only density helps
    evaluate, _ = _stub(metric)
    res = search(SearchSpec(budget_bytes=_bytes(1, 1 / 4), start_density=1 / 64, higher_better=False), evaluate,
                 log=lambda *_: None)
    assert {s.choice for s in res.steps[:-1]} == {"density"} and res.density == 1 / 4


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
