"""How bytes move: typed wire messages, tensor frames, codecs, ZeroMQ RPC."""

from transport.errors import (
    ConfigurationError,
    DeadlineExceeded,
    FatalError,
    HandshakeTimeout,
    MalformedMessage,
    MessageTooLarge,
    PeerUnavailable,
    ProtocolVersionMismatch,
    RemoteError,
    RetryableError,
    ServerBusy,
    SwarmError,
    UnknownMessageKind,
)

__all__ = [
    "ConfigurationError",
    "DeadlineExceeded",
    "FatalError",
    "HandshakeTimeout",
    "MalformedMessage",
    "MessageTooLarge",
    "PeerUnavailable",
    "ProtocolVersionMismatch",
    "RemoteError",
    "RetryableError",
    "ServerBusy",
    "SwarmError",
    "UnknownMessageKind",
]
