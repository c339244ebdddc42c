"""The two exceptions of secure aggregation: bad bytes or bad use (SecAggError) and a round that cannot finish."""

from __future__ import annotations


class SecAggError(ValueError):
    """A message is malformed, truncated, fails authentication, or contradicts the round's state.

    The text names the message and the field or check that failed. A ValueError so that generic handlers keep
    working; a class of its own so that a runtime can drop one party's bad message without catching bugs.
    """


class SecAggAbort(SecAggError):
    """Too few clients are left for the round to finish securely (a neighbourhood fell under the threshold).

    Not a malformed message: the runtime should skip the round's update (or retry it), never fall back to
    reading individual uploads.
    """
