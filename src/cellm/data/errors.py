"""Data-layer errors: user-fixable (a CellmError, so the CLI prints one line) and also a ValueError."""

from cellm.errors import ConfigError


class DataConfigError(ConfigError, ValueError):
    """The requested split cannot be built from the data (too many clients, too large min_client_size, ...).

    It subclasses ValueError as well so callers outside the CLI can catch it the ordinary way.
    """


def first_line(exc: BaseException) -> str:
    """The first line of a library's error message (or its type's name): enough for a one-line error of ours."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
