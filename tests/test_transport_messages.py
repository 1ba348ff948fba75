"""Wire messages, tensor frames and codecs, without any network."""

from __future__ import annotations

import math
from typing import NewType

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from transport import (
    BFloat16Codec,
    CodedTensor,
    ConfigurationError,
    EncodedTensor,
    Float16Codec,
    FourBitBlockwiseCodec,
    Int8BlockwiseCodec,
    Limits,
    MalformedMessage,
    Message,
    MessageRegistry,
    MessageTooLarge,
    ProtocolVersionMismatch,
    RawCodec,
    UnknownMessageKind,
    decode_body,
    decode_envelope,
    encode_message,
    message,
)

pytestmark = pytest.mark.timeout(60)

BlockIndex = NewType("BlockIndex", int)
REGISTRY = MessageRegistry()


@message("test.forward", registry=REGISTRY)
class Forward(Message):
    step: int
    block: BlockIndex
    hidden: torch.Tensor
    scale: float = 1.0
    note: str | None = None
    tags: tuple[str, ...] = ()
    extra: dict[str, int] | None = None


@message("test.parts", registry=REGISTRY)
class Parts(Message):
    parts: list[torch.Tensor]


@message("test.chunk", registry=REGISTRY)
class Chunk(Message):
    values: EncodedTensor


def round_trip(msg: Message, limits: Limits | None = None) -> Message:
    limits = limits or Limits()
    frames = [bytearray(frame) for frame in encode_message(msg, request_id=7)]
    envelope = decode_envelope(frames, limits)
    assert envelope.request_id == 7 and envelope.kind == msg.kind
    return decode_body(REGISTRY.lookup(envelope.kind), envelope, frames, limits)


def envelope_of(body: dict, kind: str = "test.forward", version: int = 1) -> list:
    return [msgpack.packb({"v": version, "k": kind, "i": 1, "b": body})]


def test_message_round_trip_keeps_values_and_types():
    msg = Forward(3, BlockIndex(5), torch.arange(6.0).view(2, 3), note="hi", tags=("a", "b"), extra={"x": 1})
    back = round_trip(msg)
    assert isinstance(back, Forward)
    assert (back.step, back.block, back.scale, back.note, back.tags, back.extra) == (
        3,
        5,
        1.0,
        "hi",
        ("a", "b"),
        {"x": 1},
    )
    torch.testing.assert_close(back.hidden, msg.hidden)


def test_list_of_tensors_uses_frames_in_order():
    parts = [torch.randn(3), torch.arange(4), torch.ones(2, 2, dtype=torch.bfloat16)]
    back = round_trip(Parts(parts))
    for sent, received in zip(parts, back.parts, strict=True):
        assert torch.equal(sent, received) and sent.dtype == received.dtype


def test_unknown_fields_and_envelope_keys_are_ignored():
    frames = encode_message(Forward(1, BlockIndex(2), torch.zeros(1)), 1)
    envelope = msgpack.unpackb(frames[0])
    envelope["b"]["future_field"] = [1, 2]
    envelope["future_key"] = "x"
    frames[0] = msgpack.packb(envelope)
    env = decode_envelope(frames, Limits())
    assert decode_body(Forward, env, frames, Limits()).step == 1


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"step": 1, "block": 2, "hidden": {"dtype": "float32", "shape": [2], "codec": "raw"}}, "bytes"),
        ({"step": "1", "block": 2}, "step"),  # str for int
        ({"step": True, "block": 2}, "step"),  # bool is no int
        ({"step": 1}, "missing field"),
        ({"step": 1, "block": 2, "hidden": {"dtype": "float64", "shape": [1]}}, "dtype"),
        ({"step": 1, "block": 2, "hidden": {"dtype": "float32", "shape": [-1]}}, "shape"),
        ({"step": 1, "block": 2, "hidden": {"dtype": "float32", "shape": [2], "codec": "zip"}}, "codec"),
        ({"step": 1, "block": 2, "hidden": {"dtype": "float32", "shape": [0], "codec": "raw"}}, "bytes"),
        ({"step": 1, "block": 2, "hidden": 5}, "map"),
        (
            {
                "step": 1,
                "block": 2,
                "hidden": {"dtype": "float32", "shape": [1], "codec": "raw"},
                "tags": [1],
            },
            "tags",
        ),
    ],
)
def test_wrong_types_are_rejected_with_malformed_message(body, error):
    frames = [*envelope_of(body), bytearray(4)]
    with pytest.raises(MalformedMessage, match=error):
        decode_body(Forward, decode_envelope(frames, Limits()), frames, Limits())


def test_envelope_errors_are_typed():
    with pytest.raises(ProtocolVersionMismatch):
        decode_envelope(envelope_of({}, version=99), Limits())
    with pytest.raises(UnknownMessageKind):
        REGISTRY.lookup("test.nope")
    with pytest.raises(MalformedMessage):
        decode_envelope([b"\xc1garbage"], Limits())
    with pytest.raises(MalformedMessage):
        decode_envelope([msgpack.packb([1, 2])], Limits())
    with pytest.raises(MessageTooLarge):
        decode_envelope([b"x"] * 3, Limits(max_frames=2))


def test_leftover_and_wrong_size_frames_are_rejected():
    frames = encode_message(Forward(1, BlockIndex(2), torch.zeros(4)), 1)
    with pytest.raises(MalformedMessage, match="unexpected frames"):
        decode_body(Forward, decode_envelope([*frames, b"x"], Limits()), [*frames, b"x"], Limits())
    short = [frames[0], bytearray(8)]
    with pytest.raises(MalformedMessage, match="bytes"):
        decode_body(Forward, decode_envelope(short, Limits()), short, Limits())


def test_tensor_element_limit_is_checked_before_allocation():
    frames = envelope_of(
        {"step": 1, "block": 2, "hidden": {"dtype": "float32", "shape": [2**40], "codec": "raw"}}
    )
    with pytest.raises(MessageTooLarge):
        decode_body(Forward, decode_envelope(frames, Limits()), frames, Limits())


def test_declaring_bad_messages_fails_loudly():
    registry = MessageRegistry()
    with pytest.raises(ConfigurationError):

        @message("test.bad", registry=registry)
        class Bad(Message):
            value: complex

    with pytest.raises(ConfigurationError):

        @message("test.forward", registry=REGISTRY)
        class Duplicate(Message):
            value: int


DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.uint8,
    torch.int32,
    torch.int64,
    torch.bool,
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (5,), (4, 7)])
def test_raw_tensors_of_every_dtype_and_shape(dtype, shape):
    tensor = (torch.randn(shape) * 50).to(dtype)
    back = round_trip(Forward(0, BlockIndex(0), tensor)).hidden
    assert back.dtype == dtype and back.shape == tensor.shape and torch.equal(back, tensor)


def test_non_contiguous_input_and_zero_copy_receive():
    tensor = torch.randn(6, 8).t()[1:4]  # non-contiguous view
    assert not tensor.is_contiguous()
    frames = [bytearray(f) for f in encode_message(Forward(0, BlockIndex(0), tensor), 1)]
    back = decode_body(Forward, decode_envelope(frames, Limits()), frames, Limits()).hidden
    assert torch.equal(back, tensor)
    buffer_start = torch.frombuffer(frames[1], dtype=torch.uint8).data_ptr()
    assert back.data_ptr() == buffer_start  # the received tensor is the frame's memory


def test_send_side_is_zero_copy_for_contiguous_tensors():
    tensor = torch.randn(1024)
    frames = encode_message(Forward(0, BlockIndex(0), tensor), 1)
    assert frames[1].ctypes.data == tensor.data_ptr()


finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(values=st.lists(finite, min_size=0, max_size=300), block=st.sampled_from([2, 8, 64]))
def test_codec_error_bounds(values, block):
    x = torch.tensor(values, dtype=torch.float32)

    def decoded(codec):
        return round_trip(Forward(0, BlockIndex(0), CodedTensor(x, codec))).hidden

    assert torch.equal(decoded(RawCodec()), x)  # raw: exact
    err16 = (decoded(Float16Codec()) - x).abs()
    normal = x.abs() >= 6.2e-5  # fp16 normals; below, absolute error <= 2**-25
    assert torch.all(err16[normal] <= x.abs()[normal] * 2**-11)
    assert torch.all(err16[~normal] <= 2**-24)
    err_bf16 = (decoded(BFloat16Codec()) - x).abs()
    bf16_normal = x.abs() >= torch.finfo(torch.bfloat16).tiny  # below: subnormal spacing 2**-133
    assert torch.all(err_bf16[bf16_normal] <= x.abs()[bf16_normal] * 2**-8)
    assert torch.all(err_bf16[~bf16_normal] <= 2**-133)
    for codec, bound in ((Int8BlockwiseCodec(block), 1 / 254), (FourBitBlockwiseCodec(block, "nf4"), 0.1520)):
        y = decoded(codec)
        assert y.dtype == x.dtype and y.shape == x.shape
        for start in range(0, x.numel(), block):
            chunk = slice(start, start + block)
            absmax = x[chunk].abs().max()
            assert torch.all((y[chunk] - x[chunk]).abs() <= absmax * bound * (1 + 1e-5) + 1e-30)


def test_lossy_codecs_keep_dtype_shape_and_pass_integers_raw():
    x = torch.randn(3, 5, dtype=torch.bfloat16)
    y = round_trip(Forward(0, BlockIndex(0), CodedTensor(x, Int8BlockwiseCodec(4)))).hidden
    assert y.dtype == torch.bfloat16 and y.shape == (3, 5)
    ints = torch.arange(10)
    assert torch.equal(
        round_trip(Forward(0, BlockIndex(0), CodedTensor(ints, Int8BlockwiseCodec()))).hidden, ints
    )
    with pytest.raises(ConfigurationError):
        Int8BlockwiseCodec(3)
    assert math.isclose(round_trip(Forward(0, BlockIndex(0), torch.zeros(1), scale=2)).scale, 2.0)


@pytest.mark.parametrize(
    "codec", [RawCodec(), Float16Codec(), Int8BlockwiseCodec(64), FourBitBlockwiseCodec(64)]
)
def test_an_encoded_tensor_field_decodes_where_the_receiver_says_with_the_bits_of_a_tensor_field(codec):
    x = torch.randn(4, 640, generator=torch.Generator().manual_seed(1)) * 3
    expected = round_trip(Forward(0, BlockIndex(0), CodedTensor(x, codec))).hidden
    received = round_trip(Chunk(CodedTensor(x, codec))).values
    assert isinstance(received, EncodedTensor)
    assert received.shape == (4, 640) and received.numel() == x.numel() and received.dtype == torch.float32
    assert torch.equal(received.decode(), expected)
    buffer = torch.full((3, 4 * 640), float("nan"))
    row = buffer[1]
    assert received.decode(out=row) is row and torch.equal(row, expected.view(-1))
    assert buffer[0].isnan().all() and buffer[2].isnan().all()  # nothing written beside it
    half = torch.empty(4 * 640, dtype=torch.float16)
    assert torch.equal(received.decode(out=half), expected.view(-1).half())  # another dtype: cast
    with pytest.raises(ValueError, match="cannot decode"):
        received.decode(out=torch.empty(10))
    with pytest.raises(ValueError, match="cannot decode"):
        received.decode(out=buffer[:, :640])  # not contiguous
    assert torch.equal(round_trip(Chunk(received)).values.decode(), expected)  # passed on as received


def test_an_encoded_tensor_with_short_frames_is_refused_when_the_message_is_decoded():
    frames = encode_message(Chunk(CodedTensor(torch.randn(640), Int8BlockwiseCodec(64))), 1)
    short = [frames[0], frames[1], bytearray(8)]  # the scales frame cut short
    with pytest.raises(MalformedMessage, match="bytes"):
        decode_body(Chunk, decode_envelope(short, Limits()), short, Limits())
