"""Pipelined stream openings (issue #18, time to first token) over real ZeroMQ sockets on
127.0.0.1: the first step goes out right behind the opening and is answered once the
handler accepts; a refused opening fails that step with the opening's own error; an
opening nobody answers fails the step at the opening's deadline, not the step's. A
deferred opening leaves with the first step (``send_call`` sends both at once), and
none at all when the stream is closed before any step."""

from __future__ import annotations

import asyncio

import pytest

from transport import Endpoint, Message, RemoteError, ServerStream, Timeouts, message
from transport.errors import DeadlineExceeded, ServerBusy

pytestmark = pytest.mark.timeout(60)


@message("test.pipelined.open")
class Open(Message):
    mode: str  # "accept-late", "refuse" or "never"


@message("test.pipelined.step")
class Step(Message):
    value: int


OPENED: list[str] = []  # the modes of the openings the server saw, in order


async def handler(stream: ServerStream) -> None:
    mode = stream.opening.mode
    OPENED.append(mode)
    if mode == "refuse":
        raise ServerBusy("no room for this session")
    if mode == "never":
        await asyncio.sleep(30)  # holds the opening unanswered (the test ends first)
    await asyncio.sleep(0.2)  # set-up work before accepting: the step waits queued
    async for step in stream:
        await stream.reply(Step(step.value + 1))


async def _client_and_server():
    server, client = Endpoint(), Endpoint(timeouts=Timeouts(request=20.0))
    server.add_stream_handler(Open, handler)
    address = await server.bind("tcp://127.0.0.1:0")
    connection = await client.connect(address, server.public_key)
    return server, client, connection


def test_a_pipelined_step_is_answered_after_a_late_accept():
    async def body():
        server, client, connection = await _client_and_server()
        async with server, client:
            stream = await connection.open_stream(Open("accept-late"), timeout=10, pipelined=True)
            assert not stream.opened.done()  # returned before the server accepted
            replies = await asyncio.gather(*(stream.call(Step(v), timeout=10) for v in (1, 2)))
            assert stream.opened.done() and stream.opened.exception() is None
            await stream.close()
            return [reply.value for reply in replies]

    assert asyncio.run(body()) == [2, 3]


def test_a_refused_pipelined_opening_fails_the_step_with_its_own_error():
    async def body():
        server, client, connection = await _client_and_server()
        async with server, client:
            stream = await connection.open_stream(Open("refuse"), timeout=10, pipelined=True)
            with pytest.raises(RemoteError, match="no room") as caught:
                await stream.call(Step(1), timeout=10)
            return caught.value.kind, caught.value.retryable

    assert asyncio.run(body()) == ("ServerBusy", True)


def test_an_unanswered_opening_fails_the_step_at_the_openings_deadline():
    async def body():
        server, client, connection = await _client_and_server()
        async with server, client:
            stream = await connection.open_stream(Open("never"), timeout=0.5, pipelined=True)
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(DeadlineExceeded):
                await stream.call(Step(1), timeout=20)
            return loop.time() - started

    assert asyncio.run(body()) < 10  # the opening's 0.5 s, not the step's 20 s


def test_a_deferred_opening_leaves_with_the_first_step_and_not_at_all_without_one():
    async def body():
        server, client, connection = await _client_and_server()
        async with server, client:
            OPENED.clear()
            unused = await connection.open_stream(Open("refuse"), timeout=10, pipelined=True, deferred=True)
            await unused.close()  # no step: the server never hears of it
            stream = await connection.open_stream(
                Open("accept-late"), timeout=10, pipelined=True, deferred=True
            )
            assert stream.opened is None  # nothing sent yet
            first = stream.send_call(Step(1), timeout=10)  # the opening, then the step, sent here
            assert stream.opened is not None
            second = stream.call(Step(2), timeout=10)
            replies = [await first, await second]
            assert stream.opened.done() and stream.opened.exception() is None
            await stream.close()
            return [reply.value for reply in replies], list(OPENED)

    assert asyncio.run(body()) == ([2, 3], ["accept-late"])


def test_a_refused_deferred_opening_fails_its_first_step_with_its_own_error():
    async def body():
        server, client, connection = await _client_and_server()
        async with server, client:
            stream = await connection.open_stream(Open("refuse"), timeout=10, pipelined=True, deferred=True)
            with pytest.raises(RemoteError, match="no room") as caught:
                await stream.call(Step(1), timeout=10)
            return caught.value.kind

    assert asyncio.run(body()) == "ServerBusy"
