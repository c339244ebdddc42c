"""Checkpoints are data: a crafted file never runs code, whatever name it has; a refusal names the file."""

import os

import pytest
import torch

import cellm
from cellm.errors import ConfigError
from cellm.interface.cli import main
from cellm.runtime import runfolder as rf

MARKER = "cellm-pwned-marker"


class _Exploit:
    """Unpickling this runs code (writes a marker file): what a crafted checkpoint would do."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def finished_run(tmp_path, cache_dir):
    out = tmp_path / "run"
    cellm.run(cellm.load_config(preset="tiny", overrides=[f"data.cache_dir='{cache_dir}'", "rounds=2"]), out)
    (out / rf.SUMMARY).unlink()
    return out


@pytest.mark.parametrize("name", [rf.LEGACY_CHECKPOINT, rf.CHECKPOINT])
def test_a_crafted_pickle_checkpoint_is_refused_without_running_it(finished_run, tmp_path, name, capsys):
    marker = tmp_path / MARKER
    (finished_run / rf.CHECKPOINT).unlink()
    with open(finished_run / name, "wb") as fh:
        torch.save({"server": _Exploit(str(marker))}, fh)
    with pytest.raises(ConfigError) as err:
        cellm.resume(finished_run)
    assert not marker.exists()
    msg = str(err.value)
    assert "\n" not in msg and str(finished_run / name) in msg
    assert main(["run", "--resume", str(finished_run), "--no-progress"]) == 2  # the CLI: exit 2, one line
    assert str(finished_run / name) in capsys.readouterr().err
    assert not marker.exists()


def test_a_checkpoint_round_trips_int_keys_tuples_and_tensors(tmp_path):
    state = {"opt": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4)}},
                     "param_groups": [{"betas": (0.9, 0.999), "params": [0], "lr": 0.01, "foreach": None}]},
             "mask": torch.tensor([True, False]), "metrics": [{"round": 1, "eval": {"accuracy": 0.5}}],
             "weird": {"__tensor__": "not a reference"}}
    rf.save_checkpoint(tmp_path, state)
    back = rf.load_checkpoint(tmp_path)
    assert list(back["opt"]["state"]) == [0] and back["opt"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(back["opt"]["state"][0]["exp_avg"], state["opt"]["state"][0]["exp_avg"])
    assert back["mask"].dtype == torch.bool and back["metrics"] == state["metrics"]
    assert back["weird"] == state["weird"]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_a_torn_checkpoint_is_refused_and_named(finished_run):
    path = finished_run / rf.CHECKPOINT
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ConfigError, match=str(path)):
        cellm.resume(finished_run)
