"""ZeroMQ-specific behaviour: hostile input over a real socket, connect failures."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from socket import socket as tcp_socket

import msgpack
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transport import (
    Endpoint,
    HandshakeTimeout,
    KeyPair,
    Limits,
    Message,
    PeerUnavailable,
    RequestContext,
    ServerStream,
    Timeouts,
    encode_message,
    errors,
    message,
)

TYPED_ERRORS = {name for name, value in vars(errors).items() if isinstance(value, type)}

pytestmark = pytest.mark.timeout(120)


@message("test.zmq.echo")
class Echo(Message):
    text: str
    tensor: torch.Tensor | None = None
    parts: list[torch.Tensor] = ()  # type: ignore[assignment]


@message("test.zmq.open")
class Open(Message):
    name: str


async def echo(request: Echo, context: RequestContext) -> Echo:
    return request


async def echo_steps(stream: ServerStream) -> None:
    async for step in stream:
        await stream.reply(step)


class ServerThread:
    """An endpoint serving on its own event loop thread, so blocking test code can fuzz it."""

    def __init__(self, **kwargs):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.endpoint = self.run(self._start(kwargs))

    async def _start(self, kwargs) -> Endpoint:
        endpoint = Endpoint(**kwargs)
        endpoint.add_handler(Echo, echo)
        endpoint.add_stream_handler(Open, echo_steps)
        self.address = await endpoint.bind("tcp://127.0.0.1:0")
        return endpoint

    def run(self, coroutine, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def valid_call_succeeds(self) -> bool:
        async def call() -> bool:
            async with Endpoint() as client:
                connection = await client.connect(self.address, self.endpoint.public_key)
                reply = await connection.call(Echo("valid", torch.arange(3)), timeout=10)
                return reply.text == "valid" and torch.equal(reply.tensor, torch.arange(3))

        return self.run(call())

    def close(self) -> None:
        self.run(self.endpoint.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def server():
    server = ServerThread(limits=Limits(max_message_bytes=2**20, max_frames=16, max_tensor_elements=10_000))
    yield server
    server.close()


def raw_client(server: ServerThread) -> zmq.Socket:
    """A plain DEALER with a valid CURVE key: it gets past encryption, nothing else."""
    keys = KeyPair.generate()
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.linger = 0
    socket.curve_secretkey, socket.curve_publickey = keys.secret, keys.public
    socket.curve_serverkey = server.endpoint.public_key
    socket.connect(server.address)
    return socket


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=8),
    st.binary(max_size=8),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
tensor_headers = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["float32", "bfloat16", "bool", "int64", "float64", 7]),
        "shape": st.lists(st.integers(-2, 2**40), max_size=4) | values,
    },
    optional={
        "codec": st.sampled_from(["raw", "fp16", "bf16", "int8", "4bit", "lz4"]) | values,
        "params": st.fixed_dictionaries(
            {},
            optional={
                "block_size": st.integers(-4, 2**22) | values,
                "kind": st.sampled_from(["nf4", "int4", "x"]),
            },
        )
        | values,
    },
)
bodies = st.fixed_dictionaries(
    {},
    optional={
        "text": st.text(max_size=8) | values,
        "name": st.text(max_size=8) | values,
        "tensor": tensor_headers | values,
        "parts": st.lists(tensor_headers, max_size=3) | values,
    },
)
envelopes = st.fixed_dictionaries(
    {
        "v": st.sampled_from([1, 1, 1, 0, 2, "1"]),
        "k": st.sampled_from(
            [
                "test.zmq.echo",
                "test.zmq.open",
                "transport.stream_close",
                "transport.ping",
                "transport.error",
                "nope",
            ]
        )
        | values,
        "i": st.integers(-1, 2**64 - 1) | values,
        "b": bodies | values,
    },
    optional={
        "s": st.sampled_from([b"session-1", b"session-2"]) | st.binary(max_size=80) | values,
        "a": values,
    },
)
messages = st.one_of(
    st.lists(st.binary(max_size=64), max_size=4),  # noise, including empty multipart
    st.builds(
        lambda v, extra: [msgpack.packb(v), *extra], values, st.lists(st.binary(max_size=64), max_size=3)
    ),
    st.builds(
        lambda e, extra: [msgpack.packb(e), *extra],
        envelopes,
        st.lists(st.binary(min_size=0, max_size=96), max_size=20),  # up to 21 frames > max_frames
    ),
)


def test_thousand_malformed_messages_never_take_the_server_down(server, caplog):
    caplog.set_level(logging.ERROR, logger="transport")
    socket = raw_client(server)
    sent = []

    @settings(
        max_examples=1200,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(frames=messages)
    def throw(frames):
        socket.send_multipart(frames if frames else [b""])
        sent.append(1)

    throw()
    assert len(sent) >= 1000
    try:
        assert server.valid_call_succeeds()
        replies = 0
        while socket.poll(timeout=1000 if replies == 0 else 0):
            frames = socket.recv_multipart()
            envelope = msgpack.unpackb(frames[0])
            assert envelope["k"] in (
                "transport.error",
                "test.zmq.echo",
                "transport.pong",
                "transport.stream_opened",
            )
            if envelope["k"] == "transport.error":
                assert envelope["b"]["error"] in TYPED_ERRORS  # every rejection is a typed error
            replies += 1
        assert replies > 0  # malformed requests were answered with errors
        assert not caplog.records  # and none of them hit an unexpected code path
    finally:
        socket.close(linger=0)


def test_oversized_frame_disconnects_only_that_client(server):
    socket = raw_client(server)
    try:
        socket.send_multipart([encode_message(Echo("huge"), 1)[0], b"x" * (2**20 + 1)])
        assert server.valid_call_succeeds()
    finally:
        socket.close(linger=0)


def test_connect_to_nothing_is_peer_unavailable_within_deadline():
    async def body():
        # a port that is bound but not listening: connections are refused, and no other
        # socket (nor a TCP self-connect) can take it while we hold it
        probe = tcp_socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        async with Endpoint(timeouts=Timeouts(connect=0.5)) as client:
            start = time.monotonic()
            with pytest.raises(PeerUnavailable):
                await client.connect(f"tcp://127.0.0.1:{port}", KeyPair.generate().public)
            assert time.monotonic() - start < 5
        probe.close()

    asyncio.run(asyncio.wait_for(body(), 30))


def test_silent_server_is_handshake_timeout_never_a_hang():
    async def body():
        # a TCP listener that accepts and never speaks: the CURVE handshake cannot finish
        listener = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        async with listener, Endpoint(timeouts=Timeouts(connect=0.5)) as client:
            start = time.monotonic()
            with pytest.raises(HandshakeTimeout):
                await client.connect(f"tcp://127.0.0.1:{port}", KeyPair.generate().public)
            assert time.monotonic() - start < 5

    asyncio.run(asyncio.wait_for(body(), 30))


def test_unencrypted_endpoints_work_and_curve_cannot_reach_them():
    async def body():
        async with Endpoint(encrypted=False) as server, Endpoint(encrypted=False) as client:
            server.add_handler(Echo, echo)
            address = await server.bind()
            connection = await client.connect(address)
            assert (await connection.call(Echo("plain"))).text == "plain"
            async with Endpoint(timeouts=Timeouts(connect=0.5)) as encrypted:
                with pytest.raises(HandshakeTimeout):
                    await encrypted.connect(address, server.public_key)

    asyncio.run(asyncio.wait_for(body(), 30))
