"""The exceptions nencache raises.

Every error of a client call is a :class:`Error`; the agent's refusals keep its message and
carry the gRPC status code's name in ``code`` (``"INVALID_ARGUMENT"``, ...).
"""

from __future__ import annotations

import builtins

__all__ = [
    "Error",
    "ConnectionError",
    "Disconnected",
    "Timeout",
    "InvalidArgument",
    "NotFound",
    "ResourceExhausted",
    "NoSpace",
]


class Error(Exception):
    """Base class of nencache's errors.

    Attributes:
        code: the gRPC status code's name when the agent (or the client, checking a request
            before sending it) refused the call, else ``None``.
        outcomes: for a batch of puts that was partly stored before a later part was refused,
            each item's outcome (``"stored"``, ``"exists"``, ``"checksum_mismatch"``) or
            ``None`` when it was not stored; else ``None``.
    """

    code: str | None
    outcomes: list[str | None] | None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        outcomes: list[str | None] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.outcomes = outcomes


class ConnectionError(Error, builtins.ConnectionError):
    """No agent answers on the socket (none runs there, it is starting or restarting, or this
    process may not connect). The message names the socket."""


class Disconnected(ConnectionError):
    """The agent closed the session while the call was under way (it stopped or restarted).
    The next call attaches a new session; values already got stay readable."""


class Timeout(Error, builtins.TimeoutError):
    """The agent did not answer within the client's ``timeout`` (an agent that accepts
    connections but hangs). The call was abandoned; what it obtained is returned."""


class InvalidArgument(Error, ValueError):
    """A request the agent (or the client, before sending it) refuses: a key empty or over
    256 bytes, a value over the agent's ``max_value_len``, metadata over 4 KiB, a bad TTL."""


class NotFound(Error):
    """An unknown, expired or foreign reservation or lease (not a missing key: a get answers
    ``None`` for those)."""


class ResourceExhausted(Error):
    """The agent has no room: no space left after eviction (what remains is leased or
    reserved), or a session's lease, reservation or staging quota is used up."""


NoSpace = ResourceExhausted
