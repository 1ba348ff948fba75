"""The one exception tree of Swarm.

Every error a Swarm component raises on purpose derives from ``SwarmError``. Each
class says whether retrying (possibly on another peer) can help::

    SwarmError
    ├── RetryableError                 retry, perhaps elsewhere
    │   ├── DeadlineExceeded           a call did not finish before its deadline
    │   │   └── HandshakeTimeout       the encrypted connection never came up (wrong server key?)
    │   ├── PeerUnavailable            the peer is gone, closed, or refused the connection
    │   │   └── StreamClosed           the streaming session ended (closed, expired, handler finished)
    │   └── ServerBusy                 the peer is alive but out of capacity (cache budget, queue)
    └── FatalError                     retrying the same request cannot help
        ├── MalformedMessage           bytes that are not a valid message of this protocol
        │   ├── UnknownMessageKind
        │   └── ProtocolVersionMismatch
        ├── MessageTooLarge            a size, frame or element limit was exceeded
        ├── NotAuthorized              the peer refused us admission (missing or wrong swarm key)
        ├── RemoteError                the peer answered with an error (carries its class name)
        └── ConfigurationError         a local setting is invalid (names the flag to change)

Higher layers add their own leaves (e.g. ``swarm.swarm_errors.NoRouteError``) under these.
"""

from __future__ import annotations


class SwarmError(Exception):
    """Root of every error Swarm raises on purpose."""

    retryable: bool = False


class RetryableError(SwarmError):
    """Transient: the same request may succeed later or on another peer."""

    retryable = True


class FatalError(SwarmError):
    """Permanent for this request: retrying it unchanged cannot succeed."""

    retryable = False


class DeadlineExceeded(RetryableError):
    """A network operation did not complete before its deadline."""


class HandshakeTimeout(DeadlineExceeded):
    """The encrypted (CURVE) connection to a peer never completed.

    ZeroMQ fails a CURVE handshake with a wrong server key silently; we report it as
    this error once the connect deadline passes.
    """


class PeerUnavailable(RetryableError):
    """The peer is unreachable, has closed the connection, or is shutting down."""


class StreamClosed(PeerUnavailable):
    """The streaming session is gone: closed by either side, expired while idle, or its
    server-side handler finished. Open a new session (perhaps elsewhere) and replay."""


class ServerBusy(RetryableError):
    """The peer is alive but cannot take this request now (e.g. cache budget full)."""


class MalformedMessage(FatalError):
    """Bytes that do not form a valid message: bad envelope, wrong types, bad sizes."""


class UnknownMessageKind(MalformedMessage):
    """The envelope names a message kind this peer does not know."""


class ProtocolVersionMismatch(MalformedMessage):
    """The envelope carries a protocol version this peer cannot speak."""


class MessageTooLarge(FatalError):
    """A message exceeds a configured limit (bytes, frames or tensor elements)."""


class NotAuthorized(FatalError):
    """The peer refused admission: this private swarm requires a swarm key we lack or got wrong."""


class ConfigurationError(FatalError, ValueError):
    """A local setting is invalid; the message names the flag or field to change."""


class RemoteError(FatalError):
    """The remote peer answered the request with an error.

    Attributes:
        kind: the remote error's class name (e.g. ``"MalformedMessage"``).
        retryable: copied from the remote error, so callers can decide to retry elsewhere.
    """

    def __init__(self, kind: str, message: str, retryable: bool = False):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
        self.retryable = retryable
