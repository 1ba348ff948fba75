"""The ZeroMQ endpoint: a ROUTER socket to serve, one DEALER socket per connection.

Each endpoint owns one ZeroMQ context (so one ZAP handler names its clients by
their CURVE keys). Frames are sent with ``copy=False`` and received as ZeroMQ frames
whose memory tensors wrap directly. CURVE handshake failures are silent in ZeroMQ:
``connect`` watches the socket monitor for ``HANDSHAKE_SUCCEEDED`` and gives up
with ``HandshakeTimeout`` at the connect deadline (or at the first handshake failure).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from transport.client import Connection
from transport.curve import check_public_key, configure_client_socket, configure_server_socket, serve_zap
from transport.endpoint import BaseEndpoint
from transport.errors import (
    DeadlineExceeded,
    HandshakeTimeout,
    NotAuthorized,
    PeerUnavailable,
)
from transport.messages import PeerKey

log = logging.getLogger(__name__)

_HANDSHAKE_FAILED = {
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "no detail",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol error",
}
_MONITOR_EVENTS = (
    zmq.EVENT_CONNECTED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


def _random_port_address(address: str) -> str:
    """ZeroMQ spells "any free port" as ``*``; accept the usual ``:0`` too."""
    return address[:-2] + ":*" if address.endswith(":0") else address


class ZmqConnection(Connection):
    """A connection over one CURVE-encrypted DEALER socket."""

    def __init__(self, socket: zmq.asyncio.Socket, monitor: zmq.asyncio.Socket, **kwargs: Any):
        super().__init__(**kwargs)
        self._socket = socket
        self._monitor = monitor
        self._tasks = [
            self._loop.create_task(self._read_replies()),
            self._loop.create_task(self._watch_disconnects()),
        ]

    async def _send(self, frames: list[Any], deadline: float) -> None:
        try:
            sending = self._socket.send_multipart(frames, copy=False)
            if not sending.done():  # peer's queue full or reconnecting: bounded wait
                await asyncio.wait_for(sending, max(0.0, deadline - self._loop.time()))
            else:
                sending.result()
        except TimeoutError:
            raise DeadlineExceeded(f"could not send to {self.address} before the deadline") from None
        except zmq.ZMQError as error:
            raise PeerUnavailable(f"send to {self.address} failed: {error}") from None

    async def _read_replies(self) -> None:
        socket = self._socket
        while True:
            frames = await socket.recv_multipart(copy=False)
            self.deliver([frame.buffer for frame in frames])

    async def _watch_disconnects(self) -> None:
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self.fail_pending(PeerUnavailable(f"{self.address} disconnected"))

    async def _close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(zmq.ZMQError):
            self._socket.disable_monitor()
        self._monitor.close(linger=0)
        self._socket.close(linger=0)


class Endpoint(BaseEndpoint):
    """A Swarm endpoint over ZeroMQ (TCP), CURVE-encrypted by default.

    Args:
        keys, swarm_key, limits, timeouts, registry: see ``BaseEndpoint``.
        encrypted: CURVE on (default). Off only for trusted links and benchmarks;
            a ``swarm_key`` requires it.
    Raises:
        ConfigurationError: a swarm_key without encryption, or bad keys.
    """

    def __init__(self, keys: Any = None, *, encrypted: bool = True, **kwargs: Any):
        super().__init__(keys, **kwargs)
        if self.swarm_key is not None and not encrypted:
            from transport.errors import ConfigurationError

            raise ConfigurationError("swarm_key needs encrypted=True (admission is bound to CURVE keys)")
        self.encrypted = encrypted
        self._context: zmq.asyncio.Context | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task] = []

    async def _start(self) -> zmq.asyncio.Context:
        self._check_open()
        if self._context is None:
            self._context = zmq.asyncio.Context()
            if self.encrypted:
                ready = asyncio.Event()
                self._tasks.append(asyncio.get_running_loop().create_task(serve_zap(self._context, ready)))
                await ready.wait()
        return self._context

    def _socket(self, kind: int) -> zmq.asyncio.Socket:
        socket = self._context.socket(kind)  # type: ignore[union-attr]
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
        await self._start()
        if self._router is None:
            self._router = self._socket(zmq.ROUTER)
            if self.encrypted:
                configure_server_socket(self._router, self.keys)
            self._router.bind(_random_port_address(address))
            self._tasks.append(asyncio.get_running_loop().create_task(self._serve(self._router)))
        else:
            self._router.bind(_random_port_address(address))
        return self._router.last_endpoint.decode()

    async def _serve(self, router: zmq.asyncio.Socket) -> None:
        receive = self._dispatcher.receive
        encrypted = self.encrypted
        while True:
            frames = await router.recv_multipart(copy=False)
            route = frames[0].bytes
            peer = PeerKey(frames[1].get("User-Id").encode()) if encrypted and len(frames) > 1 else None
            receive([frame.buffer for frame in frames[1:]], route, peer)

    def _send_to(self, route: object, frames: list) -> None:
        if self._router is None or self._router.closed:
            return
        sending = self._router.send_multipart([route, *frames], copy=False)
        if not sending.done():
            sending.add_done_callback(_log_send_failure)
        elif sending.exception() is not None:
            log.debug("reply to %r dropped: %s", route, sending.exception())

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
            PeerUnavailable: no TCP connection within ``Timeouts.connect``.
            NotAuthorized: the server is a private swarm we hold no (or a wrong) key for.
        """
        context = await self._start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeouts.connect
        socket = self._socket(zmq.DEALER)
        socket.immediate = True  # never queue messages on a connection that is not up
        if self.encrypted:
            key = check_public_key(server_public_key, "server_public_key")  # type: ignore[arg-type]
            configure_client_socket(socket, self.keys, key)
        monitor = socket.get_monitor_socket(_MONITOR_EVENTS)
        del context
        try:
            socket.connect(address)
            await _await_handshake(monitor, address, deadline, loop)
            connection = ZmqConnection(
                socket,
                monitor,
                address=address,
                server_key=PeerKey(server_public_key) if self.encrypted else None,  # type: ignore[arg-type]
                registry=self.registry,
                limits=self.limits,
                timeouts=self.timeouts,
                token=self._token,
            )
        except BaseException:
            socket.disable_monitor()
            monitor.close(linger=0)
            socket.close(linger=0)
            raise
        self._connections.add(connection)
        try:
            await connection.ping(timeout=max(0.001, deadline - loop.time()))
        except DeadlineExceeded:
            await connection.close()
            raise HandshakeTimeout(f"{address} did not answer within the connect deadline") from None
        except BaseException:
            await connection.close()
            raise
        return connection

    async def _close_transport(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._router is not None:
            self._router.close(linger=0)
        if self._context is not None:
            self._context.destroy(linger=0)


async def _await_handshake(
    monitor: zmq.asyncio.Socket, address: str, deadline: float, loop: asyncio.AbstractEventLoop
) -> None:
    connected = False
    while True:
        remaining = deadline - loop.time()
        try:
            if remaining <= 0:
                raise TimeoutError
            frames = await asyncio.wait_for(monitor.recv_multipart(), remaining)
        except TimeoutError:
            if connected:
                raise HandshakeTimeout(
                    f"no CURVE handshake with {address} before the connect deadline (wrong server key?)"
                ) from None
            raise PeerUnavailable(f"could not connect to {address} before the connect deadline") from None
        event = parse_monitor_message(frames)["event"]
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            return
        if event == zmq.EVENT_CONNECTED:
            connected = True
        elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            raise NotAuthorized(f"{address} refused our key during the handshake")
        elif event in _HANDSHAKE_FAILED:
            raise HandshakeTimeout(f"CURVE handshake with {address} failed ({_HANDSHAKE_FAILED[event]})")


def _log_send_failure(sending: asyncio.Future) -> None:
    if not sending.cancelled() and sending.exception() is not None:
        log.debug("reply dropped: %s", sending.exception())
