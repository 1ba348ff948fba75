"""What every endpoint offers, whatever moves its frames (ZeroMQ or memory).

An endpoint is a server and a client at once: it can ``bind`` and serve handlers,
and ``connect`` to any number of other endpoints with the same key pair. A serving
daemon that pushes activations to the next server, or an all-reduce member that
sends parts to every other member, is one endpoint::

    async with Endpoint(keys) as endpoint:
        endpoint.add_handler(Forward, forward)         # serve
        address = await endpoint.bind("tcp://0.0.0.0:0")
        peer = await endpoint.connect(next_address, next_public_key)
        reply = await peer.call(Forward(...))           # call others, from a handler too
"""

from __future__ import annotations

import abc

from transport.client import Connection
from transport.curve import KeyPair, admission_token
from transport.dispatch import Dispatcher, Handler, StreamHandler
from transport.errors import ConfigurationError, PeerUnavailable
from transport.limits import Limits, Timeouts
from transport.messages import DEFAULT_REGISTRY, Message, MessageRegistry


class BaseEndpoint(abc.ABC):
    """Handlers, limits, keys and lifecycle shared by every transport.

    Args:
        keys: this endpoint's CURVE key pair; a fresh one when None.
        swarm_key: a private swarm's shared secret; when set, this endpoint only
            serves clients that prove it, and proves it to the servers it calls.
        limits: what it accepts from the network.
        timeouts: its deadlines.
        registry: the message kinds it knows; the default registry when None.
    """

    def __init__(
        self,
        keys: KeyPair | None = None,
        *,
        swarm_key: bytes | None = None,
        limits: Limits | None = None,
        timeouts: Timeouts | None = None,
        registry: MessageRegistry | None = None,
    ):
        if swarm_key is not None and (not isinstance(swarm_key, bytes) or len(swarm_key) < 16):
            raise ConfigurationError("swarm_key must be bytes of length >= 16")
        self.keys = keys or KeyPair.generate()
        self.swarm_key = swarm_key
        self.limits = limits or Limits()
        self.timeouts = timeouts or Timeouts()
        self.registry = registry or DEFAULT_REGISTRY
        self._token = admission_token(swarm_key, self.keys.public) if swarm_key is not None else None
        self._dispatcher = Dispatcher(self._send_to, self.registry, self.limits, self.timeouts, swarm_key)
        self._connections: set[Connection] = set()
        self._closed = False

    @property
    def public_key(self) -> bytes:
        """This endpoint's z85 CURVE public key; clients need it to connect."""
        return self.keys.public

    def add_handler(self, kind: type[Message], handler: Handler) -> None:
        """Serve requests of ``kind``: ``reply = await handler(request, context)``.

        A handler's exception becomes an error reply to that caller only (a
        ``SwarmError`` keeps its class name and retryability).

        Args:
            kind: a class declared with ``@message``.
            handler: ``async def handler(request: kind, context: RequestContext) -> Message``.
        Raises:
            ConfigurationError: ``kind`` is not a message class or already has a handler.
        """
        self._dispatcher.add_handler(kind, handler)

    def add_stream_handler(self, kind: type[Message], handler: StreamHandler) -> None:
        """Serve streaming sessions opened with a ``kind`` message.

        Args:
            kind: the opening message's class.
            handler: ``async def handler(stream: ServerStream) -> None``; see ``transport.streams``.
        Raises:
            ConfigurationError: ``kind`` is not a message class or already has a handler.
        """
        self._dispatcher.add_stream_handler(kind, handler)

    @abc.abstractmethod
    async def bind(self, address: str) -> str:
        """Start serving at ``address``; returns the address clients should use."""

    @abc.abstractmethod
    async def connect(self, address: str, server_public_key: bytes) -> Connection:
        """Open a connection to the endpoint at ``address`` with that public key."""

    @abc.abstractmethod
    def _send_to(self, route: object, frames: list) -> None:
        """Send reply frames to a client route."""

    def _check_open(self) -> None:
        if self._closed:
            raise PeerUnavailable("this endpoint is closed")

    async def close(self) -> None:
        """Stop serving, close every connection, release sockets. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._dispatcher.close()
        closed = PeerUnavailable("endpoint closed")
        for connection in list(self._connections):
            await connection._close_with(closed)
        self._connections.clear()
        await self._close_transport()

    @abc.abstractmethod
    async def _close_transport(self) -> None:
        """Release the transport's own resources (after handlers and connections)."""

    async def __aenter__(self) -> BaseEndpoint:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
