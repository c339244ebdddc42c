"""cellm on Flower: a ServerApp that runs cellm's server round and a ClientApp that runs cellm's client update.

Install with ``pip install 'cellm[flower]'``. Entry points: ``cellm flower sim`` (Flower's simulation runtime),
``cellm flower run`` (a SuperLink with SuperNodes), the Flower app folder ``cellm flower app-dir`` (for
``flwr run``). See docs/flower.md. Importing this package needs ``flwr``; ``cellm`` itself does not.
"""

from __future__ import annotations

from pathlib import Path

APP_DIR = Path(__file__).parent / "app"  # the Flower app (pyproject.toml) that `flwr run` builds into a FAB

__all__ = ["APP_DIR"]
