"""Entry point of the ``cellm`` command (see :mod:`cellm.interface.cli`)."""

from cellm.interface.cli import main

__all__ = ["main"]
