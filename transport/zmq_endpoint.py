"""The ZeroMQ endpoint: a ROUTER socket to serve, one DEALER socket per connection.

Each endpoint owns one ZeroMQ context (so one ZAP handler names its clients by
their CURVE keys). Frames are sent with ``copy=False`` and received as ZeroMQ frames
whose memory tensors wrap directly. CURVE handshake failures are silent in ZeroMQ:
``connect`` watches the socket monitor for ``HANDSHAKE_SUCCEEDED`` and gives up
with ``HandshakeTimeout`` at the connect deadline (or at the first handshake failure),
and with ``PeerUnavailable`` at once when the first TCP connect is refused.

Floods: the serving socket drops connections whose handshake has not finished within
``HANDSHAKE_IVL_MS``; when the process runs out of descriptors, libzmq's listener
skips the accept (``EMFILE`` is one of the errors it tolerates) and keeps serving the
connections it has.

The ROUTER and DEALER sockets are plain (not ``zmq.asyncio``) sockets driven by event
loop reader callbacks on their file descriptors: a received request is dispatched, and
a received reply resolves its caller's future, in the callback itself, with no task
or pyzmq future in between (about half of the round-trip overhead this transport adds
over raw ZeroMQ; see ``benchmarks/transport.py``). ZeroMQ's descriptor is
edge-triggered: every callback reads until ``EAGAIN``, and every send looks at
``socket.EVENTS`` afterwards, since a send can consume the edge of a message that
arrived meanwhile.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import zmq
import zmq.asyncio

from transport.client import Connection
from transport.curve import (
    bind_zap_socket,
    check_public_key,
    configure_client_socket,
    configure_server_socket,
    serve_zap,
)
from transport.endpoint import BaseEndpoint
from transport.errors import (
    ConfigurationError,
)
from transport.link_emulation import DelayLines, EmulatedLink, frames_size
from transport.messages import PeerKey
from transport.zmq_connection import MONITOR_EVENTS, READ_BATCH, ZmqConnection

log = logging.getLogger(__name__)

HANDSHAKE_IVL_MS = 5000
"""ZeroMQ drops an inbound connection that has not finished its handshake (greeting and
CURVE) within this many milliseconds (its default is 30 s): idle or stalled connections
hold a descriptor for at most 5 s, which bounds what a flood of them can take."""

LISTEN_BACKLOG = 256
"""Pending TCP connections the kernel queues for the serving socket (ZeroMQ's default: 100)."""


def _random_port_address(address: str) -> str:
    """ZeroMQ spells "any free port" as ``*``; accept the usual ``:0`` too."""
    return address[:-2] + ":*" if address.endswith(":0") else address


class Endpoint(BaseEndpoint):
    """A Swarm endpoint over ZeroMQ (TCP), CURVE-encrypted by default.

    Args:
        keys, swarm_key, limits, timeouts, registry: see ``BaseEndpoint``.
        encrypted: CURVE on (default). Off only for trusted links and benchmarks;
            a ``swarm_key`` requires it.
        link: EMULATION for benchmarks and tests: hold every received message as if it
            crossed this link (``transport/link_emulation.py``); by default the one
            ``SWARM_EMULATE_LINK`` names, none when it is unset.
    Raises:
        ConfigurationError: a swarm_key without encryption, bad keys, or a malformed
            ``SWARM_EMULATE_LINK``.
    """

    def __init__(
        self, keys: Any = None, *, encrypted: bool = True, link: EmulatedLink | None = None, **kwargs: Any
    ):
        super().__init__(keys, **kwargs)
        if self.swarm_key is not None and not encrypted:
            raise ConfigurationError("swarm_key needs encrypted=True (admission is bound to CURVE keys)")
        self.encrypted = encrypted
        self.link = link if link is not None else EmulatedLink.from_environment()
        self._delays: DelayLines | None = None  # per client, made on the first request (emulation only)
        self._context: zmq.asyncio.Context | None = None
        self._router: zmq.Socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._monitor_numbers = itertools.count()
        self._tasks: list[asyncio.Task] = []

    def _start(self) -> zmq.asyncio.Context:
        self._check_open()
        if self._context is None:
            self._loop = asyncio.get_running_loop()
            self._context = zmq.asyncio.Context()
            if self.encrypted:
                zap = bind_zap_socket(self._context)  # bound before any server socket exists
                self._tasks.append(self._loop.create_task(serve_zap(zap)))
        return self._context

    def _socket(self, kind: int) -> zmq.Socket:
        # a plain socket: event loop callbacks on its descriptor drive it (no pyzmq futures)
        socket = self._start().socket(kind, socket_class=zmq.Socket)
        socket.linger = 0
        socket.maxmsgsize = self.limits.max_message_bytes
        return socket

    async def bind(self, address: str = "tcp://127.0.0.1:0") -> str:
        """Start serving at ``address`` (``:0`` picks a free port).

        Returns:
            the bound address, e.g. ``tcp://127.0.0.1:41234``.
        Raises:
            PeerUnavailable: the endpoint is closed.
            zmq.ZMQError: the address cannot be bound.
        """
        if self._router is None:
            router = self._socket(zmq.ROUTER)
            try:
                router.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)
                router.setsockopt(zmq.BACKLOG, LISTEN_BACKLOG)
                if self.encrypted:
                    configure_server_socket(router, self.keys)
                router.bind(_random_port_address(address))
            except BaseException:
                router.close(linger=0)
                raise
            self._router = router
            self._loop.add_reader(router.FD, self._on_router_events)  # type: ignore[union-attr]
        else:
            self._check_open()
            self._router.bind(_random_port_address(address))
        # the descriptor is edge-triggered: it signals once a read has come up empty
        self._loop.call_soon(self._on_router_events)  # type: ignore[union-attr]
        return self._router.last_endpoint.decode()

    def _on_router_events(self) -> None:
        router = self._router
        if router is None or router.closed:
            return
        receive, encrypted = self._dispatcher.receive, self.encrypted
        self._draining = True  # replies sent meanwhile need no readability check
        try:
            for _ in range(READ_BATCH):
                try:
                    frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.ZMQError:
                    return  # drained (EAGAIN): the descriptor signals the next request
                route = frames[0].bytes
                peer = PeerKey(frames[1].get("User-Id").encode()) if encrypted and len(frames) > 1 else None
                try:
                    if self.link is not None:
                        self._hold(route, peer, [frame.buffer for frame in frames[1:]])
                        continue
                    receive([frame.buffer for frame in frames[1:]], route, peer)
                except Exception:  # the dispatcher never raises; if it does, keep serving
                    log.exception("dispatching a message from %r failed", peer)
        finally:
            self._draining = False
        self._loop.call_soon(self._on_router_events)  # type: ignore[union-attr]  # more waiting

    def _hold(self, route: bytes, peer: PeerKey | None, buffers: list) -> None:
        """Emulation only: dispatches ``buffers`` once the emulated link from ``route`` delivers them."""
        if self._delays is None:
            receive = self._dispatcher.receive
            self._delays = DelayLines(self.link, lambda item: receive(*item))
        self._delays.put(route, (buffers, route, peer), frames_size(buffers))

    def _send_to(self, route: object, frames: list) -> None:
        router = self._router
        if router is None or router.closed:
            return
        try:
            # a ROUTER never blocks: it drops a reply to a vanished or overloaded client
            router.send_multipart([route, *frames], zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as error:
            log.debug("reply to %r dropped: %s", route, error)
        # the descriptor is edge-triggered and the send may have consumed a request's edge
        if not self._draining and router.EVENTS & zmq.POLLIN:
            self._loop.call_soon(self._on_router_events)  # type: ignore[union-attr]

    async def connect(self, address: str, server_public_key: bytes | None = None) -> Connection:
        """Connect to the endpoint at ``address`` whose public key is ``server_public_key``.

        Waits for the encrypted handshake and an admission ping before returning.

        Args:
            address: e.g. ``tcp://10.0.0.2:31337``.
            server_public_key: the server's z85 CURVE public key (required when encrypted).
        Returns:
            the connection (closed with the endpoint, or by ``close()``).
        Raises:
            HandshakeTimeout: no encrypted session within ``Timeouts.connect`` (wrong key?).
            PeerUnavailable: no TCP connection within ``Timeouts.connect``, or this
                endpoint was closed meanwhile (``"endpoint closed"``).
            NotAuthorized: the server is a private swarm we hold no (or a wrong) key for.
        """
        if self.encrypted:
            check_public_key(server_public_key, "server_public_key")  # type: ignore[arg-type]
        socket = self._socket(zmq.DEALER)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeouts.connect
        try:
            socket.immediate = True  # never queue messages on a connection that is not up
            if self.encrypted:
                configure_client_socket(socket, self.keys, server_public_key)  # type: ignore[arg-type]
            # the monitor is attached before connecting, so no event is missed
            monitor_address = f"inproc://swarm.monitor.{id(self)}.{next(self._monitor_numbers)}"
            socket.monitor(monitor_address, MONITOR_EVENTS)
            monitor = self._socket(zmq.PAIR)
        except BaseException:
            socket.close(linger=0)
            raise
        try:
            monitor.connect(monitor_address)
            connection = ZmqConnection(
                socket,
                monitor,
                link=self.link,
                address=address,
                server_key=PeerKey(server_public_key) if self.encrypted else None,  # type: ignore[arg-type]
                registry=self.registry,
                limits=self.limits,
                timeouts=self.timeouts,
                token=self._token,
            )
        except BaseException:
            monitor.close(linger=0)
            socket.close(linger=0)
            raise
        # registered before the first await: closing the endpoint fails this connect
        self._connections.add(connection)
        connection._on_closed = self._connections.discard
        try:
            connection._connect()
            await connection._await_handshake(deadline)
        except BaseException:
            await connection.close()
            raise
        await connection.confirm_answering(address, deadline)
        return connection

    async def _close_transport(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._delays is not None:
            self._delays.close()
        if self._router is not None:
            self._loop.remove_reader(self._router.FD)  # type: ignore[union-attr]
            self._router.close(linger=0)
        if self._context is not None:
            self._context.destroy(linger=0)
