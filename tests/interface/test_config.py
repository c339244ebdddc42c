import dataclasses
from pathlib import Path

import pytest

import cellm.config
from cellm.config import (
    CellmConfig,
    describe_fields,
    known_clients,
    load_config,
    preset_dict,
    presets,
    read_toml,
    with_clients,
)
from cellm.core.codec.spec import POSITION_CHOICES, VALUE_CHOICES
from cellm.core.robust import RULES
from cellm.data import DATASETS
from cellm.data.files import HOLDOUTS, PARTITIONS
from cellm.errors import ConfigError


def test_no_arguments_gives_the_demo_preset():
    cfg = load_config()
    assert cfg.model.name == "minilm-l6" and cfg.data.name == "bbc"


def test_every_preset_loads_and_validates():
    names = presets()
    assert {"demo", "minilm-l6-bbc", "smollm2-135m-shakespeare", "smollm2-135m-chitchat", "tiny"} <= set(names)
    for name in names:
        load_config(preset=name)


def test_overrides_are_typed_from_toml_and_bare_words_are_strings():
    cfg = load_config(preset="tiny", overrides=["comm.up_density=0.125", "data.name=bbc", "seed=7",
                                                 "model.target_modules=['query']"])
    assert cfg.comm.up_density == 0.125 and cfg.seed == 7 and cfg.model.target_modules == ["query"]


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("fl.bogus=1", "unknown config key 'fl.bogus'"),
        ("nosuch.table=1", "unknown config key 'nosuch'"),
        ("rounds='ten'", "'rounds' must be int"),
        ("comm.up_density=0", "'comm.up_density' must be in (0, 1]"),
        ("comm.down_density=1.5", "'comm.down_density' must be in (0, 1]"),
        ("model.lora_rank=0", "'model.lora_rank' must be >= 1"),
        ("fl.clients_per_round=11", "'fl.clients_per_round' (11) must not exceed data.num_clients (10)"),
        ("model.name=gpt9", "'model.name' must be one of"),
        ("data.name=shakespeare", "'data.name'"),
        ("fl.aggregation=median", "'fl.aggregation' must be one of mean, weighted"),
        ("comm.error_feedback_up=1", "'comm.error_feedback_up' must be bool"),
        ("justakey", "--set expects key=value"),
    ],
)
def test_bad_config_values_raise_one_error_naming_the_field(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config(preset="tiny", overrides=[override])
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_config_round_trips_through_toml(tmp_path):
    cfg = load_config(preset="tiny", overrides=["comm.codec_up='int8'"])
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert load_config(path) == cfg


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_every_field_has_help():
    rows = describe_fields()
    assert len(rows) > 40
    assert all(help_ for _, _, help_ in rows)


def test_invalid_toml_is_a_config_error_naming_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("rounds = = 3\n")
    with pytest.raises(ConfigError, match=f"config file {path} is not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match=f"sweep file {path} is not valid TOML"):
        read_toml(path, "sweep")


def _meta(table: type, name: str) -> dict:
    return next(f.metadata for f in dataclasses.fields(table) if f.name == name)


def test_choice_lists_are_their_owners_objects_not_copies():
    c = cellm.config
    assert _meta(c.CommConfig, "codec_down")["choices"] is VALUE_CHOICES
    assert _meta(c.CommConfig, "codec_up")["choices"] is VALUE_CHOICES
    assert _meta(c.SLoRAConfig, "codec")["choices"] is VALUE_CHOICES and c.VALUE_CODECS is VALUE_CHOICES
    assert _meta(c.CommConfig, "positions")["choices"] is POSITION_CHOICES
    assert _meta(c.RobustConfig, "aggregator")["choices"] is RULES
    assert _meta(c.DataConfig, "partition")["choices"] is PARTITIONS
    assert _meta(c.DataConfig, "holdout")["choices"] is HOLDOUTS
    assert _meta(c.DataConfig, "name")["choices"] == tuple(DATASETS)


def test_no_source_line_of_the_config_package_is_longer_than_120_characters():
    root = Path(cellm.config.__file__).parent
    long = [f"{p.name}:{i}" for p in sorted(root.glob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if len(line) > 120]
    assert not long


def test_wrapped_help_texts_join_with_single_spaces():
    assert not [key for key, _, help_ in describe_fields() if "  " in help_ or help_ != help_.strip()]


def test_presets_are_found_in_the_package_data_folder():
    assert cellm.config.PRESET_DIR == Path(cellm.config.__file__).parent.parent / "presets"
    assert {p.stem for p in cellm.config.PRESET_DIR.glob("*.toml")} == set(presets())


# ---------------------------------------------------------------- data.num_clients = 0 (auto)

def test_num_clients_defaults_to_auto_and_every_preset_names_its_own_number():
    assert CellmConfig().data.num_clients == 0
    for name in presets():
        assert preset_dict(name)["data"]["num_clients"] > 0, name
        assert load_config(preset=name).data.num_clients == preset_dict(name)["data"]["num_clients"]


def _files_natural(**data) -> dict:
    return {"model": {"name": "tiny-llama"}, "fl": {"clients_per_round": 500},
            "data": {"name": "files", "path": "users.jsonl", "text_column": "text", "client_column": "user", **data}}


def test_files_with_a_natural_partition_get_every_usable_client_by_default_checked_once_loaded():
    cfg = load_config(data=_files_natural())  # no preset: the fields' defaults
    assert cfg.data.num_clients == 0 and known_clients(cfg) is None
    with pytest.raises(ConfigError, match=r"'fl.clients_per_round' \(500\) must not exceed data.num_clients \(12\)"):
        load_config(data=_files_natural(num_clients=12))


@pytest.mark.parametrize("data", [{"name": "bbc"}, {"name": "files", "path": "x.csv", "text_column": "text",
                                                       "label_column": "label", "partition": "dirichlet"}])
def test_auto_clients_where_the_data_names_none_are_50_and_checked_against_clients_per_round(data):
    base = {"model": {"name": "tiny-bert"}, "data": {**data, "num_clients": 0}}
    assert known_clients(load_config(data={**base, "fl": {"clients_per_round": 50}})) == 50
    with pytest.raises(ConfigError, match="'fl.clients_per_round' \\(51\\) must not exceed the 50 clients that "
                                          "data.num_clients = 0 \\(auto\\) loads"):
        load_config(data={**base, "fl": {"clients_per_round": 51}})


def test_with_clients_writes_back_what_0_resolved_to_and_nothing_else():
    cfg = load_config(data=_files_natural(), overrides=["fl.clients_per_round=5"])
    resolved = with_clients(cfg, 12)
    assert resolved.data.num_clients == 12 and resolved.data.client_column == "user"
    assert dataclasses.replace(resolved, data=cfg.data) == cfg
    assert load_config(data=resolved.to_dict()) == resolved  # a valid config: the run folder's config.toml
    assert with_clients(resolved, 12) is resolved
    with pytest.raises(ValueError, match="only 0"):
        with_clients(resolved, 11)
    with pytest.raises(ConfigError, match="fl.clients_per_round"):
        with_clients(cfg, 4)


def test_every_name_other_modules_import_from_the_config_package_is_there():
    names = {"CellmConfig", "describe_fields", "file_spec", "load_config", "model_label", "presets",
             "task_of", "validate", "merge", "preset_dict", "read_toml", "with_clients", "PRESET_DIR",
             "VALUE_CODECS"}
    assert names <= set(cellm.config.__all__) and all(hasattr(cellm.config, n) for n in cellm.config.__all__)


def test_a_rotated_codec_with_a_block_that_is_not_a_power_of_two_is_refused_at_load():
    with pytest.raises(ConfigError, match=r"'comm\.int8_block' \(100\) must be a power of two with comm\.codec_up"):
        load_config(preset="tiny", overrides=["comm.codec_up=rot3", "comm.int8_block=100"])
    assert load_config(preset="tiny", overrides=["comm.codec_up=rot3", "comm.int8_block=128"]).comm.int8_block == 128


def test_the_cellm_lean_bbc_preset_is_its_method_over_the_minilm_bbc_preset():
    from cellm.methods import method_overrides

    base = load_config(preset="minilm-l6-bbc")
    method = load_config(preset="minilm-l6-bbc", overrides=method_overrides("rank1-rot3-rot2-s2", base))
    assert load_config(preset="cellm-lean-bbc").to_toml() == method.to_toml()
