import pytest

from cellm.config import describe_fields, load_config, presets
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
