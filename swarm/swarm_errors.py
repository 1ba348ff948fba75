"""Swarm-level errors, as leaves of the one tree in ``transport.errors``.

::

    SwarmError
    ├── RetryableError
    │   ├── NoRouteError           no chain of servers covers the requested blocks (names them)
    │   ├── RecordRejected         no DHT peer accepted a record we published
    │   └── DHTStartError          the DHT node (p2p daemon) did not come up in time
    └── FatalError
        ├── MalformedMessage
        │   └── MalformedRecord    a DHT record that does not parse (readers skip it)
        ├── NotAuthorized          (from transport) missing or wrong private swarm key
        ├── ModelMismatch          a peer's model config differs from ours (names what differs)
        └── ConfigurationError
            ├── InsecureKeyFile    a key file readable by other users
            └── InvalidSpan        a block span like ``4:8`` that does not parse
"""

from __future__ import annotations

from collections.abc import Sequence

from transport.errors import ConfigurationError, FatalError, MalformedMessage, NotAuthorized, RetryableError

__all__ = [
    "DHTStartError",
    "InsecureKeyFile",
    "InvalidSpan",
    "MalformedRecord",
    "ModelMismatch",
    "NoRouteError",
    "NotAuthorized",
    "RecordRejected",
    "format_block_ranges",
]


def format_block_ranges(ranges: Sequence[tuple[int, int]]) -> str:
    """Formats half-open ranges ``[(4, 8)]`` as inclusive text ``"4..7"``.

    Args:
        ranges: half-open ``(start, end)`` pairs.

    Returns:
        A comma-separated list such as ``"4..7, 9"``.
    """
    parts = []
    for start, end in ranges:
        parts.append(str(start) if end - start == 1 else f"{start}..{end - 1}")
    return ", ".join(parts)


class NoRouteError(RetryableError):
    """No chain of eligible servers covers the requested blocks.

    Retryable: servers may join, bans expire, records refresh.

    Attributes:
        uncovered: half-open ``(start, end)`` ranges of blocks that no eligible server covers.
    """

    def __init__(self, uncovered: Sequence[tuple[int, int]], detail: str = ""):
        self.uncovered = [(int(start), int(end)) for start, end in uncovered]
        message = f"no server covers blocks {format_block_ranges(self.uncovered)}"
        if detail:
            message += f" ({detail})"
        super().__init__(message)


class ModelMismatch(FatalError):
    """A peer serves (or asks for) a model whose config differs from ours: the same prompt
    would give other text. The message names what differs when it is known."""


class RecordRejected(RetryableError):
    """No DHT peer accepted a record we published (expired, refused, or nobody reachable)."""


class DHTStartError(RetryableError):
    """The DHT node or its p2p daemon failed to start before its deadline."""


class MalformedRecord(MalformedMessage):
    """A DHT record whose value does not parse; readers log and skip it."""


class InsecureKeyFile(ConfigurationError):
    """A secret key file is readable or writable by other users (run ``chmod 600`` on it)."""


class InvalidSpan(ConfigurationError):
    """A block span such as ``4:8`` that does not parse or lies outside the model."""
