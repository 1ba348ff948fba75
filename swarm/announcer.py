"""``Announcer``: keeps a peer's records alive in the DHT by re-publishing them periodically."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from transport.errors import ConfigurationError, SwarmError

logger = logging.getLogger(__name__)


class _Publisher(Protocol):
    async def publish_many(self, values: Mapping[str, Any], *, ttl: float | None = None) -> float: ...


class Announcer:
    """Re-publishes ``produce()`` every ``period`` seconds with lifetime ``ttl``.

    ``produce`` is called before each announcement, so changing state (load, free cache,
    a new span) is picked up on the next round; call ``refresh_now()`` to announce at once
    (Petals re-announces immediately on a state change). Keys that ``produce`` stops
    returning get tombstones, so a server that moves disappears from its old blocks at
    once. Generic: servers announce block records, training runs their progress.

    Args:
        dht: a ``SwarmDHT`` (anything with ``publish_many``).
        produce: returns the records to announce now, ``{key: value}``.
        period: seconds between announcements; must be well inside ``ttl``.
        ttl: lifetime of each announcement in seconds.
        retry_period: seconds before retrying a failed announcement.

    Raises:
        ConfigurationError: ``period`` is not below ``ttl / 2`` (a single lost round
            would let records expire).
    """

    def __init__(
        self,
        dht: _Publisher,
        produce: Callable[[], Mapping[str, Any]],
        *,
        period: float,
        ttl: float,
        retry_period: float | None = None,
    ):
        if not 0 < period <= ttl / 2:
            raise ConfigurationError(f"announce period {period}s must be in (0, ttl/2 = {ttl / 2}s]")
        self._dht = dht
        self._produce = produce
        self.period = period
        self.ttl = ttl
        self.retry_period = min(period, retry_period if retry_period is not None else period / 4)
        self._wake = asyncio.Event()
        self._stopped = asyncio.Event()
        self._announced_keys: set[str] = set()
        self.rounds = 0
        self.failures = 0

    def refresh_now(self) -> None:
        """Announces at once instead of waiting for the period to end."""
        self._wake.set()

    def stop(self) -> None:
        """Makes ``run()`` return after the announcement in flight (if any)."""
        self._stopped.set()
        self._wake.set()

    async def announce_once(self) -> None:
        """Publishes the current records (and tombstones for keys no longer produced).

        Raises:
            SwarmError: the store failed (``RecordRejected``, ``DeadlineExceeded``).
        """
        values = dict(self._produce())
        for key in self._announced_keys - values.keys():
            values[key] = None
        await self._dht.publish_many(values, ttl=self.ttl)
        self._announced_keys = {key for key, value in values.items() if value is not None}
        self.rounds += 1

    async def run(self) -> None:
        """Announces until ``stop()`` (or cancellation); failures (swarm or OS errors) are logged
        and retried, so a flood that exhausts descriptors for a while never ends the peer."""
        while not self._stopped.is_set():
            self._wake.clear()
            delay = self.period
            try:
                await self.announce_once()
            except (SwarmError, OSError, RuntimeError) as error:
                # OSError / RuntimeError: out of descriptors for a while (a connection flood);
                # hivemind's futures then fail to map their shared memory (issue #19).
                self.failures += 1
                delay = self.retry_period
                logger.warning("announcement failed (retrying in %.1fs): %s", delay, error)
            if self._stopped.is_set():
                break
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass

    async def withdraw(self) -> None:
        """Replaces everything this announcer published with tombstones (on drain/exit).

        Raises:
            SwarmError: the store failed.
        """
        if self._announced_keys:
            await self._dht.publish_many(dict.fromkeys(self._announced_keys), ttl=self.ttl)
            self._announced_keys = set()
