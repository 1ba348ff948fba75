"""Per-field wire types: turn a dataclass annotation into a strict encoder/decoder.

Supported annotations: ``int``, ``float``, ``bool``, ``str``, ``bytes``, a
``typing.NewType`` over one of those (distinct id types), ``X | None``,
``list[X]``, ``tuple[X, ...]``, ``dict[str, X]`` and ``torch.Tensor`` (which also
accepts a ``CodedTensor`` on the sending side); ``EncodedTensor`` travels as a
``torch.Tensor`` does and reaches the receiver checked but not decoded. Decoding checks every value's type
and raises ``MalformedMessage`` naming the field; ``bool`` is never accepted as an
``int`` and vice versa.
"""

from __future__ import annotations

import types
import typing
from typing import Any

import torch

from transport.codecs import CODECS, CodedTensor, EncodedTensor, RawCodec, decode_later
from transport.errors import ConfigurationError, MalformedMessage
from transport.limits import Limits
from transport.tensors import dtype_name, parse_tensor_header

_RAW = RawCodec()


class FrameReader:
    """Hands out a message's buffer frames, in order, to the tensor fields decoding it."""

    __slots__ = ("frames", "limits", "position")

    def __init__(self, frames: list[Any], limits: Limits, position: int = 1):
        self.frames = frames
        self.limits = limits
        self.position = position

    def take(self, count: int) -> list[Any]:
        end = self.position + count
        if end > len(self.frames):
            raise MalformedMessage("message has fewer tensor frames than its tensors need")
        taken = self.frames[self.position : end]
        self.position = end
        return taken


class FieldType:
    """Encodes one annotated value for msgpack and validates it on the way back."""

    def encode(self, value: Any, buffers: list[Any]) -> Any:
        raise NotImplementedError

    def decode(self, wire: Any, reader: FrameReader) -> Any:
        raise NotImplementedError


class _Scalar(FieldType):
    def __init__(self, python_type: type):
        self.python_type = python_type
        self.name = python_type.__name__

    def encode(self, value: Any, buffers: list[Any]) -> Any:
        return self.decode(value, None)  # type: ignore[arg-type]

    def decode(self, wire: Any, reader: FrameReader) -> Any:
        if type(wire) is self.python_type:
            return wire
        if self.python_type is float and type(wire) is int:
            return float(wire)
        raise MalformedMessage(f"expected {self.name}, got {type(wire).__name__}")


class _Optional(FieldType):
    def __init__(self, inner: FieldType):
        self.inner = inner

    def encode(self, value: Any, buffers: list[Any]) -> Any:
        return None if value is None else self.inner.encode(value, buffers)

    def decode(self, wire: Any, reader: FrameReader) -> Any:
        return None if wire is None else self.inner.decode(wire, reader)


class _Sequence(FieldType):
    def __init__(self, item: FieldType, container: type):
        self.item = item
        self.container = container

    def encode(self, value: Any, buffers: list[Any]) -> Any:
        if not isinstance(value, (list, tuple)):
            raise MalformedMessage(f"expected a {self.container.__name__}, got {type(value).__name__}")
        return [self.item.encode(item, buffers) for item in value]

    def decode(self, wire: Any, reader: FrameReader) -> Any:
        if type(wire) is not list:
            raise MalformedMessage(f"expected a list, got {type(wire).__name__}")
        return self.container(self.item.decode(item, reader) for item in wire)


class _Mapping(FieldType):
    def __init__(self, value: FieldType):
        self.value = value

    def encode(self, value: Any, buffers: list[Any]) -> Any:
        if not isinstance(value, dict) or not all(type(key) is str for key in value):
            raise MalformedMessage("expected a dict with str keys")
        return {key: self.value.encode(item, buffers) for key, item in value.items()}

    def decode(self, wire: Any, reader: FrameReader) -> Any:
        if type(wire) is not dict or not all(type(key) is str for key in wire):
            raise MalformedMessage("expected a map with str keys")
        return {key: self.value.decode(item, reader) for key, item in wire.items()}


class _Tensor(FieldType):
    def encode(self, value: Any, buffers: list[Any]) -> Any:
        if isinstance(value, CodedTensor):
            tensor, codec = value.tensor, value.codec
        elif isinstance(value, torch.Tensor):
            tensor, codec = value, _RAW
        else:
            raise MalformedMessage(f"expected a tensor, got {type(value).__name__}")
        if not tensor.is_floating_point():  # lossy codecs are for floating values only
            codec = _RAW
        header = {"dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape), "codec": codec.name}
        params = codec.params()
        if params:
            header["params"] = params
        buffers.extend(codec.encode(tensor))
        return header

    def decode(self, wire: Any, reader: FrameReader) -> Any:
        codec, params, dtype, shape, numel = self._header(wire, reader)
        return codec.decode(params, dtype, numel, reader.take(codec.frame_count)).view(shape)

    @staticmethod
    def _header(wire: Any, reader: FrameReader) -> tuple[Any, dict, torch.dtype, list[int], int]:
        dtype, shape, numel = parse_tensor_header(wire, reader.limits)
        name = wire.get("codec")
        codec = CODECS.get(name) if type(name) is str else None
        if codec is None:
            raise MalformedMessage(f"unknown tensor codec {wire.get('codec')!r}")
        params = wire.get("params", {})
        if type(params) is not dict:
            raise MalformedMessage("codec params must be a map")
        if codec is not RawCodec and not dtype.is_floating_point:
            raise MalformedMessage(f"codec {codec.name} applies to floating tensors, not {dtype}")
        return codec, params, dtype, shape, numel


class _Encoded(_Tensor):
    """A tensor the receiver decodes itself, where it wants the values (``EncodedTensor``)."""

    def encode(self, value: Any, buffers: list[Any]) -> Any:
        if isinstance(value, EncodedTensor):  # passed on as received
            value = value.decode()
        return super().encode(value, buffers)

    def decode(self, wire: Any, reader: FrameReader) -> Any:
        codec, params, dtype, shape, numel = self._header(wire, reader)
        frames = reader.take(codec.frame_count)
        return EncodedTensor(tuple(shape), dtype, decode_later(codec, params, dtype, numel, frames))


_SCALARS = (int, float, bool, str, bytes)


def compile_field_type(annotation: Any, where: str) -> FieldType:
    """Build the encoder/decoder for one annotation.

    Args:
        annotation: a resolved type annotation.
        where: ``Class.field`` for error messages.
    Returns:
        the field's ``FieldType``.
    Raises:
        ConfigurationError: the annotation is not a supported wire type.
    """
    supertype = getattr(annotation, "__supertype__", None)
    if supertype is not None:  # typing.NewType: a distinct id type over a scalar
        return compile_field_type(supertype, where)
    if annotation in _SCALARS:
        return _Scalar(annotation)
    if annotation is torch.Tensor:
        return _Tensor()
    if annotation is EncodedTensor:
        return _Encoded()
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        others = [arg for arg in args if arg is not type(None)]
        if len(others) == 1 and len(args) == 2:
            return _Optional(compile_field_type(others[0], where))
    elif origin is list and len(args) == 1:
        return _Sequence(compile_field_type(args[0], where), list)
    elif origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _Sequence(compile_field_type(args[0], where), tuple)
    elif origin is dict and len(args) == 2 and args[0] is str:
        return _Mapping(compile_field_type(args[1], where))
    raise ConfigurationError(
        f"{where}: unsupported wire type {annotation!r}; use int, float, bool, str, bytes, a NewType, "
        "X | None, list[X], tuple[X, ...], dict[str, X], torch.Tensor or EncodedTensor"
    )
