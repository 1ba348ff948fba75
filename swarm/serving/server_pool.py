"""``ServerPool``: the servers a client can use, as one owner of listing, bans, connections and pace.

Every ``InferenceSession`` of a ``RemoteModel`` shares the model's pool: a server that
failed one session is avoided by the others for the length of its ban, one connection
per server address carries every session's streams, and what each server's steps have
taken so far sets the deadline of its next step (:meth:`ServerPool.step_deadline`), so
a hung server is given up on in seconds rather than after ``step_timeout``.

A ban remembers the ``started_at`` of the record it was made on: a listing that shows a
newer one (the server restarted and re-announced) lifts the ban at once.

The live view (issue #18, time to first token): once started, the pool keeps the newest
listing and refreshes it in the background every ``refresh_period`` seconds, so opening a
session costs no DHT lookup (:meth:`ServerPool.view`). A ban or a failed open marks the
view stale (:meth:`ServerPool.invalidate`): the refresher looks up at once, and the next
``view()`` waits for a fresh listing. After each refresh the pool connects ahead of time
to the servers of the route it would pick now, so the next session finds its connections
made.

Relayed servers (behind NAT) are dialled over libp2p through the DHT's daemon
(``RelayedDialer``), authenticated as the libp2p peer id in their signed record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

from swarm import BanList, NoRouteError, ServerRecord, SwarmDHT, find_route
from swarm.data_plane import RelayedDialer
from swarm.server_reports import ReportBook
from transport import Connection, Endpoint
from transport.errors import SwarmError

logger = logging.getLogger(__name__)

_PACE_SAMPLES = 32  # recent steps per server the deadline is derived from


class ServerPool:
    """The DHT's listing of a model's servers, the client's bans, connections and step pace.

    Args:
        dht: a started ``SwarmDHT`` (client mode is enough).
        endpoint: the client's endpoint (closing it closes the connections).
        n_blocks: blocks of the model (the listing covers them all).
        bans: servers to avoid for a while after they failed.
        dht_timeout: seconds for one DHT lookup.
        deadline_floor, deadline_factor, deadline_ceiling: a step's deadline on a server is
            ``deadline_factor`` times the slowest of its recent steps (scaled by tokens),
            within ``[deadline_floor, deadline_ceiling]``; the ceiling while nothing is known.
        config_hash: the client's model config hash, sent with each session it opens so that
            a server of another model refuses it ("" sends none).
        refresh_period: seconds between background refreshes of the live view, once
            :meth:`start` ran; a view older than twice this is not used.
    """

    def __init__(
        self,
        dht: SwarmDHT,
        endpoint: Endpoint,
        n_blocks: int,
        bans: BanList,
        dht_timeout: float,
        *,
        deadline_floor: float = 2.0,
        deadline_factor: float = 5.0,
        deadline_ceiling: float = 120.0,
        config_hash: str = "",
        refresh_period: float = 10.0,
    ):
        self.dht = dht
        self.endpoint = endpoint
        self.n_blocks = n_blocks
        self.config_hash = config_hash
        self.bans = bans
        self.dht_timeout = dht_timeout
        self.deadline_floor = deadline_floor
        self.deadline_factor = deadline_factor
        self.deadline_ceiling = deadline_ceiling
        self._connections: dict[tuple[str, bytes], asyncio.Future] = {}  # (address, key) -> connect
        self._pace: dict[str, deque[tuple[float, int]]] = {}  # peer id -> (seconds, tokens) per step
        self._started: dict[str, float] = {}  # peer id -> started_at of its newest listed record
        self._relayed: RelayedDialer | None = None  # made on the first relayed server
        self.reports = ReportBook(dht, dht_timeout)  # misbehaviour this client caught (spot_checks.py)
        self.refresh_period = refresh_period
        self.refreshes = 0  # DHT lookups made for the view (background and forced)
        self._view: dict[str, ServerRecord] | None = None
        self._view_at = 0.0  # loop time of the view's lookup
        self._stale = False  # a ban or a failed open since the view's lookup
        self._lookup: asyncio.Future | None = None  # the lookup in flight, shared by view() callers
        self._wake: asyncio.Event | None = None
        self._refresher: asyncio.Task | None = None

    async def start(self) -> None:
        """Starts the background refresher of the live view (its first lookup starts at once).

        Idempotent; :meth:`close` stops it."""
        if self._refresher is None:
            self._wake = asyncio.Event()
            self._refresher = asyncio.create_task(self._refresh_forever(), name="server-pool-refresher")

    async def _refresh_forever(self) -> None:
        """Refreshes the view every ``refresh_period`` seconds, or at once when it went stale."""
        while True:
            try:
                await self._connect_ahead(await self._shared_lookup())
            except SwarmError as error:  # the next view() looks up itself
                logger.debug("background refresh of the server listing failed: %s", error)
            except Exception:  # a task boundary: the refresher outlives one bad round
                logger.exception("background refresh of the server listing failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.refresh_period)
            self._wake.clear()

    async def _connect_ahead(self, servers: dict[str, ServerRecord]) -> None:
        """Connects to the servers of the route a session would take now (a failure is only
        logged: the session's own open reports it)."""
        try:
            route = find_route(servers.values(), 0, self.n_blocks, excluded=self.banned())
        except NoRouteError:
            return
        results = await asyncio.gather(
            *(self.connection_to(hop.server) for hop in route), return_exceptions=True
        )
        for hop, result in zip(route, results, strict=True):
            if isinstance(result, Exception):
                logger.debug("could not connect ahead to %s: %s", hop.peer_id, result)

    @property
    def refreshing(self) -> bool:
        """Whether a lookup for the view is in flight."""
        return self._lookup is not None and not self._lookup.done()

    @property
    def known(self) -> dict[str, ServerRecord]:
        """The newest listing as it stands (no lookup; empty before the first)."""
        return self._view or {}

    async def view(self) -> dict[str, ServerRecord]:
        """The live view: the newest listing while it is fresh (younger than twice
        ``refresh_period``, and no ban or failed open since), else a new lookup, shared with
        any other caller waiting for one.

        Raises:
            SwarmError: the lookup failed or ran past ``dht_timeout``.
        """
        loop = asyncio.get_running_loop()
        fresh = self._view is not None and loop.time() - self._view_at < 2 * self.refresh_period
        if fresh and not self._stale:
            return self._view
        return await self._shared_lookup()

    async def _shared_lookup(self) -> dict[str, ServerRecord]:
        if self._lookup is None or self._lookup.done():
            self._lookup = asyncio.ensure_future(self.list())
            self._lookup.add_done_callback(_retrieve)  # a caller that gave up does not read it
        return await asyncio.shield(self._lookup)

    def invalidate(self) -> None:
        """Marks the view stale (a server failed): the next :meth:`view` waits for a fresh
        listing, and the background refresher looks up now."""
        self._stale = True
        if self._wake is not None:
            self._wake.set()

    async def list(self) -> dict[str, ServerRecord]:
        """The servers the DHT lists for the model's blocks, by peer id.

        Bans of servers listed with a newer ``started_at`` than the banned one are lifted.

        Raises:
            SwarmError: the lookup failed or ran past ``dht_timeout``.
        """
        started = asyncio.get_running_loop().time()
        stale_before = self._stale
        servers = await self.dht.list_servers(self.n_blocks, timeout=self.dht_timeout)
        self.refreshes += 1
        if started >= self._view_at:  # not overtaken by a lookup that started later
            self._view, self._view_at = servers, started
            if stale_before or not self._stale:
                self._stale = False  # a failure reported during the lookup keeps it stale
        self._started = {peer: record.started_at for peer, record in servers.items()}
        for peer in self.bans.lift_restarted(self._started):
            logger.info("lifted the ban of %s: it restarted", peer)
            self._pace.pop(peer, None)
        await self._forget_gone(servers)
        return servers

    async def _forget_gone(self, servers: dict[str, ServerRecord]) -> None:
        """Closes cached connections that are down and whose server is no longer listed there
        (it died or restarted elsewhere): ZeroMQ would redial them forever."""
        listed = {(record.addresses[0], record.curve_public_key) for record in servers.values()}
        for key, pending in list(self._connections.items()):
            if key in listed or not pending.done() or pending.cancelled() or pending.exception() is not None:
                continue
            connection = pending.result()
            if not getattr(connection, "is_up", True):  # the ZeroMQ transport knows
                del self._connections[key]
                await connection.close()

    async def connection_to(self, server: ServerRecord) -> Connection:
        """A (cached) connection to ``server``: its first address over ZeroMQ, or libp2p when it
        is relayed (behind NAT).

        Concurrent callers share one connection attempt; a failed attempt is not cached.

        Raises:
            PeerUnavailable, HandshakeTimeout, NotAuthorized: see ``Endpoint.connect``.
        """
        key = _connection_key(server)
        pending = self._connections.get(key)
        if pending is None or _failed(pending):
            connecting = (
                self._relayed_dialer().connect(server) if server.relayed else self.endpoint.connect(*key)
            )
            pending = asyncio.ensure_future(connecting)
            self._connections[key] = pending
        try:
            connection = await asyncio.shield(pending)
        except BaseException:
            if self._connections.get(key) is pending and pending.done():
                del self._connections[key]
            raise
        if _gone(connection):
            self._connections.pop(key, None)
            return await self.connection_to(server)
        return connection

    def connected(self, server: ServerRecord) -> bool:
        """Whether a connection to ``server`` is up already (``connection_to`` would not wait)."""
        pending = self._connections.get(_connection_key(server))
        return pending is not None and pending.done() and not _failed(pending) and not _gone(pending.result())

    def _relayed_dialer(self) -> RelayedDialer:
        if self._relayed is None:
            self._relayed = RelayedDialer(self.dht, self.endpoint.swarm_key, self.endpoint.timeouts)
        return self._relayed

    async def close(self) -> None:
        """Stops the refresher and closes the libp2p side (the ZeroMQ connections close with the
        client's endpoint)."""
        refresher, self._refresher = self._refresher, None
        if refresher is not None:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
        if self._lookup is not None and not self._lookup.done():
            self._lookup.cancel()
        if self._relayed is not None:
            await self._relayed.close()

    async def answers_ping(self, server: ServerRecord, timeout: float) -> bool:
        """Whether ``server``'s process answers a ping within ``timeout`` seconds (it is not hung)."""
        try:
            connection = await asyncio.wait_for(self.connection_to(server), timeout)
            await connection.ping(timeout=timeout)
        except (SwarmError, TimeoutError):
            return False
        return True

    def ban(self, server: ServerRecord | str) -> float:
        """Avoids ``server`` for a while (longer on each repeated failure) or, for a record, until
        it restarts. Returns the ban's length in seconds."""
        self.invalidate()
        if isinstance(server, ServerRecord):
            return self.bans.ban(
                server.peer_id, evidence=self._started.get(server.peer_id, server.started_at)
            )
        return self.bans.ban(server)

    def banned(self) -> frozenset[str]:
        """Peer ids avoided now."""
        return self.bans.banned()

    def record_step(self, peer_id: str, seconds: float, tokens: int) -> None:
        """Notes that a step of ``tokens`` new tokens took ``seconds`` on ``peer_id``."""
        samples = self._pace.setdefault(peer_id, deque(maxlen=_PACE_SAMPLES))
        samples.append((seconds, max(1, tokens)))

    def step_deadline(self, peer_id: str, tokens: int) -> float:
        """Seconds to wait for ``peer_id``'s next step of ``tokens`` tokens before giving up on it."""
        samples = self._pace.get(peer_id)
        if not samples:
            return self.deadline_ceiling
        slowest = max(seconds * max(1.0, tokens / sampled) for seconds, sampled in samples)
        return min(self.deadline_ceiling, max(self.deadline_floor, self.deadline_factor * slowest))


def _retrieve(future: asyncio.Future) -> None:
    """Marks a shared future's exception as read (each caller that awaits it gets it raised)."""
    if not future.cancelled():
        future.exception()


def _connection_key(server: ServerRecord) -> tuple:
    """Whom a connection reaches: a relayed server's libp2p identity, else its first address and key."""
    if server.relayed:
        return (f"/p2p/{server.libp2p_peer}", server.identity_key)  # proven for that identity only
    return (server.addresses[0], server.curve_public_key)  # a new server may reuse an address


def _failed(pending: asyncio.Future) -> bool:
    """A connection attempt that ended without a connection (cancelled or raised)."""
    return pending.done() and (pending.cancelled() or pending.exception() is not None)


def _gone(connection) -> bool:
    """Closed under us (endpoint closing, or forgotten), or a broken libp2p stream (it does not
    reconnect by itself): to be dialed again."""
    return getattr(connection, "_closed", False) or getattr(connection, "broken", False)
