"""Value objects that configure an endpoint: size limits and timeouts.

Both are frozen dataclasses with defaults; invalid values raise ``ConfigurationError``
naming the field to change.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from transport.errors import ConfigurationError

PROTOCOL_VERSION = 1
"""Wire protocol version carried in every envelope; bumped on incompatible changes."""


def _check_positive(obj: object) -> None:
    for item in fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, item.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigurationError(
                f"{type(obj).__name__}.{item.name} must be a positive number, got {value!r}"
            )


@dataclass(frozen=True)
class Limits:
    """What an endpoint accepts from the network. Anything beyond gets an error reply.

    Attributes:
        max_message_bytes: total bytes of one message, all frames together. Also set as
            ZeroMQ's MAXMSGSIZE (per frame), so a peer sending a bigger frame is
            disconnected before the frame is buffered. 256 MiB fits a 16 M-parameter fp32
            part with room to spare.
        max_envelope_bytes: bytes of the msgpack envelope (frame 0).
        max_frames: frames in one message (envelope + tensor buffers).
        max_tensor_elements: elements of one tensor, checked before any allocation.
        max_tensor_dims: dimensions of one tensor.
        max_sessions: concurrent streaming sessions one endpoint serves.
        max_sessions_per_peer: of those, what one peer (one CURVE key) may hold, so one
            client cannot fill the session table.
        max_stream_backlog: steps queued in one session before ``ServerBusy``.
        max_pending_requests: unary requests one endpoint runs at once before ``ServerBusy``.
        max_inflight_bytes_per_peer: bytes of one peer's unary requests being handled at
            once before ``ServerBusy`` (pushes into its own session cannot pile up).
    """

    max_message_bytes: int = 256 * 2**20
    max_envelope_bytes: int = 2**20
    max_frames: int = 256
    max_tensor_elements: int = 2**28
    max_tensor_dims: int = 16
    max_sessions: int = 1024
    max_sessions_per_peer: int = 256
    max_stream_backlog: int = 64
    max_pending_requests: int = 4096
    max_inflight_bytes_per_peer: int = 512 * 2**20

    def __post_init__(self) -> None:
        _check_positive(self)


@dataclass(frozen=True)
class Timeouts:
    """Deadlines in seconds, each named after what it bounds.

    Attributes:
        connect: TCP connect plus the CURVE handshake plus the admission hello; past it
            ``connect`` raises ``HandshakeTimeout`` (or ``PeerUnavailable`` if no TCP
            connection was ever made).
        request: one request's round trip (send, remote handler, reply); also one
            streaming step and a stream's opening. Overridable per call.
        stream_idle: the server ends a streaming session after this long without a step
            (the client vanished without closing it).
    """

    connect: float = 10.0
    request: float = 30.0
    stream_idle: float = 60.0

    def __post_init__(self) -> None:
        _check_positive(self)
