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
import contextlib
import itertools
import logging
from collections import deque
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

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
    HandshakeTimeout,
    NotAuthorized,
    PeerUnavailable,
)
from transport.link_emulation import DelayLine, DelayLines, EmulatedLink, frames_size
from transport.messages import PeerKey

log = logging.getLogger(__name__)

_HANDSHAKE_FAILED = {
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "no detail",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol error",
}
_MONITOR_EVENTS = (
    zmq.EVENT_CONNECTED
    | zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)

_READ_BATCH = 64
"""Messages one descriptor callback reads before letting other callbacks run."""

HANDSHAKE_IVL_MS = 5000
"""ZeroMQ drops an inbound connection that has not finished its handshake (greeting and
CURVE) within this many milliseconds (its default is 30 s): idle or stalled connections
hold a descriptor for at most 5 s, which bounds what a flood of them can take."""

LISTEN_BACKLOG = 256
"""Pending TCP connections the kernel queues for the serving socket (ZeroMQ's default: 100)."""


def _random_port_address(address: str) -> str:
    """ZeroMQ spells "any free port" as ``*``; accept the usual ``:0`` too."""
    return address[:-2] + ":*" if address.endswith(":0") else address


class ZmqConnection(Connection):
    """A connection over one CURVE-encrypted DEALER socket, driven by event loop callbacks.

    No task sits between the socket and the callers: a reader callback on the socket's
    file descriptor receives replies and resolves the callers' futures, and sends go out
    at once with ``NOBLOCK`` (queued behind earlier sends only when ZeroMQ cannot take
    them yet). A second callback reads the socket monitor: the first
    ``HANDSHAKE_SUCCEEDED`` completes ``connect``, and ``DISCONNECTED`` fails every call
    in flight and every queued send. While the peer is disconnected (the socket is
    ``immediate``, so nothing can be queued for it) a new call fails at once with
    ``PeerUnavailable``; ZeroMQ keeps reconnecting, and calls work again after the next
    handshake.
    """

    def __init__(
        self, socket: zmq.Socket, monitor: zmq.Socket, link: EmulatedLink | None = None, **kwargs: Any
    ):
        super().__init__(**kwargs)
        self._socket = socket
        # benchmarks only (transport/link_emulation.py): replies are held as if over a slow link
        self._delay = DelayLine(link, self.deliver) if link is not None else None
        self._monitor = monitor
        self._outbox: deque[tuple[list[Any], asyncio.Future | None, float]] = deque()
        self._up = False  # an encrypted session with the peer is established now
        self._tcp_connected = False  # a TCP connection was made at least once
        self._handshake: asyncio.Future = self._loop.create_future()
        self._fds = (socket.FD, monitor.FD)
        self._loop.add_reader(self._fds[0], self._on_socket_events)
        self._loop.add_reader(self._fds[1], self._on_monitor_events)

    @property
    def is_up(self) -> bool:
        """Whether an encrypted session with the peer is established now (ZeroMQ redials while not)."""
        return self._up

    def _connect(self) -> None:
        self._socket.connect(self.address)
        # The descriptors are edge-triggered and only signal once a read has come up
        # empty: read both once to arm them.
        self._loop.call_soon(self._on_socket_events)
        self._loop.call_soon(self._on_monitor_events)

    async def _await_handshake(self, deadline: float) -> None:
        """Wait for the first encrypted session, up to ``deadline``.

        Raises:
            HandshakeTimeout: TCP connected but no CURVE session (wrong server key?).
            PeerUnavailable: no TCP connection at all, or the connection was closed.
            NotAuthorized: the server refused our key.
        """
        timer = self._loop.call_at(deadline, self._handshake_expired)
        try:
            await self._handshake
        finally:
            timer.cancel()

    def _handshake_expired(self) -> None:
        if self._handshake.done():
            return
        if self._tcp_connected:
            error: Exception = HandshakeTimeout(
                f"no CURVE handshake with {self.address} before the connect deadline (wrong server key?)"
            )
        else:
            error = PeerUnavailable(f"could not connect to {self.address} before the connect deadline")
        self._handshake.set_exception(error)

    def _send(self, frames: list[Any], waiter: asyncio.Future | None, deadline: float) -> None:
        if self._closed:
            raise PeerUnavailable(f"connection to {self.address} is closed")
        if not self._outbox:
            try:
                self._socket.send_multipart(frames, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                pass  # no peer to take it now (disconnected, or its queue is full)
            except zmq.ZMQError as error:
                raise PeerUnavailable(f"send to {self.address} failed: {error}") from None
            else:
                self._check_readable()
                return
        if not self._up:
            raise PeerUnavailable(f"{self.address} is disconnected")
        now = self._loop.time()
        outbox = self._outbox
        while outbox and (outbox[0][2] <= now or (outbox[0][1] is not None and outbox[0][1].done())):
            outbox.popleft()  # given up on by their callers: bound the queue
        outbox.append((frames, waiter, deadline))

    def _flush(self) -> None:
        """Send queued frames while ZeroMQ takes them (the socket became writable)."""
        outbox, socket, now = self._outbox, self._socket, self._loop.time()
        while outbox:
            frames, waiter, deadline = outbox[0]
            if deadline <= now or (waiter is not None and waiter.done()):
                outbox.popleft()
                continue
            try:
                socket.send_multipart(frames, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                # the descriptor signals again once there is room; a reply's edge may
                # have been consumed by this attempt, though
                if socket.EVENTS & zmq.POLLIN:
                    self._loop.call_soon(self._on_socket_events)
                return
            except zmq.ZMQError as error:
                if waiter is not None and not waiter.done():
                    waiter.set_exception(PeerUnavailable(f"send to {self.address} failed: {error}"))
            outbox.popleft()
        self._check_readable()

    def _check_readable(self) -> None:
        # ZeroMQ's descriptor is edge-triggered, and any operation on the socket may
        # consume the edge of a reply that arrived (or of room that opened) meanwhile:
        # look at the socket's state after every send.
        events = self._socket.EVENTS
        if events & zmq.POLLIN or (events & zmq.POLLOUT and self._outbox):
            self._loop.call_soon(self._on_socket_events)

    def _on_socket_events(self) -> None:
        if self._closed:
            return
        socket = self._socket
        for _ in range(_READ_BATCH):
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.ZMQError:
                break  # drained (EAGAIN): the descriptor signals the next reply
            try:
                if self._delay is not None:
                    buffers = [frame.buffer for frame in frames]
                    self._delay.put(buffers, frames_size(buffers))
                else:
                    self.deliver([frame.buffer for frame in frames])
            except Exception:  # a bug of ours must not stop the reading
                log.exception("reply from %s could not be delivered", self.address)
        else:
            self._loop.call_soon(self._on_socket_events)  # more waiting: let others run first
            return
        if self._outbox:
            self._flush()  # checks the socket's state again when done

    def _on_monitor_events(self) -> None:
        while not self._closed:
            try:
                frames = self._monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:
                return
            self._on_monitor_event(parse_monitor_message(frames)["event"])

    def _on_monitor_event(self, event: int) -> None:
        handshake = self._handshake
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._up = True
            if not handshake.done():
                handshake.set_result(None)
            self._loop.call_soon(self._on_socket_events)  # queued sends may go out now
        elif event == zmq.EVENT_CONNECTED:
            self._tcp_connected = True
        elif event == zmq.EVENT_CONNECT_RETRIED:
            # The first TCP connect failed (refused: nothing listens there, e.g. the record
            # of a dead server): fail now rather than at the deadline. Once connected,
            # ZeroMQ's own reconnecting goes on as before.
            if not handshake.done() and not self._tcp_connected:
                handshake.set_exception(PeerUnavailable(f"{self.address} refused the connection"))
        elif event == zmq.EVENT_DISCONNECTED:
            if self._up:
                self._up = False
                self._outbox.clear()  # their waiters are pending calls, failed next
                self.fail_pending(PeerUnavailable(f"{self.address} disconnected"))
        elif handshake.done():
            pass  # a reconnection failed its handshake: calls fail fast while it is down
        elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            handshake.set_exception(NotAuthorized(f"{self.address} refused our key during the handshake"))
        elif event in _HANDSHAKE_FAILED:
            handshake.set_exception(
                HandshakeTimeout(f"CURVE handshake with {self.address} failed ({_HANDSHAKE_FAILED[event]})")
            )

    async def _close(self, error: PeerUnavailable) -> None:
        self._up = False
        self._outbox.clear()
        if self._delay is not None:
            self._delay.close()
        if not self._handshake.done():
            self._handshake.set_exception(error)
            self._handshake.exception()  # read here: ``connect`` may have stopped waiting
        for fd in self._fds:
            self._loop.remove_reader(fd)
        if not self._socket.closed:
            with contextlib.suppress(zmq.ZMQError):
                self._socket.monitor(None, 0)  # stop monitoring
            self._socket.close(linger=0)
        self._monitor.close(linger=0)


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
            for _ in range(_READ_BATCH):
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
            socket.monitor(monitor_address, _MONITOR_EVENTS)
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
