"""The transport's own message kinds: errors, liveness, stream control."""

from __future__ import annotations

from transport.errors import NotAuthorized, RemoteError, StreamClosed, SwarmError
from transport.messages import Message, message


@message("transport.error")
class ErrorReply(Message):
    """The reply to a request that failed; raised at the caller as an exception.

    Attributes:
        error: the class name of the remote exception (``"MalformedMessage"``).
        message: its text.
        retryable: whether retrying (perhaps elsewhere) can help.
    """

    error: str
    message: str
    retryable: bool = False


@message("transport.ping")
class Ping(Message):
    """Liveness and admission check; every endpoint answers with ``Pong``."""


@message("transport.pong")
class Pong(Message):
    """The answer to ``Ping``."""


@message("transport.stream_opened")
class StreamOpened(Message):
    """The server accepted a streaming session; steps may follow."""


@message("transport.stream_close")
class StreamClose(Message):
    """The client ends its streaming session (no reply)."""


# Errors that keep their own class across the wire: the caller's reaction to them
# does not depend on which handler raised them.
_PASS_THROUGH: dict[str, type[SwarmError]] = {"NotAuthorized": NotAuthorized, "StreamClosed": StreamClosed}


def error_reply(error: BaseException) -> ErrorReply:
    """The ``ErrorReply`` that reports ``error`` to the caller."""
    retryable = bool(getattr(error, "retryable", False))
    return ErrorReply(error=type(error).__name__, message=str(error), retryable=retryable)


def raise_error_reply(reply: ErrorReply) -> SwarmError:
    """The exception a caller raises for ``reply`` (returned, to be raised by the caller)."""
    passing = _PASS_THROUGH.get(reply.error)
    if passing is not None:
        return passing(reply.message)
    return RemoteError(reply.error, reply.message, reply.retryable)
