"""Typed, versioned wire messages: a registry of kinds and the envelope around them.

Declare a message kind in a few lines, in the module that owns it::

    from typing import NewType
    import torch
    from transport import Message, message

    BlockIndex = NewType("BlockIndex", int)

    @message("serve.forward")
    class Forward(Message):
        step: int
        first_block: BlockIndex
        hidden: torch.Tensor            # (batch, seq, hidden); a CodedTensor picks a codec
        note: str | None = None         # fields with defaults may be absent on the wire

On the wire a message is frame 0, a msgpack map (the envelope)::

    {"v": protocol version, "k": kind, "i": request id, "b": {field: value},
     "s": session id (streams only), "a": admission token (private swarms only)}

followed by the tensor fields' buffer frames in field order. Unknown envelope keys and
unknown body fields are ignored; unknown kinds, wrong types, missing fields and
leftover frames are rejected with ``MalformedMessage`` (or a subclass). Never pickle.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import Any, ClassVar, NewType, TypeVar

import msgpack

from transport.errors import (
    ConfigurationError,
    MalformedMessage,
    MessageTooLarge,
    ProtocolVersionMismatch,
    UnknownMessageKind,
)
from transport.fields import FieldType, FrameReader, compile_field_type
from transport.limits import PROTOCOL_VERSION, Limits

RequestId = NewType("RequestId", int)
SessionId = NewType("SessionId", bytes)
PeerKey = NewType("PeerKey", bytes)
"""A peer's CURVE public key, z85-encoded (40 bytes), as authenticated by ZeroMQ."""

_MISSING = dataclasses.MISSING


class Message:
    """Base class of every wire message; declare subclasses with :func:`message`."""

    kind: ClassVar[str]
    _wire_fields: ClassVar[tuple[tuple[str, FieldType, Any], ...]]


M = TypeVar("M", bound=type[Message])


class MessageRegistry:
    """Maps kind names to message classes; one default registry serves most programs."""

    def __init__(self) -> None:
        self._kinds: dict[str, type[Message]] = {}

    def register(self, cls: type[Message]) -> None:
        """Add ``cls`` under ``cls.kind``.

        Raises:
            ConfigurationError: another class already uses that kind.
        """
        existing = self._kinds.get(cls.kind)
        if existing is not None and existing is not cls:
            raise ConfigurationError(f"message kind {cls.kind!r} is already {existing.__qualname__}")
        self._kinds[cls.kind] = cls

    def lookup(self, kind: str) -> type[Message]:
        """The class of ``kind``.

        Raises:
            UnknownMessageKind: no class is registered under ``kind``.
        """
        cls = self._kinds.get(kind)
        if cls is None:
            raise UnknownMessageKind(f"unknown message kind {kind!r}")
        return cls

    def __contains__(self, kind: object) -> bool:
        return kind in self._kinds


DEFAULT_REGISTRY = MessageRegistry()


def message(kind: str, *, registry: MessageRegistry | None = None) -> Callable[[M], M]:
    """Class decorator: make ``cls`` a frozen dataclass and register it as ``kind``.

    Args:
        kind: the wire name, dotted by owner (``"serve.forward"``, ``"allreduce.part"``).
        registry: where to register; the default registry when None.
    Returns:
        the decorator.
    Raises:
        ConfigurationError: the class is no ``Message``, the kind is taken, or a field
            has an unsupported type.
    """

    def declare(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, Message)):
            raise ConfigurationError(f"@message({kind!r}) needs a subclass of transport.Message")
        cls = dataclasses.dataclass(frozen=True)(cls)
        hints = typing.get_type_hints(cls)
        wire_fields = []
        for field in dataclasses.fields(cls):
            default: Any = field.default
            if field.default_factory is not _MISSING:
                default = field.default_factory
            wire_fields.append(
                (field.name, compile_field_type(hints[field.name], f"{kind}.{field.name}"), default)
            )
        cls.kind = kind
        cls._wire_fields = tuple(wire_fields)
        (registry or DEFAULT_REGISTRY).register(cls)
        return cls

    return declare


def encode_body(msg: Message, buffers: list[Any]) -> dict[str, Any]:
    """The msgpack body of ``msg``; tensor fields append their buffers to ``buffers``.

    Raises:
        MalformedMessage: a field's value does not match its declared type.
    """
    body = {}
    for name, field_type, _ in msg._wire_fields:
        try:
            body[name] = field_type.encode(getattr(msg, name), buffers)
        except MalformedMessage as error:
            raise MalformedMessage(f"{msg.kind}.{name}: {error}") from None
    return body


def encode_message(
    msg: Message, request_id: int, session: bytes | None = None, token: bytes | None = None
) -> list[Any]:
    """Frames of ``msg``: the envelope, then its tensors' buffers (zero-copy).

    Args:
        msg: a registered message.
        request_id: the id a reply will carry (0: no reply expected).
        session: the streaming session this message belongs to, if any.
        token: the admission token of a private swarm, if any.
    Returns:
        the frames, ready for ``send_multipart(copy=False)``.
    Raises:
        MalformedMessage: a field's value does not match its declared type.
    """
    frames: list[Any] = [b""]
    envelope: dict[str, Any] = {"v": PROTOCOL_VERSION, "k": msg.kind, "i": request_id}
    envelope["b"] = encode_body(msg, frames)
    if session is not None:
        envelope["s"] = session
    if token is not None:
        envelope["a"] = token
    frames[0] = msgpack.packb(envelope, use_bin_type=True)
    return frames


class Envelope(typing.NamedTuple):
    """The checked frame 0 of a received message, body not yet decoded."""

    kind: str
    request_id: RequestId
    body: dict
    session: SessionId | None
    token: bytes | None


def salvage_request_id(envelope_frame: Any) -> int:
    """Best effort: the request id of a message that failed to decode, else 0."""
    try:
        envelope = msgpack.unpackb(envelope_frame, raw=False)
        request_id = envelope["i"]
        return request_id if type(request_id) is int and 0 < request_id < 2**63 else 0
    except Exception:
        return 0


def decode_envelope(frames: list[Any], limits: Limits) -> Envelope:
    """Check the limits and the envelope of a received message.

    Args:
        frames: the received frames (bytes-like), envelope first.
        limits: the receiver's limits.
    Returns:
        the envelope.
    Raises:
        MessageTooLarge: too many frames or bytes.
        MalformedMessage, ProtocolVersionMismatch: a bad envelope.
    """
    if not frames:
        raise MalformedMessage("empty message")
    if len(frames) > limits.max_frames:
        raise MessageTooLarge(f"{len(frames)} frames > max_frames={limits.max_frames}")
    total = sum(memoryview(frame).nbytes for frame in frames)
    if total > limits.max_message_bytes:
        raise MessageTooLarge(f"{total} bytes > max_message_bytes={limits.max_message_bytes}")
    head = frames[0]
    if memoryview(head).nbytes > limits.max_envelope_bytes:
        raise MessageTooLarge(f"envelope exceeds max_envelope_bytes={limits.max_envelope_bytes}")
    try:
        envelope = msgpack.unpackb(head, raw=False)
    except Exception as error:
        raise MalformedMessage(f"envelope is not msgpack: {type(error).__name__}") from None
    if type(envelope) is not dict:
        raise MalformedMessage("envelope must be a map")
    version, kind, request_id = envelope.get("v"), envelope.get("k"), envelope.get("i")
    if version != PROTOCOL_VERSION or type(version) is not int:
        raise ProtocolVersionMismatch(f"protocol version {version!r}, this peer speaks {PROTOCOL_VERSION}")
    if type(kind) is not str:
        raise MalformedMessage("envelope kind must be a str")
    if type(request_id) is not int or not 0 <= request_id < 2**63:
        raise MalformedMessage("envelope request id must be an int in [0, 2**63)")
    body, session, token = envelope.get("b"), envelope.get("s"), envelope.get("a")
    if type(body) is not dict:
        raise MalformedMessage("envelope body must be a map")
    if session is not None and (type(session) is not bytes or not 0 < len(session) <= 64):
        raise MalformedMessage("envelope session must be 1..64 bytes")
    if token is not None and type(token) is not bytes:
        raise MalformedMessage("envelope admission token must be bytes")
    return Envelope(kind, RequestId(request_id), body, session, token)


def decode_body(cls: type[Message], envelope: Envelope, frames: list[Any], limits: Limits) -> Message:
    """Build a ``cls`` from a checked envelope and its frames.

    Raises:
        MalformedMessage: a field is missing or has the wrong type, or frames are left over.
        MessageTooLarge: a tensor exceeds the limits.
    """
    reader = FrameReader(frames, limits)
    values = {}
    body = envelope.body
    for name, field_type, default in cls._wire_fields:
        if name in body:
            try:
                values[name] = field_type.decode(body[name], reader)
            except MalformedMessage as error:
                raise type(error)(f"{cls.kind}.{name}: {error}") from None
        elif default is not _MISSING:
            values[name] = default() if callable(default) else default
        else:
            raise MalformedMessage(f"{cls.kind}: missing field {name!r}")
    if reader.position != len(frames):
        raise MalformedMessage(f"{cls.kind}: {len(frames) - reader.position} unexpected frames")
    return cls(**values)
