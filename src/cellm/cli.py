"""Entry point of the ``cellm`` command (see :mod:`cellm.interface.cli`)."""

from cellm.interface.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    import sys

    sys.exit(main())
