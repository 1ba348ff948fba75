"""``ZmqConnection``: one outgoing connection of the ZeroMQ endpoint (``zmq_endpoint.py``).

A CURVE-encrypted DEALER socket driven by event-loop reader callbacks on its file
descriptor and on its socket monitor's, with no task or pyzmq future between the socket
and the callers (see the endpoint's module docstring for why).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from transport.client import Connection
from transport.errors import HandshakeTimeout, NotAuthorized, PeerUnavailable
from transport.link_emulation import DelayLine, EmulatedLink, frames_size

log = logging.getLogger(__name__)

_HANDSHAKE_FAILED = {
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "no detail",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol error",
}
MONITOR_EVENTS = (
    zmq.EVENT_CONNECTED
    | zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)

READ_BATCH = 64
"""Messages one descriptor callback reads before letting other callbacks run."""


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
        for _ in range(READ_BATCH):
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
