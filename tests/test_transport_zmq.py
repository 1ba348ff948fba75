"""ZeroMQ-specific behaviour: hostile input over a real socket, connect failures."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path
from socket import socket as tcp_socket

import msgpack
import pytest
import torch
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transport import (
    Endpoint,
    HandshakeTimeout,
    KeyPair,
    Limits,
    Message,
    PeerUnavailable,
    Ping,
    Pong,
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


@message("test.zmq.hang")
class Hang(Message):
    """Answered never: the server process's handler waits forever."""


KILLABLE_SERVER = """
import asyncio
from transport import Endpoint, Message, message

@message("test.zmq.hang")
class Hang(Message):
    pass

async def hang(request, context):
    await asyncio.Event().wait()

async def main():
    endpoint = Endpoint()
    endpoint.add_handler(Hang, hang)
    address = await endpoint.bind("tcp://127.0.0.1:0")
    print(address, endpoint.public_key.decode(), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


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


@pytest.mark.timeout(30)
def test_calls_to_a_killed_server_process_fail_with_peer_unavailable():
    server = subprocess.Popen(
        [sys.executable, "-c", KILLABLE_SERVER],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        address, key = server.stdout.readline().split()  # type: ignore[union-attr]

        async def body():
            async with Endpoint() as client:
                connection = await client.connect(address, key.encode())
                waiting = asyncio.ensure_future(connection.call(Hang(), timeout=60))
                await connection.ping()  # sent after Hang on the same socket: Hang is being handled
                server.kill()
                await asyncio.get_running_loop().run_in_executor(None, server.wait)
                with pytest.raises(PeerUnavailable):
                    await waiting  # in flight when the server died
                for _ in range(3):  # sent after it died: fail at once, not at the deadline
                    with pytest.raises(PeerUnavailable):
                        await connection.call(Hang(), timeout=60)
                with pytest.raises(PeerUnavailable):
                    await connection.open_stream(Open("gone"), timeout=60)

        asyncio.run(asyncio.wait_for(body(), 20))
    finally:
        server.kill()
        server.wait(10)
        server.stdout.close()  # type: ignore[union-attr]


def test_closing_the_endpoint_fails_a_connect_in_its_handshake():
    async def body():
        accepted = asyncio.Event()
        writers: list[asyncio.StreamWriter] = []

        def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.append(writer)
            accepted.set()

        # a TCP listener that accepts and never speaks: the connect waits in the handshake
        listener = await asyncio.start_server(accept, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        async with listener:
            client = Endpoint(timeouts=Timeouts(connect=60))
            connecting = asyncio.ensure_future(
                client.connect(f"tcp://127.0.0.1:{port}", KeyPair.generate().public)
            )
            await accepted.wait()
            await client.close()
            with pytest.raises(PeerUnavailable, match="endpoint closed"):
                await connecting
            for writer in writers:
                writer.close()

    asyncio.run(asyncio.wait_for(body(), 30))


def test_sends_queue_while_the_server_stops_reading_and_go_out_in_order():
    async def body():
        # a raw ROUTER that echoes, and stops reading on request: ZeroMQ's queues and
        # the kernel's buffers fill, sends get EAGAIN and wait in the connection's outbox
        keys = KeyPair.generate()
        context = zmq.asyncio.Context()
        router = context.socket(zmq.ROUTER)
        router.linger, router.rcvhwm = 0, 1
        router.curve_secretkey, router.curve_publickey, router.curve_server = keys.secret, keys.public, True
        port = router.bind_to_random_port("tcp://127.0.0.1")
        reading = asyncio.Event()
        reading.set()

        async def echo_raw() -> None:
            while True:
                await reading.wait()
                route, *frames = await router.recv_multipart(copy=False)
                envelope = msgpack.unpackb(frames[0].bytes)
                if envelope["k"] == Ping.kind:  # connect's admission ping
                    frames = encode_message(Pong(), envelope["i"])
                await router.send_multipart([route, *frames], copy=False)

        echoing = asyncio.ensure_future(echo_raw())
        try:
            async with Endpoint() as client:
                connection = await client.connect(f"tcp://127.0.0.1:{port}", keys.public)
                reading.clear()
                calls = [
                    asyncio.ensure_future(
                        connection.call(Echo(str(i), torch.full((4096,), float(i))), timeout=60)
                    )
                    for i in range(3000)
                ]
                await asyncio.sleep(0)  # every call has sent or queued its request
                assert connection._outbox  # the queue was used
                reading.set()
                replies = await asyncio.gather(*calls)
                assert [reply.text for reply in replies] == [str(i) for i in range(3000)]
                assert all(reply.tensor[0] == i for i, reply in enumerate(replies))
                assert not connection._outbox
        finally:
            echoing.cancel()
            router.close(linger=0)
            context.term()

    asyncio.run(asyncio.wait_for(body(), 60))
