"""One behaviour suite that the ZeroMQ, in-memory and libp2p endpoints all pass.

The libp2p endpoints each start their own p2p daemon on 127.0.0.1 (a real libp2p peer).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Callable

import pytest
import torch

from transport import (
    BaseEndpoint,
    Connection,
    DeadlineExceeded,
    Endpoint,
    HandshakeTimeout,
    KeyPair,
    Libp2pEndpoint,
    Limits,
    MemoryEndpoint,
    MemoryNetwork,
    Message,
    NotAuthorized,
    PeerUnavailable,
    RemoteError,
    RequestContext,
    ServerBusy,
    ServerStream,
    StreamClosed,
    Timeouts,
    message,
)

pytestmark = pytest.mark.timeout(60)


@message("test.conformance.echo")
class Echo(Message):
    text: str
    tensor: torch.Tensor | None = None


@message("test.conformance.fail")
class Fail(Message):
    retryable: bool


@message("test.conformance.wait")
class Wait(Message):
    index: int


@message("test.conformance.open")
class Open(Message):
    name: str
    refuse: bool = False


@message("test.conformance.step")
class Step(Message):
    value: int


@message("test.conformance.forward")
class Forward(Message):
    address: str
    key: bytes
    text: str


async def echo(request: Echo, context: RequestContext) -> Echo:
    return request


async def fail(request: Fail, context: RequestContext) -> Echo:
    if request.retryable:
        raise ServerBusy("no room")
    raise ValueError("handler bug")


def run(coroutine, timeout: float = 30.0):
    async def bounded():
        return await asyncio.wait_for(coroutine, timeout)

    return asyncio.run(bounded())


@pytest.fixture(params=["zmq", "memory", "libp2p"])
def make_endpoint(request) -> Callable[..., BaseEndpoint]:
    network = MemoryNetwork()

    def make(**kwargs) -> BaseEndpoint:
        if request.param == "zmq":
            return Endpoint(**kwargs)
        if request.param == "libp2p":
            return Libp2pEndpoint(**kwargs)
        return MemoryEndpoint(network, **kwargs)

    return make


async def serving(make_endpoint, handlers=None, stream_handlers=None, **kwargs) -> tuple[BaseEndpoint, str]:
    """A bound server with ``handlers`` (default: Echo and Fail) and ``stream_handlers``; (server, address)."""
    server = make_endpoint(**kwargs)
    for kind, handler in (handlers if handlers is not None else {Echo: echo, Fail: fail}).items():
        server.add_handler(kind, handler)
    for kind, handler in (stream_handlers or {}).items():
        server.add_stream_handler(kind, handler)
    return server, await server.bind()


@contextlib.asynccontextmanager
async def connected(make_endpoint, **serving_kwargs) -> AsyncIterator[Connection]:
    """A connection from a fresh client endpoint to a fresh server (``serving``); both closed on exit."""
    server, address = await serving(make_endpoint, **serving_kwargs)
    async with server, make_endpoint() as client:
        yield await client.connect(address, server.public_key)


def test_call_round_trip(make_endpoint):
    async def body():
        async with connected(make_endpoint) as connection:
            reply = await connection.call(Echo("hi", torch.arange(5)))
            assert (
                isinstance(reply, Echo) and reply.text == "hi" and torch.equal(reply.tensor, torch.arange(5))
            )
            assert await connection.ping() >= 0

    run(body())


def test_many_requests_in_flight_on_one_connection(make_endpoint):
    async def body():
        arrived: list[int] = []
        all_arrived = asyncio.Event()

        async def wait(request: Wait, context: RequestContext) -> Wait:
            arrived.append(request.index)
            if len(arrived) == 20:
                all_arrived.set()
            await all_arrived.wait()  # only returns once all 20 are being handled at once
            return request

        async with connected(make_endpoint, handlers={Wait: wait}) as connection:
            replies = await asyncio.gather(*(connection.call(Wait(i)) for i in range(20)))
            assert [reply.index for reply in replies] == list(range(20))

    run(body())


def test_handler_errors_go_to_their_caller_only(make_endpoint):
    async def body():
        server, address = await serving(make_endpoint)
        async with server, make_endpoint() as client, make_endpoint() as other:
            connection = await client.connect(address, server.public_key)
            bystander = await other.connect(address, server.public_key)
            with pytest.raises(RemoteError) as caught:
                await connection.call(Fail(retryable=False))
            assert caught.value.kind == "ValueError" and not caught.value.retryable
            with pytest.raises(RemoteError) as caught:
                await connection.call(Fail(retryable=True))
            assert caught.value.kind == "ServerBusy" and caught.value.retryable
            with pytest.raises(RemoteError) as caught:
                await connection.call(Open("no unary handler"))
            assert caught.value.kind == "UnknownMessageKind"
            assert (await bystander.call(Echo("still here"))).text == "still here"

    run(body())


def test_limits_violations_are_error_replies(make_endpoint):
    async def body():
        async with connected(make_endpoint, limits=Limits(max_tensor_elements=100)) as connection:
            with pytest.raises(RemoteError) as caught:
                await connection.call(Echo("big", torch.zeros(101)))
            assert caught.value.kind == "MessageTooLarge"
            assert (await connection.call(Echo("small", torch.zeros(100)))).text == "small"

    run(body())


def test_deadline_exceeded_when_handler_hangs(make_endpoint):
    async def body():
        async def hang(request: Wait, context: RequestContext) -> Wait:
            await asyncio.Event().wait()
            return request

        async with connected(make_endpoint, handlers={Wait: hang}) as connection:
            with pytest.raises(DeadlineExceeded):
                await connection.call(Wait(1), timeout=0.2)

    run(body())


def test_wrong_server_key_raises_handshake_timeout(make_endpoint):
    async def body():
        server, address = await serving(make_endpoint)
        async with server, make_endpoint(timeouts=Timeouts(connect=2.0)) as client:
            with pytest.raises(HandshakeTimeout):
                await client.connect(address, KeyPair.generate().public)
            connection = await client.connect(address, server.public_key)
            assert (await connection.call(Echo("ok"))).text == "ok"

    run(body())


def test_private_swarm_admits_only_key_holders(make_endpoint):
    async def body():
        swarm_key = b"k" * 32
        server, address = await serving(make_endpoint, swarm_key=swarm_key)
        async with server:
            for wrong in (None, b"w" * 32):
                async with make_endpoint(swarm_key=wrong) as outsider:
                    with pytest.raises(NotAuthorized):
                        await outsider.connect(address, server.public_key)
            async with make_endpoint(swarm_key=swarm_key) as member:
                connection = await member.connect(address, server.public_key)
                assert (await connection.call(Echo("member"))).text == "member"

    run(body())


async def ordered_session(stream: ServerStream) -> None:
    opening = stream.opening
    if opening.refuse:
        raise ServerBusy("cache full")
    total = 0
    async for step in stream:
        total += step.value
        if step.value < 0:
            return  # the handler ends the session
        await asyncio.sleep(0)  # let other sessions interleave
        await stream.reply(Step(total))


def test_streams_process_steps_in_order_and_sessions_concurrently(make_endpoint):
    async def body():
        async with connected(make_endpoint, stream_handlers={Open: ordered_session}) as connection:

            async def session(offset: int) -> list[int]:
                async with await connection.open_stream(Open(f"s{offset}")) as stream:
                    replies = await asyncio.gather(*(stream.call(Step(offset + i)) for i in range(10)))
                    return [reply.value for reply in replies]

            results = await asyncio.gather(*(session(100 * k) for k in range(5)))
            for k, values in enumerate(results):
                expected = [sum(100 * k + j for j in range(i + 1)) for i in range(10)]
                assert values == expected  # running sums: steps applied in order

    run(body())


def test_stream_refusal_end_and_idle_expiry(make_endpoint):
    async def body():
        ended = asyncio.Event()

        async def watched(stream: ServerStream) -> None:
            try:
                await ordered_session(stream)
            finally:
                ended.set()

        server, address = await serving(
            make_endpoint, handlers={}, stream_handlers={Open: watched}, timeouts=Timeouts(stream_idle=0.3)
        )
        async with server, make_endpoint() as client:
            connection = await client.connect(address, server.public_key)
            with pytest.raises(RemoteError) as caught:
                await connection.open_stream(Open("x", refuse=True))
            assert caught.value.kind == "ServerBusy" and caught.value.retryable
            ended.clear()

            stream = await connection.open_stream(Open("y"))
            assert (await stream.call(Step(2))).value == 2
            with pytest.raises(StreamClosed):
                await stream.call(Step(-1))  # the handler returns without replying
            await ended.wait()
            with pytest.raises(StreamClosed):
                await stream.call(Step(1))  # the session is gone on the server
            ended.clear()

            idle = await connection.open_stream(Open("z"))
            await ended.wait()  # nothing sent: the server expires it after stream_idle
            with pytest.raises(StreamClosed):
                await idle.call(Step(1))
            ended.clear()

            closing = await connection.open_stream(Open("w"))
            await closing.close()
            await ended.wait()  # the handler saw the end of its steps
            with pytest.raises(StreamClosed):
                await closing.call(Step(1))

    run(body())


def test_an_endpoint_is_server_and_client_at_once(make_endpoint):
    async def body():
        last, last_address = await serving(make_endpoint)
        middle = make_endpoint()

        async def forward(request: Forward, context: RequestContext) -> Echo:
            onward = await middle.connect(request.address, request.key)
            reply = await onward.call(Echo(request.text + " via middle"))
            await onward.close()
            return reply

        middle.add_handler(Forward, forward)
        middle_address = await middle.bind()
        async with last, middle, make_endpoint() as client:
            connection = await client.connect(middle_address, middle.public_key)
            reply = await connection.call(Forward(last_address, last.public_key, "hello"))
            assert reply.text == "hello via middle"

    run(body())


def test_closing_fails_pending_calls_and_later_calls(make_endpoint):
    async def body():
        started = asyncio.Event()

        async def hang(request: Wait, context: RequestContext) -> Wait:
            started.set()
            await asyncio.Event().wait()
            return request

        server, address = await serving(make_endpoint, handlers={Wait: hang})
        async with make_endpoint(timeouts=Timeouts(connect=0.5)) as client:
            connection = await client.connect(address, server.public_key)
            pending = asyncio.ensure_future(connection.call(Wait(1), timeout=20))
            await started.wait()
            await server.close()
            with pytest.raises(PeerUnavailable):
                await pending
            await connection.close()
            with pytest.raises(PeerUnavailable):
                await connection.call(Wait(2))
            with pytest.raises((PeerUnavailable, HandshakeTimeout)):
                await client.connect(address, server.public_key)

    run(body())


async def steps_with_errors(stream: ServerStream) -> None:
    total = 0
    async for step in stream:
        if step.value % 2:  # odd steps fail on their own; the running sum is kept
            await stream.reply_error(ServerBusy(f"odd step {step.value}"))
            continue
        total += step.value
        await stream.reply(Step(total))


def test_a_failed_stream_step_leaves_the_session_open(make_endpoint):
    async def body():
        async with (
            connected(make_endpoint, stream_handlers={Open: steps_with_errors}) as connection,
            await connection.open_stream(Open("s")) as stream,
        ):
            assert (await stream.call(Step(2))).value == 2
            with pytest.raises(RemoteError) as caught:
                await stream.call(Step(3))
            assert caught.value.kind == "ServerBusy" and caught.value.retryable
            assert "odd step 3" in caught.value.message
            assert (await stream.call(Step(4))).value == 6  # same session, same state
            # several in flight: each step gets its own outcome, in order
            outcomes = await asyncio.gather(
                *(stream.call(Step(value)) for value in (5, 6, 7, 8)), return_exceptions=True
            )
            assert [getattr(outcome, "value", type(outcome)) for outcome in outcomes] == [
                RemoteError,
                12,
                RemoteError,
                20,
            ]

    run(body())


def test_calls_to_a_closed_server_fail_fast_with_peer_unavailable(make_endpoint):
    async def body():
        unread: list[dict] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: unread.append(context))
        server, address = await serving(make_endpoint, stream_handlers={Open: steps_with_errors})
        async with make_endpoint() as client:
            connection = await client.connect(address, server.public_key)
            stream = await connection.open_stream(Open("s"))
            await server.close()
            # the connection stays open on our side; every call must fail long before
            # its 60 s deadline (this test's own limit is 20 s)
            for _ in range(3):
                with pytest.raises(PeerUnavailable):
                    await connection.call(Echo("anyone?"), timeout=60)
            with pytest.raises(PeerUnavailable):
                await stream.call(Step(2), timeout=60)
            with pytest.raises(PeerUnavailable):
                await connection.open_stream(Open("t"), timeout=60)
        gc.collect()
        assert not unread  # e.g. no "Future exception was never retrieved"

    run(body(), timeout=20)


def test_connect_racing_close_is_clean(make_endpoint):
    async def body():
        server, address = await serving(make_endpoint)
        async with server:
            # close the client endpoint after 0, 1, 2, ... loop iterations of a connect,
            # cancelling the connect first in every other round (an all-reduce round that
            # was given up): connect must end in PeerUnavailable (or have finished)
            for delay in range(12):
                client = make_endpoint()
                connecting = asyncio.ensure_future(client.connect(address, server.public_key))
                for _ in range(delay):
                    await asyncio.sleep(0)
                if delay % 2:
                    connecting.cancel()
                await client.close()
                try:
                    connection = await connecting
                except asyncio.CancelledError:
                    assert delay % 2
                except PeerUnavailable:
                    pass
                else:
                    with pytest.raises(PeerUnavailable):
                        await connection.call(Echo("closed"))
                with pytest.raises(PeerUnavailable):
                    await client.connect(address, server.public_key)
            async with make_endpoint() as client:  # and the server is unharmed
                connection = await client.connect(address, server.public_key)
                assert (await connection.call(Echo("ok"))).text == "ok"

    run(body())


def test_a_notification_runs_its_handler_and_gets_no_reply(make_endpoint):
    async def body():
        seen: list[str] = []
        first_seen = asyncio.Event()

        async def record(request: Echo, context: RequestContext) -> Echo:
            seen.append(request.text)
            if request.text == "first":
                first_seen.set()
            return request

        async with connected(make_endpoint, handlers={Echo: record, Fail: fail}) as connection:
            connection.notify(Echo("first"))
            connection.notify(Fail(retryable=False))  # the handler's error is not sent back either
            reply = await connection.call(Echo("second"))
            await asyncio.wait_for(first_seen.wait(), 10)  # libp2p may deliver it after "second"
            assert reply.text == "second" and sorted(seen) == ["first", "second"]
            assert not connection._pending  # nothing waits for an answer to the notifications
            await connection.close()
            with pytest.raises(PeerUnavailable):
                connection.notify(Echo("closed"))

    run(body())
