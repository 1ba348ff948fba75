"""Per-peer limits of an endpoint (issue #19), on the ZeroMQ and the in-memory endpoint:
one peer's streaming sessions and in-flight request bytes are bounded, and another peer
is served meanwhile."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import torch

from transport import (
    BaseEndpoint,
    Endpoint,
    Limits,
    MemoryEndpoint,
    MemoryNetwork,
    Message,
    RequestContext,
    ServerStream,
    message,
)
from transport.errors import SwarmError

pytestmark = pytest.mark.timeout(60)

MIB = 2**20


@message("test.peer_limits.hold")
class Hold(Message):
    blob: torch.Tensor


@message("test.peer_limits.done")
class Done(Message):
    pass


@message("test.peer_limits.open")
class Open(Message):
    pass


@message("test.peer_limits.step")
class Step(Message):
    blob: torch.Tensor


@pytest.fixture(params=["zmq", "memory"])
def make_endpoint(request) -> Callable[..., BaseEndpoint]:
    network = MemoryNetwork()

    def make(**kwargs) -> BaseEndpoint:
        return Endpoint(**kwargs) if request.param == "zmq" else MemoryEndpoint(network, **kwargs)

    return make


def _is_busy(error: BaseException) -> bool:
    return (
        isinstance(error, SwarmError)
        and error.retryable
        and "ServerBusy" in f"{type(error).__name__} {error}"
    )


def test_one_peer_cannot_take_every_streaming_session(make_endpoint):
    async def serve(stream: ServerStream) -> None:
        async for _step in stream:
            await stream.reply(Done())

    async def body():
        limits = Limits(max_sessions_per_peer=2, max_sessions=10)
        server = make_endpoint(limits=limits)
        server.add_stream_handler(Open, serve)
        address = await server.bind()
        async with server, make_endpoint() as greedy, make_endpoint() as other:
            connection = await greedy.connect(address, server.public_key)
            streams = [await connection.open_stream(Open(), timeout=5) for _ in range(2)]
            with pytest.raises(SwarmError) as refused:
                await connection.open_stream(Open(), timeout=5)
            assert _is_busy(refused.value), refused.value
            theirs = await (await other.connect(address, server.public_key)).open_stream(Open(), timeout=5)
            assert isinstance(await theirs.call(Step(torch.zeros(1)), timeout=5), Done)
            await streams[0].close()

            async def reopened():
                try:
                    return await connection.open_stream(Open(), timeout=5)
                except SwarmError:
                    return None

            for _ in range(100):  # the server learns of the close asynchronously
                if (stream := await reopened()) is not None:
                    break
                await asyncio.sleep(0.05)
            assert stream is not None

    asyncio.run(asyncio.wait_for(body(), 30))


def test_one_peers_requests_in_hand_are_bounded_in_bytes(make_endpoint):
    release = None

    async def hold(request: Hold, context: RequestContext) -> Done:
        await release.wait()
        return Done()

    async def serve(stream: ServerStream) -> None:
        stream.accept()
        await release.wait()  # steps queue up, unread, until released
        async for _step in stream:
            await stream.reply(Done())

    async def body():
        nonlocal release
        release = asyncio.Event()
        server = make_endpoint(limits=Limits(max_inflight_bytes_per_peer=3 * MIB + MIB // 2))
        server.add_handler(Hold, hold)
        server.add_stream_handler(Open, serve)
        address = await server.bind()
        blob = torch.zeros(MIB // 4)  # 1 MiB of float32
        async with server, make_endpoint() as greedy, make_endpoint() as other:
            connection = await greedy.connect(address, server.public_key)
            held = [asyncio.ensure_future(connection.call(Hold(blob), timeout=10)) for _ in range(2)]
            stream = await connection.open_stream(Open(), timeout=5)
            queued = asyncio.ensure_future(stream.call(Step(blob), timeout=10))  # the third MiB
            await asyncio.sleep(0)
            with pytest.raises(SwarmError) as refused:
                await connection.call(Hold(blob), timeout=10)
            assert _is_busy(refused.value), refused.value
            mine = await other.connect(address, server.public_key)
            other_call = asyncio.ensure_future(mine.call(Hold(blob), timeout=10))  # its own budget
            release.set()
            assert all(isinstance(reply, Done) for reply in await asyncio.gather(*held, queued, other_call))
            assert isinstance(await connection.call(Hold(blob), timeout=10), Done)  # freed again

    asyncio.run(asyncio.wait_for(body(), 30))
