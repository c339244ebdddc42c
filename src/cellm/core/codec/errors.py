"""The one exception a decoder may raise: anything wrong with received bytes is a CodecError."""

from __future__ import annotations


class CodecError(ValueError):
    """A message is malformed, truncated, over a limit, or fails its checksum. The text says which check failed.

    A ValueError so that callers that treat bad input generically keep working; a class of its own so that a
    receiver can drop one bad upload without catching programming errors.
    """


class CodecInternalError(CodecError):
    """A decoder bug caught by the last-resort guard in ``decode``.

    Still a CodecError for callers (a bad upload must never crash a server), but a distinct type so that the
    fuzz harness can count it as a failure instead of a correct rejection.
    """
