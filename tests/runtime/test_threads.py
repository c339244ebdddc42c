"""A run fixes its torch thread count once, records it, and every later process uses the recorded number."""

import tomllib

import pytest
import torch

import cellm
from cellm.errors import ConfigError
from cellm.runtime.threads import pin_threads, resolve_threads, using_threads


def test_an_explicit_thread_count_wins_over_the_environment():
    assert resolve_threads(3, {"OMP_NUM_THREADS": "1"}) == 3


def test_zero_takes_omp_num_threads_then_torchs_default():
    assert resolve_threads(0, {"OMP_NUM_THREADS": "4"}) == 4
    assert resolve_threads(0, {"OMP_NUM_THREADS": "2,1"}) == 2
    assert resolve_threads(0, {}) == torch.get_num_threads()


@pytest.mark.parametrize("bad", ["0", "-1", "two", " , "])
def test_a_malformed_omp_num_threads_is_an_error_naming_it(bad):
    with pytest.raises(ConfigError, match="OMP_NUM_THREADS"):
        resolve_threads(0, {"OMP_NUM_THREADS": bad})


def test_pinning_records_the_number_in_the_config():
    cfg = cellm.load_config(preset="tiny")
    assert cfg.run.threads == 0
    pinned = pin_threads(cfg, {"OMP_NUM_THREADS": "3"})
    assert pinned.run.threads == 3 and tomllib.loads(pinned.to_toml())["run"]["threads"] == 3
    assert pin_threads(pinned, {"OMP_NUM_THREADS": "1"}) is pinned


def test_negative_threads_are_refused_by_the_config():
    with pytest.raises(ConfigError, match="run.threads"):
        cellm.load_config(preset="tiny", overrides=["run.threads=-1"])


def test_using_threads_restores_the_callers_count():
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    with using_threads(other):
        assert torch.get_num_threads() == other
    assert torch.get_num_threads() == before


def test_a_run_folder_records_the_resolved_thread_count(tmp_path, tiny_overrides, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    cellm.run(cellm.load_config(preset="tiny", overrides=["rounds=1", *tiny_overrides]), tmp_path / "run")
    with open(tmp_path / "run" / "config.toml", "rb") as fh:
        assert tomllib.load(fh)["run"]["threads"] == 1
    assert torch.get_num_threads() == before
