"""How bytes move: typed wire messages, tensor frames, codecs, ZeroMQ and libp2p RPC.

Public surface (everything else is private to the package)::

    @message(kind) / Message / MessageRegistry      declare wire message kinds
    RequestId, SessionId, PeerKey                    distinct id types
    RawCodec, Float16Codec, BFloat16Codec,
    Int8BlockwiseCodec, FourBitBlockwiseCodec,
    CodedTensor, EncodedTensor, WIRE_FORMATS, wire_codec, coded
                                                     tensor codecs, formats by name
    Endpoint (ZeroMQ) / Libp2pEndpoint (hivemind's p2p daemon, for peers behind NAT)
    / MemoryEndpoint + MemoryNetwork
    Connection, ClientStream, ServerStream, RequestContext
    KeyPair, Limits, Timeouts                        configuration values
    EmulatedLink                                     a slow link emulated inside the transport
                                                     (benchmarks and tests: SWARM_EMULATE_LINK)
    the error tree of ``transport.errors``
"""

from transport.client import ClientStream, Connection
from transport.codecs import (
    WIRE_FORMATS,
    BFloat16Codec,
    CodedTensor,
    EncodedTensor,
    Float16Codec,
    FourBitBlockwiseCodec,
    Int8BlockwiseCodec,
    RawCodec,
    coded,
    wire_codec,
)
from transport.control import ErrorReply, Ping, Pong
from transport.curve import KeyPair, admission_token
from transport.dispatch import RequestContext
from transport.endpoint import BaseEndpoint
from transport.errors import (
    ConfigurationError,
    DeadlineExceeded,
    FatalError,
    HandshakeTimeout,
    MalformedMessage,
    MessageTooLarge,
    NotAuthorized,
    PeerUnavailable,
    ProtocolVersionMismatch,
    RemoteError,
    RetryableError,
    ServerBusy,
    StreamClosed,
    SwarmError,
    UnknownMessageKind,
)
from transport.limits import PROTOCOL_VERSION, Limits, Timeouts
from transport.link_emulation import EmulatedLink
from transport.memory import MemoryEndpoint, MemoryNetwork
from transport.messages import (
    DEFAULT_REGISTRY,
    Message,
    MessageRegistry,
    PeerKey,
    RequestId,
    SessionId,
    decode_body,
    decode_envelope,
    encode_message,
    message,
)
from transport.streams import ServerStream
from transport.zmq_endpoint import Endpoint


def __getattr__(name: str) -> object:
    # imported on first use: the libp2p endpoint pulls in hivemind, which ZeroMQ-only
    # users (and every import of ``transport``) should not pay for
    if name in ("Libp2pEndpoint", "DATA_PROTOCOL"):
        from transport import libp2p_endpoint

        return getattr(libp2p_endpoint, name)
    raise AttributeError(f"module 'transport' has no attribute {name!r}")


__all__ = [
    "DEFAULT_REGISTRY",
    "PROTOCOL_VERSION",
    "WIRE_FORMATS",
    "BFloat16Codec",
    "BaseEndpoint",
    "ClientStream",
    "CodedTensor",
    "ConfigurationError",
    "Connection",
    "DeadlineExceeded",
    "EmulatedLink",
    "EncodedTensor",
    "Endpoint",
    "ErrorReply",
    "FatalError",
    "Float16Codec",
    "FourBitBlockwiseCodec",
    "HandshakeTimeout",
    "Int8BlockwiseCodec",
    "KeyPair",
    "Libp2pEndpoint",
    "Limits",
    "MalformedMessage",
    "MemoryEndpoint",
    "MemoryNetwork",
    "Message",
    "MessageRegistry",
    "MessageTooLarge",
    "NotAuthorized",
    "PeerKey",
    "PeerUnavailable",
    "Ping",
    "Pong",
    "ProtocolVersionMismatch",
    "RawCodec",
    "RemoteError",
    "RequestContext",
    "RequestId",
    "RetryableError",
    "ServerBusy",
    "ServerStream",
    "SessionId",
    "StreamClosed",
    "SwarmError",
    "Timeouts",
    "UnknownMessageKind",
    "admission_token",
    "coded",
    "decode_body",
    "decode_envelope",
    "encode_message",
    "message",
    "wire_codec",
]
