import inspect
import json
import tomllib

import pytest

import cellm
from cellm.interface.compare import Sweep, compare, load_sweep, method_dir, run_sweep
from cellm.interface.report import bytes_to_target, eval_points
from cellm.methods import METHODS
from cellm.runtime import runfolder as rf


def _sweep(cache_dir, methods, rounds=2):
    return Sweep(methods=methods, base_preset="tiny",
                 overrides=[f"data.cache_dir='{cache_dir}'", f"rounds={rounds}", "model.lora_rank=4"],
                 slack=0.5)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_preset_runs_two_rounds(cache_dir, method):
    res = cellm.run(_sweep(cache_dir, [method]).config_for(method), save=False)
    assert [r["round"] for r in res.metrics] == [0, 1, 2]
    assert res.totals["up_bytes"] > 0 and res.totals["down_bytes"] > 0


def test_ffa_lora_never_sends_the_a_matrices(cache_dir):
    s = _sweep(cache_dir, ["dense", "ffa-lora"])
    dense, ffa = (cellm.run(s.config_for(m), save=False) for m in ("dense", "ffa-lora"))
    assert ffa.totals["up_nonzeros"] < dense.totals["up_nonzeros"]
    a_keys = [k for k in ffa.adapter if "lora_A" in k]
    assert a_keys
    # A in the final FFA adapter equals its seeded initialisation (never trained)
    from cellm.models.flat import FlatView
    from cellm.models.registry import load_model

    init = load_model("tiny-bert", lora_rank=4, lora_alpha=8, lora_dropout=0, num_labels=5, seed=0).model
    from peft import get_peft_model_state_dict

    init_sd = get_peft_model_state_dict(init)
    assert all((ffa.adapter[k] == init_sd[k]).all() for k in a_keys)
    assert FlatView(load_model("tiny-bert", lora_rank=4, lora_alpha=8, lora_dropout=0, num_labels=5,
                               freeze_a=True).model).numel < FlatView(init).numel


def test_the_sweep_resumes_without_redoing_finished_methods(tmp_path, cache_dir):
    sweep = _sweep(cache_dir, ["dense", "flasc-1/4"])
    logs = []
    run_sweep(sweep, tmp_path, log=logs.append)
    stamp = (method_dir(tmp_path, "dense") / rf.SUMMARY).stat().st_mtime_ns
    # a third method is added; the two finished ones are kept as they are
    sweep.methods.append("flasc-1/16")
    logs.clear()
    run_sweep(sweep, tmp_path, log=logs.append)
    assert "[dense] already finished: kept" in logs and "[flasc-1/4] already finished: kept" in logs
    assert any(x.startswith("[flasc-1/16] running") for x in logs)
    assert (method_dir(tmp_path, "dense") / rf.SUMMARY).stat().st_mtime_ns == stamp


def test_a_method_cut_short_is_resumed_from_its_checkpoint(tmp_path, cache_dir):
    sweep = _sweep(cache_dir, ["dense"], rounds=3)
    d = method_dir(tmp_path, "dense")
    cfg = sweep.config_for("dense")
    cellm.run(cfg, d)
    full = rf.read_metrics(d)
    (d / rf.SUMMARY).unlink()  # as if killed after the last checkpoint but before the end
    logs = []
    run_sweep(sweep, tmp_path, log=logs.append)
    assert any("resuming" in x for x in logs)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("wall_s", "round_s", "overhead_s", "eval_s")} for r in rows]  # noqa: E731
    assert strip(rf.read_metrics(d)) == strip(full)


def test_the_tables_bytes_to_target_agree_with_the_metrics_files(tmp_path, cache_dir):
    sweep = _sweep(cache_dir, ["dense", "flasc-1/4", "cellm-1/16"], rounds=3)
    table = run_sweep(sweep, tmp_path, log=lambda *_: None)
    report = json.loads((tmp_path / "report.json").read_text())
    target = report["target"]
    dense_final = eval_points(rf.read_metrics(method_dir(tmp_path, "dense")), "accuracy")[-1][2]
    assert target == pytest.approx(dense_final - 0.5)
    for row in report["rows"]:
        rows = rf.read_metrics(method_dir(tmp_path, row["method"]))
        assert row["to_target"] == bytes_to_target(rows, "accuracy", target, True)
        assert row["total_bytes"] == rows[-1]["cum_bytes"]
    assert "| dense |" in table and (tmp_path / "plot.png").exists()


def test_bytes_to_target_is_the_first_evaluated_round_that_reaches_it():
    rows = [{"round": 0, "cum_bytes": 0, "eval": {"accuracy": 0.2}},
            {"round": 1, "cum_bytes": 100},
            {"round": 2, "cum_bytes": 250, "eval": {"accuracy": 0.8}},
            {"round": 3, "cum_bytes": 400, "eval": {"accuracy": 0.9}}]
    assert bytes_to_target(rows, "accuracy", 0.75, True) == 250
    assert bytes_to_target(rows, "accuracy", 0.95, True) is None
    assert bytes_to_target([{"round": 0, "cum_bytes": 0, "eval": {"perplexity": 50.0}},
                            {"round": 1, "cum_bytes": 9, "eval": {"perplexity": 20.0}}], "perplexity", 30.0,
                           False) == 9


def test_a_sweep_file_with_an_unknown_method_or_key_is_refused(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text('base_preset = "tiny"\nmethods = ["dense", "nope"]\n')
    with pytest.raises(cellm.ConfigError, match="unknown method 'nope'"):
        load_sweep(p)
    p.write_text('base_preset = "tiny"\nmethods = ["dense"]\nbogus = 1\n')
    with pytest.raises(cellm.ConfigError, match="unknown sweep key"):
        load_sweep(p)


def _rows(points):
    """Metrics rows with an evaluation at each (cum_bytes, accuracy) point."""
    return [{"round": i, "cum_bytes": b, "eval": {"accuracy": a}} for i, (b, a) in enumerate(points)]


def test_several_seeds_give_mean_sd_and_the_median_bytes_to_a_target_from_the_reference_mean():
    from cellm.interface.report import build_seed_rows, seed_table

    runs = {
        "dense": {0: _rows([(0, 0.2), (100, 0.90), (200, 0.95)]), 1: _rows([(0, 0.2), (100, 0.93), (200, 0.97)]),
                  2: _rows([(0, 0.2), (100, 0.80), (200, 0.96)])},
        "sparse": {0: _rows([(0, 0.2), (5, 0.955), (10, 0.96)]), 1: _rows([(0, 0.2), (5, 0.90), (10, 0.93)]),
                   2: _rows([(0, 0.2), (5, 0.94), (10, 0.951)])},
    }
    target, rows = build_seed_rows(runs, "accuracy", True, "dense", 0.01)
    assert target == pytest.approx((0.95 + 0.97 + 0.96) / 3 - 0.01)  # 0.95
    dense, sparse = rows
    assert dense.mean == pytest.approx(0.96) and dense.sd == pytest.approx(0.01)
    assert dense.to_target == [200, 200, 200] and dense.median_to_target == 200
    assert sparse.to_target == [5, None, 10] and sparse.hits == 2
    assert sparse.median_to_target == 10  # the miss sorts last; the median is the middle seed
    assert sparse.ratio == pytest.approx(20.0)
    runs["sparse"][2] = _rows([(0, 0.2), (5, 0.90)])  # now two of three seeds miss: the median is a miss
    _, rows = build_seed_rows(runs, "accuracy", True, "dense", 0.01)
    assert rows[1].median_to_target is None and rows[1].ratio is None
    assert "| sparse |" in seed_table("t", "accuracy", target, "dense", rows) and "1/3" in seed_table(
        "t", "accuracy", target, "dense", rows)


def test_a_sweep_with_seeds_runs_each_method_once_per_seed(tmp_path, cache_dir):
    sweep = _sweep(cache_dir, ["dense", "flasc-1/4"])
    sweep.seeds = [0, 1]
    table = run_sweep(sweep, tmp_path, log=lambda *_: None)
    for m in sweep.methods:
        seeds = [tomllib.loads((method_dir(tmp_path, m, s) / rf.CONFIG).read_text())["seed"] for s in (0, 1)]
        assert seeds == [0, 1]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["seeds"] == [0, 1] and [r["method"] for r in report["rows"]] == ["dense", "flasc-1/4"]
    assert "mean ± sd" in table


def test_sweep_seeds_must_be_distinct_non_negative_integers(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text('base_preset = "tiny"\nmethods = ["dense"]\nseeds = [0, 0]\n')
    with pytest.raises(cellm.ConfigError, match="seeds"):
        load_sweep(p)


def test_a_sweep_file_that_is_not_toml_is_named(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text("methods = [\n")
    with pytest.raises(cellm.ConfigError, match=f"sweep file {p} is not valid TOML"):
        load_sweep(p)
    with pytest.raises(cellm.ConfigError, match="sweep file not found"):
        load_sweep(tmp_path / "nope.toml")


def test_compare_runs_the_methods_given_and_returns_the_report_it_writes(tmp_path, cache_dir):
    logs = []
    table = compare(["dense"], out=tmp_path, preset="tiny", log=logs.append, slack=0.5,
                    overrides=[f"data.cache_dir='{cache_dir}'", "rounds=1", "model.lora_rank=4"])
    assert table == (tmp_path / "report.md").read_text() and "| dense |" in table
    assert any(x.startswith("[dense] running") for x in logs) and (method_dir(tmp_path, "dense") / rf.SUMMARY).exists()


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"methods": ["dense"], "jobs": 0}, "jobs must be >= 1"),
    ({"methods": []}, "sweep has no methods"),
    ({"methods": ["dense"], "reference": "flasc-1/4"}, "reference 'flasc-1/4' is not among"),
    ({"methods": ["dense"], "sweep": "s.toml"}, "a sweep file names its own methods"),
    ({"methods": ["dense"], "seeds": [1, 1]}, "seeds must be distinct"),
])
def test_compare_refuses_bad_arguments_before_running_anything(tmp_path, kwargs, needle):
    with pytest.raises(cellm.ConfigError, match=needle):
        compare(out=tmp_path / "out", preset="tiny", **kwargs)
    assert not (tmp_path / "out").exists()


def test_the_compare_docstring_documents_every_parameter_the_return_and_the_errors():
    doc = inspect.getdoc(compare)
    args, _, rest = doc.partition("Args:\n")[2].partition("\nReturns:\n")
    assert "\nRaises:\n" in rest and "ConfigError:" in rest
    for name in inspect.signature(compare).parameters:
        assert f"\n    {name}: " in "\n" + args, name


def _recorded(tmp_path, **change):
    report = {"metric": "accuracy", "target": 0.5, "reference": "dense", "seeds": [0, 1],
              "rows": [{"method": "dense", "seeds": [0, 1], "finals": [0.6, 0.5], "total_bytes": 1e6,
                        "to_target": [400, None]}]}
    report.update(change)
    (tmp_path / "old").mkdir(exist_ok=True)
    (tmp_path / "old" / "report.json").write_text(json.dumps(report))
    return report


def test_a_reference_recorded_by_an_earlier_sweep_sets_the_target_and_the_ratios_without_running_again(
        tmp_path, cache_dir):
    _recorded(tmp_path, rows=[{"method": "dense", "seeds": [0, 1, 2], "finals": [0.6, 0.5, 0.55],
                               "total_bytes": 1e6, "to_target": [400, None, 300]}])
    p = tmp_path / "sweep.toml"
    p.write_text(f'base_preset = "tiny"\nmethods = ["flasc-1/4"]\nseeds = [0]\nreference = "dense"\n'
                 f'reference_report = "old/report.json"\nset = ["data.cache_dir=\'{cache_dir}\'", "rounds=2"]\n')
    sweep = load_sweep(p)
    table = run_sweep(sweep, tmp_path / "new", log=lambda *_: None)
    assert not (tmp_path / "new" / "runs" / "dense").exists()  # the reference was not run
    report = json.loads((tmp_path / "new" / "report.json").read_text())
    assert report["target"] == 0.5 and [r["method"] for r in report["rows"]] == ["dense", "flasc-1/4"]
    dense, mine = report["rows"]
    assert dense["median_to_target"] == 400 and dense["finals"] == [0.6, 0.5, 0.55]
    btt = bytes_to_target(rf.read_metrics(method_dir(tmp_path / "new", "flasc-1/4", 0)), "accuracy", 0.5, True)
    assert mine["to_target"] == [btt]
    assert mine["ratio"] == (None if btt is None else pytest.approx(400 / btt))
    assert "| dense |" in table


@pytest.mark.parametrize("change, needle", [
    ({"metric": "perplexity"}, "measures 'perplexity'"),
    ({"rows": []}, "no row for the reference"),
    ({"target": "high"}, "no finite 'target'"),
    ({"rows": [{"method": "dense", "seeds": [0, 1], "finals": [0.6], "total_bytes": 1, "to_target": [1, 2]}]},
     "one per seed"),
    ({"seeds": [5], "rows": [{"method": "dense", "seeds": [5], "finals": [0.6], "total_bytes": 1,
                              "to_target": [1]}]}, "not all among the recorded reference's seeds"),
])
def test_a_bad_reference_report_is_refused_naming_the_file_and_the_problem(tmp_path, change, needle):
    from cellm.interface.compare import check_sweep

    _recorded(tmp_path, **change)
    p = tmp_path / "sweep.toml"
    p.write_text('base_preset = "tiny"\nmethods = ["flasc-1/4"]\nseeds = [0]\nreference_report = "old/report.json"\n')
    with pytest.raises(cellm.ConfigError, match=needle):
        check_sweep(load_sweep(p))
    p.write_text('base_preset = "tiny"\nmethods = ["dense"]\nseeds = [0]\nreference_report = "old/report.json"\n')
    with pytest.raises(cellm.ConfigError, match="do not list it among the methods"):
        check_sweep(load_sweep(p))
