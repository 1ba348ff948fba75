"""A user-space delaying TCP proxy (one process for many routes): each chunk is held for the
link's transfer time plus the one-way latency.

Used by ``benchmarks/speculative.py`` and ``benchmarks/diloco_wan.py`` (members announce
the proxy's address). It costs ~2 ms of its own per one-way leg on a busy 2-core machine
(a 4 KiB echo through it took 4.3 ms round trip at zero emulated latency, against 0.26 ms
direct), which is why ``benchmarks/inference.py`` measures its floor with the transport's
own emulated link instead (``transport/link_emulation.py``, ``SWARM_EMULATE_LINK``).
"""

from __future__ import annotations

import asyncio


async def _pump(reader, writer, one_way, bits_per_second) -> None:
    """Forwards one direction: a chunk leaves once the link has carried it, plus the latency."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    async def deliver() -> None:
        while (item := await queue.get()) is not None:
            due, data = item
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    delivery = asyncio.create_task(deliver())
    link_free = 0.0
    try:
        while data := await reader.read(1 << 16):
            start = max(loop.time(), link_free)
            link_free = start + len(data) * 8 / bits_per_second.value
            queue.put_nowait((link_free + one_way.value, data))
    except ConnectionError:
        pass
    finally:
        queue.put_nowait(None)
        try:
            await delivery
        except ConnectionError:
            pass
        writer.close()


async def _serve_proxies(routes, one_way, bits_per_second, ready) -> None:
    async def connect(listen_host: str, target: tuple[str, int]):
        async def handle(reader, writer) -> None:
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(*target)
            except OSError:
                writer.close()
                return
            await asyncio.gather(
                _pump(reader, upstream_writer, one_way, bits_per_second),
                _pump(upstream_reader, writer, one_way, bits_per_second),
            )

        return await asyncio.start_server(handle, listen_host, target[1])

    servers = [await connect(host, ("127.0.0.1", port)) for host, port in routes]
    ready.set()
    await asyncio.gather(*(server.serve_forever() for server in servers))


def proxy_main(routes, one_way, bits_per_second, ready) -> None:
    """Process entry: proxies ``listen_host:port -> 127.0.0.1:port`` for each route."""
    asyncio.run(_serve_proxies(routes, one_way, bits_per_second, ready))
