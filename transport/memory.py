"""An in-memory transport with the ZeroMQ endpoint's interface, for unit tests.

Endpoints on one ``MemoryNetwork`` reach each other by ``memory://N`` addresses.
Messages still go through the full wire encoding (envelope, limits, codecs), and
every frame is copied on delivery, as a network would; only sockets are missing.
A wrong server key fails ``connect`` with ``HandshakeTimeout`` at once.

    network = MemoryNetwork()
    async with MemoryEndpoint(network) as server, MemoryEndpoint(network) as client:
        server.add_handler(Echo, echo)
        address = await server.bind()
        connection = await client.connect(address, server.public_key)
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from transport.client import Connection
from transport.endpoint import BaseEndpoint
from transport.errors import ConfigurationError, HandshakeTimeout, PeerUnavailable
from transport.messages import PeerKey


class MemoryNetwork:
    """A namespace of in-memory endpoints (one per test)."""

    def __init__(self) -> None:
        self._endpoints: dict[str, MemoryEndpoint] = {}
        self._numbers = itertools.count(1)

    def _bind(self, endpoint: MemoryEndpoint, address: str | None) -> str:
        address = address or f"memory://{next(self._numbers)}"
        if address in self._endpoints:
            raise ConfigurationError(f"address {address} is already bound")
        self._endpoints[address] = endpoint
        return address

    def _lookup(self, address: str) -> MemoryEndpoint:
        endpoint = self._endpoints.get(address)
        if endpoint is None or endpoint._closed:
            raise PeerUnavailable(f"nothing listens at {address}")
        return endpoint

    def _unbind(self, endpoint: MemoryEndpoint) -> None:
        for address in [a for a, e in self._endpoints.items() if e is endpoint]:
            del self._endpoints[address]


def _copy(frames: list[Any]) -> list[bytearray]:
    return [bytearray(frame) for frame in frames]


class MemoryConnection(Connection):
    """A connection whose frames are copied straight into the server's dispatcher."""

    def __init__(self, server: MemoryEndpoint, client_key: PeerKey, **kwargs: Any):
        super().__init__(**kwargs)
        self._server = server
        self._client_key = client_key

    def _send(self, frames: list[Any], waiter: asyncio.Future | None, deadline: float) -> None:
        if self._closed or self._server._closed:
            raise PeerUnavailable(f"{self.address} is closed")
        self._loop.call_soon(self._server._dispatcher.receive, _copy(frames), self, self._client_key)

    def receive_reply(self, frames: list[Any]) -> None:
        if not self._closed:
            self._loop.call_soon(self.deliver, _copy(frames))

    async def _close(self, error: PeerUnavailable) -> None:
        self._server._inbound.discard(self)


class MemoryEndpoint(BaseEndpoint):
    """An endpoint on a ``MemoryNetwork``; same interface as ``transport.Endpoint``.

    Args:
        network: the namespace it lives in.
        keys, swarm_key, limits, timeouts, registry: see ``BaseEndpoint``.
    """

    def __init__(self, network: MemoryNetwork, keys: Any = None, **kwargs: Any):
        super().__init__(keys, **kwargs)
        self._network = network
        self._inbound: set[MemoryConnection] = set()

    async def bind(self, address: str | None = None) -> str:
        """Serve at ``address`` (``memory://N`` picked when None); returns the address."""
        self._check_open()
        return self._network._bind(self, address)

    async def connect(self, address: str, server_public_key: bytes | None = None) -> Connection:
        """Connect to the memory endpoint at ``address``; raises like ``Endpoint.connect``."""
        self._check_open()
        server = self._network._lookup(address)
        if server_public_key != server.public_key:
            raise HandshakeTimeout(f"no CURVE handshake with {address}: wrong server key")
        connection = MemoryConnection(
            server,
            PeerKey(self.public_key),
            address=address,
            server_key=PeerKey(server.public_key),
            registry=self.registry,
            limits=self.limits,
            timeouts=self.timeouts,
            token=self._token,
        )
        server._inbound.add(connection)
        self._connections.add(connection)
        try:
            await connection.ping(timeout=self.timeouts.connect)
        except BaseException:
            await connection.close()
            raise
        return connection

    def _send_to(self, route: object, frames: list) -> None:
        route.receive_reply(frames)  # type: ignore[attr-defined]

    async def _close_transport(self) -> None:
        self._network._unbind(self)
        for connection in list(self._inbound):
            connection.fail_pending(PeerUnavailable(f"{connection.address} closed"))
        self._inbound.clear()
