"""Error types that the CLI turns into a one-line message and exit code 2."""


class CellmError(Exception):
    """Base class for errors caused by the user's input or environment (not bugs)."""


class ConfigError(CellmError):
    """A config field is unknown, of the wrong type, or out of range. The message names the field."""


class AssetError(CellmError):
    """A packaged model or dataset is not installed. The message names the package and how to install it."""
