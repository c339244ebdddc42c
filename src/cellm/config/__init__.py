"""One config tree of dataclasses: loaded from TOML, overridden with ``key=value``, validated once.

By concern: :mod:`~cellm.config.schema` (the fields: defaults, help, admitted values; ``cellm config --fields``
prints it), :mod:`~cellm.config.load` (presets, TOML files, ``--set``), :mod:`~cellm.config.validation` (declared
choices and bounds, then the rules that tie fields together) and :mod:`~cellm.config.derived` (what the other
layers read off a config). Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` naming the
field and the fix. This module is the public surface: import from it.
"""

from cellm.config.derived import file_spec, known_clients, model_label, task_of, with_clients
from cellm.config.load import PRESET_DIR, load_config, merge, preset_dict, presets, read_toml
from cellm.config.schema import (
    VALUE_CODECS,
    CellmConfig,
    ClientConfig,
    CommConfig,
    DataConfig,
    DPConfig,
    EvalConfig,
    FaultsConfig,
    FLConfig,
    HeteroConfig,
    ModelConfig,
    RobustConfig,
    RunConfig,
    SecAggConfig,
    ServerConfig,
    SLoRAConfig,
    describe_fields,
)
from cellm.config.validation import validate

__all__ = [
    "PRESET_DIR", "VALUE_CODECS", "CellmConfig", "ClientConfig", "CommConfig", "DPConfig", "DataConfig",
    "EvalConfig", "FLConfig", "FaultsConfig", "HeteroConfig", "ModelConfig", "RobustConfig", "RunConfig",
    "SLoRAConfig", "SecAggConfig", "ServerConfig", "describe_fields", "file_spec", "known_clients", "load_config",
    "merge", "model_label", "preset_dict", "presets", "read_toml", "task_of", "validate", "with_clients",
]
