"""cellm: federated LoRA fine-tuning with sparse, honestly counted communication (CELLM / FLASC).

    import cellm
    cfg = cellm.load_config(preset="demo", overrides=["rounds=5"])
    result = cellm.run(cfg, out="runs/try")
    print(result.final_eval, result.totals)

Attributes are imported lazily so that ``import cellm.core`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
_EXPORTS = {
    "AssetError": "cellm.errors", "CellmError": "cellm.errors", "ConfigError": "cellm.errors",
    "CellmConfig": "cellm.config", "load_config": "cellm.config",
    "RunResult": "cellm.interface.api", "run": "cellm.interface.api", "resume": "cellm.interface.api",
    "compare": "cellm.interface.compare",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cellm' has no attribute {name!r}")
