"""``PushTargets``: where a server may push a step's output: only to servers of the swarm.

A client names the next hop of its chain in each ``InferenceStep`` (address, CURVE key,
session token). Trusting that as given would let any client make a server connect to any
address and send it hidden states (issue #14). A server therefore pushes only when the
DHT lists a server of the block right after the session's span (the block the next hop
starts at) under that address *and* that CURVE key, in a record whose key belongs to its
signer (``swarm.records.key_binding_error``). The CURVE handshake then guarantees that the
output reaches only the holder of that key, whatever listens at the address.

Listings are cached per block and refreshed at most every ``min_refresh`` seconds, so a
client that names a new address at every step cannot make the server hammer the DHT.
A push that is refused is only logged: the client's own copy of the input covers it.

A target found in a listing older than ``ttl`` is still allowed at once, and the listing
is refreshed in the background (at most one lookup per block in flight): a push never
waits for a DHT lookup to a server it already pushed to, which before cost a lookup in
the middle of a step every ``ttl`` seconds (issue #18). The target was listed under that
key, and the CURVE handshake still binds the push to that key's holder.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from swarm.records import block_key, parse_server_listings
from transport.errors import SwarmError

logger = logging.getLogger(__name__)


class PushTargets:
    """The (address, CURVE key) pairs the DHT lists for each block, cached.

    Args:
        dht: the server's started ``SwarmDHT``.
        ttl: seconds a listing answers without a new lookup.
        min_refresh: fewest seconds between two lookups of one block (a target missing from
            a younger listing is refused without a lookup).
        timeout: deadline of one DHT lookup, in seconds.
        clock: monotonic seconds (injected in tests).
    """

    def __init__(
        self,
        dht,
        *,
        ttl: float = 30.0,
        min_refresh: float = 2.0,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._dht = dht
        self._ttl = ttl
        self._min_refresh = min_refresh
        self._timeout = timeout
        self._clock = clock
        self._listed: dict[int, tuple[float, frozenset[tuple[str, bytes]]]] = {}  # block -> (when, targets)
        self._locks: dict[int, asyncio.Lock] = {}
        self._refreshes: dict[int, asyncio.Task] = {}  # block -> background lookup in flight

    async def allows(self, address: str, key: bytes, block: int) -> bool:
        """Whether a server of ``block`` announces ``address`` with CURVE key ``key``.

        Never raises for DHT trouble: a failed lookup refuses the push (and is logged).
        """
        if self.listed_now(address, key, block):
            return True
        target = (address, key)
        async with self._locks.setdefault(block, asyncio.Lock()):
            cached = self._listed.get(block)  # a concurrent caller may have just looked it up
            if cached is None or self._clock() - cached[0] >= self._min_refresh:
                cached = await self._look_up(block)
        return cached is not None and target in cached[1]

    def listed_now(self, address: str, key: bytes, block: int) -> bool:
        """Whether the cached listing of ``block`` holds ``address`` with ``key``, without waiting
        (False: unknown, ask :meth:`allows`); past the ttl it is refreshed in the background."""
        cached = self._listed.get(block)
        if cached is None or (address, key) not in cached[1]:
            return False
        if self._clock() - cached[0] >= self._ttl:
            self._refresh_in_background(block)
        return True

    def _refresh_in_background(self, block: int) -> None:
        running = self._refreshes.get(block)
        if running is not None and not running.done():
            return
        lock = self._locks.setdefault(block, asyncio.Lock())

        async def refresh() -> None:
            async with lock:
                await self._look_up(block)

        self._refreshes[block] = asyncio.get_running_loop().create_task(refresh())

    async def close(self) -> None:
        """Stops the background lookups in flight."""
        refreshes, self._refreshes = list(self._refreshes.values()), {}
        for task in refreshes:
            task.cancel()
        await asyncio.gather(*refreshes, return_exceptions=True)

    async def _look_up(self, block: int) -> tuple[float, frozenset[tuple[str, bytes]]] | None:
        try:
            listing = await self._dht.list(block_key(self._dht.swarm_name, block), timeout=self._timeout)
        except SwarmError as error:
            logger.warning("could not list the servers of block %d to check a push target: %s", block, error)
            return self._listed.get(block)
        servers = parse_server_listings([listing])
        targets = frozenset(
            (address, record.curve_public_key) for record in servers.values() for address in record.addresses
        )
        self._listed[block] = (self._clock(), targets)
        return self._listed[block]
