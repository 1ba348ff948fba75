"""The emulated slow link inside the ZeroMQ transport (``transport/link_emulation.py``):
every received message is held for the one-way latency (and its bytes' transfer time),
in order, on real sockets; nothing changes without it."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from transport import ConfigurationError, Endpoint, Message, RequestContext, message, precise_timer
from transport.link_emulation import ENVIRONMENT_VARIABLE, EmulatedLink

pytestmark = pytest.mark.timeout(60)


@message("test.link.echo")
class LinkEcho(Message):
    number: int
    tensor: torch.Tensor | None = None


async def echo(request: LinkEcho, context: RequestContext) -> LinkEcho:
    return request


def test_parse_and_environment():
    link = EmulatedLink.parse("rtt_ms=20,mbit=100")
    assert link == EmulatedLink(0.010, 100e6)
    assert EmulatedLink.parse(link.to_environment()) == link
    assert EmulatedLink.parse("rtt_ms=5") == EmulatedLink(0.0025, 0.0)
    assert EmulatedLink.from_environment({}) is None
    assert EmulatedLink.from_environment({ENVIRONMENT_VARIABLE: " "}) is None
    assert EmulatedLink.from_environment({ENVIRONMENT_VARIABLE: "rtt_ms=100"}) == EmulatedLink(0.05)
    for bad in ("20", "rtt_ms=x", "mbit=100", "rtt_ms=1,rtt_ms=2", "rtt_ms=-4"):
        with pytest.raises(ConfigurationError):
            EmulatedLink.parse(bad)


def test_a_round_trip_costs_both_one_way_latencies_and_replies_keep_their_order():
    link = EmulatedLink(one_way_s=0.040)

    async def body():
        async with Endpoint(link=link) as server, Endpoint(link=link) as client:
            server.add_handler(LinkEcho, echo)
            connection = await client.connect(await server.bind(), server.public_key)
            round_trip = await connection.ping(timeout=10)
            assert round_trip >= 2 * link.one_way_s  # request held by the server, reply by the client
            calls = [asyncio.ensure_future(connection.call(LinkEcho(i), timeout=10)) for i in range(50)]
            done: list[int] = []
            for call in calls:
                call.add_done_callback(lambda finished: done.append(finished.result().number))
            await asyncio.gather(*calls)
            assert done == list(range(50))

    asyncio.run(asyncio.wait_for(body(), 30))


def test_bandwidth_delays_big_messages_by_their_transfer_time():
    # 8 Mbit/s: a 1 MB tensor takes >= 1 s each way; a small ping only its latency
    link = EmulatedLink(one_way_s=0.005, bits_per_second=8e6)

    async def body():
        async with Endpoint(link=link) as server, Endpoint(link=link) as client:
            server.add_handler(LinkEcho, echo)
            connection = await client.connect(await server.bind(), server.public_key)
            loop = asyncio.get_running_loop()
            started = loop.time()
            reply = await connection.call(LinkEcho(1, torch.ones(250_000)), timeout=20)
            assert loop.time() - started >= 2 * (1.0 + link.one_way_s)
            assert torch.equal(reply.tensor, torch.ones(250_000))

    asyncio.run(asyncio.wait_for(body(), 40))


def test_without_the_setting_nothing_is_held(monkeypatch):
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)

    async def body():
        async with Endpoint() as server, Endpoint() as client:
            assert server.link is None and client.link is None
            server.add_handler(LinkEcho, echo)
            connection = await client.connect(await server.bind(), server.public_key)
            assert (await connection.call(LinkEcho(7), timeout=10)).number == 7

    asyncio.run(asyncio.wait_for(body(), 30))


def test_the_environment_variable_turns_it_on(monkeypatch):
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "rtt_ms=60")

    async def body():
        async with Endpoint() as server, Endpoint() as client:
            assert client.link == EmulatedLink(0.030)
            server.add_handler(LinkEcho, echo)
            connection = await client.connect(await server.bind(), server.public_key)
            assert await connection.ping(timeout=10) >= 0.060

    asyncio.run(asyncio.wait_for(body(), 30))


@pytest.mark.skipif(not precise_timer.available(), reason="timerfd is Linux only")
def test_precise_timer_fires_at_the_instant_asked_without_busy_polling():
    """The timerfd timer fires no earlier than asked and, median, well within a millisecond
    after (event-loop timers were ~1 ms late); re-arming moves it; the loop sleeps meanwhile."""

    async def scenario():
        loop = asyncio.get_running_loop()
        fired: list[float] = []
        woke = asyncio.Event()

        def on_time() -> None:
            fired.append(time.monotonic())
            woke.set()

        timer = precise_timer.PreciseTimer(loop, on_time)
        lateness = []
        cpu_before = time.process_time()
        try:
            for _ in range(20):
                woke.clear()
                timer.arm(time.monotonic() + 60.0)
                due = time.monotonic() + 0.005
                timer.arm(due)  # re-armed: the earlier instant is gone
                await asyncio.wait_for(woke.wait(), timeout=5)
                lateness.append(fired[-1] - due)
        finally:
            timer.close()
        return lateness, time.process_time() - cpu_before

    lateness, cpu = asyncio.run(scenario())
    assert min(lateness) >= 0
    assert sorted(lateness)[len(lateness) // 2] < 0.0008
    assert cpu < 0.05  # 20 waits of 5 ms: a busy loop would spend ~0.1 s
