"""The libp2p endpoint: the data plane over streams of a hivemind p2p daemon.

A peer behind NAT cannot accept the ZeroMQ endpoint's TCP connections, but its DHT
already runs a libp2p daemon (``p2pd``) that is reachable: hole-punched when the NATs
allow it, circuit-relayed through a reachable peer otherwise. This endpoint attaches to
that daemon (``P2P.replicate``, as hivemind's averager does) or starts its own, and
carries the same envelope and tensor frames as the ZeroMQ endpoint over raw binary
streams (``transport.stream_framing``), not hivemind's protobuf calls with their 4 MiB
limit and extra copy. One stream per ``Connection``; requests are multiplexed on it by
request id exactly as on a DEALER socket.

Identity: an endpoint's ``public_key`` is its libp2p peer id (base58, as bytes). The
daemon's security handshake (TLS 1.3 or Noise; there is no plaintext transport)
authenticates the remote's peer id, and ``connect`` dials the peer id the caller
expects (from a signed record), not the one an address names; a relay or a stranger
at that address fails the handshake (``HandshakeTimeout``). Servers see the caller's
authenticated peer id as ``RequestContext.peer_key``.

Addresses are libp2p multiaddrs ending in ``/p2p/<peer id>``, comma-separated when a
peer has several (e.g. ``/ip4/1.2.3.4/tcp/4001/p2p/<relay>/p2p-circuit/p2p/<peer>``);
a bare ``/p2p/<peer id>`` dials whatever addresses the daemon's peer store knows
(the DHT fills it).

Unlike a ZeroMQ connection, a libp2p connection does not reconnect: once its stream
ends, every call fails fast with ``PeerUnavailable`` and the caller connects again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import ControlFailure, P2PDaemonError
from hivemind.utils.multiaddr import Multiaddr

from transport.client import Connection
from transport.curve import admission_token
from transport.endpoint import BaseEndpoint
from transport.errors import (
    ConfigurationError,
    HandshakeTimeout,
    MessageTooLarge,
    PeerUnavailable,
)
from transport.libp2p_addresses import split_address
from transport.limits import PROTOCOL_VERSION
from transport.messages import PeerKey
from transport.stream_framing import read_frames, write_frames

log = logging.getLogger(__name__)

DATA_PROTOCOL = f"/swarm/data/{PROTOCOL_VERSION}"
"""The libp2p protocol name the data plane's streams are opened with."""

_MAX_BUFFERED_MESSAGES = 4
"""Messages of ``max_message_bytes`` a stream may have queued before sends are refused."""


def peer_key_of(peer_id: PeerID) -> PeerKey:
    """The ``PeerKey`` (base58 peer id as bytes) a libp2p peer is known by."""
    return PeerKey(peer_id.to_base58().encode())


def _expected_peer(server_public_key: bytes | None) -> PeerID | None:
    try:
        return PeerID.from_base58(bytes(server_public_key).decode())  # type: ignore[arg-type]
    except Exception:
        return None


class Libp2pConnection(Connection):
    """A connection over one libp2p stream; a reader task delivers the replies."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        remote_address: str = "",
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.remote_address = remote_address  # the libp2p connection the stream rides (p2p-circuit: relayed)
        self._reader = reader
        self._writer = writer
        self._broken: PeerUnavailable | None = None
        self._reading = self._loop.create_task(self._read_replies())

    @property
    def broken(self) -> bool:
        """The stream ended or the connection was closed: calls fail; connect again."""
        return self._closed or self._broken is not None

    async def _read_replies(self) -> None:
        reason = "the stream ended"
        try:
            while True:
                self.deliver(await read_frames(self._reader, self._limits, self._timeouts.request))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except (MessageTooLarge, TimeoutError) as error:
            reason = f"it broke the framing ({error})"
        except asyncio.CancelledError:
            return
        self._broken = PeerUnavailable(f"{self.address} went away: {reason}")
        self.fail_pending(self._broken)
        with contextlib.suppress(Exception):
            self._writer.close()

    def _send(self, frames: list[Any], waiter: asyncio.Future | None, deadline: float) -> None:
        if self._closed:
            raise PeerUnavailable(f"connection to {self.address} is closed")
        if self._broken is not None or self._writer.is_closing():
            raise self._broken or PeerUnavailable(f"{self.address} went away")
        buffered = self._writer.transport.get_write_buffer_size()
        if buffered > _MAX_BUFFERED_MESSAGES * self._limits.max_message_bytes:
            raise PeerUnavailable(f"{self.address} does not read: {buffered} bytes queued")
        write_frames(self._writer, frames)

    async def _close(self, error: PeerUnavailable) -> None:
        self._reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reading
        with contextlib.suppress(Exception):
            self._writer.close()


class _InboundStream:
    """A client's stream as the server sees it: where replies to its requests go."""

    def __init__(self, writer: asyncio.StreamWriter, peer_key: PeerKey):
        self.writer = writer
        self.peer_key = peer_key
        self.task = asyncio.current_task()


class Libp2pEndpoint(BaseEndpoint):
    """A Swarm endpoint over libp2p streams of a hivemind p2p daemon.

    Args:
        daemon: the control multiaddr of a running daemon to attach to (e.g. the DHT's:
            ``SwarmDHT.daemon_listen_maddr()``); None starts a daemon owned by this
            endpoint (stopped with it) with ``daemon_options``.
        daemon_options: keyword arguments of ``hivemind.P2P.create`` for an owned daemon
            (``host_maddrs``, ``initial_peers``, ``use_relay``, ``use_auto_relay``, ...);
            default: listen on 127.0.0.1 only.
        protocol: the libp2p protocol name of the streams (one server per name and daemon).
        keys, swarm_key, limits, timeouts, registry: see ``BaseEndpoint`` (``keys`` are
            unused on the wire: libp2p's own keys secure the streams).
    Raises:
        ConfigurationError: both ``daemon`` and ``daemon_options`` given.
    """

    def __init__(
        self,
        keys: Any = None,
        *,
        daemon: str | Multiaddr | None = None,
        daemon_options: Mapping[str, Any] | None = None,
        protocol: str = DATA_PROTOCOL,
        **kwargs: Any,
    ):
        super().__init__(keys, **kwargs)
        if daemon is not None and daemon_options:
            raise ConfigurationError("daemon_options apply to an owned daemon only (daemon=None)")
        self._daemon = Multiaddr(str(daemon)) if daemon is not None else None
        self._daemon_options = dict(daemon_options or {"host_maddrs": ["/ip4/127.0.0.1/tcp/0"]})
        self.protocol = protocol
        self._p2p: P2P | None = None
        self._peer_id: PeerID | None = None  # kept after close: callers may still name us
        self._starting: asyncio.Task | None = None
        self._serving = False
        self._inbound: set[_InboundStream] = set()

    @property
    def public_key(self) -> bytes:
        """This endpoint's libp2p peer id (base58, as bytes); known once started."""
        if self._peer_id is None:
            raise PeerUnavailable("the libp2p endpoint is not started: bind or connect first")
        return peer_key_of(self._peer_id)

    @property
    def p2p(self) -> P2P:
        """The daemon handle (started): e.g. for ``get_visible_maddrs``."""
        if self._p2p is None:
            raise PeerUnavailable("the libp2p endpoint is not started: bind or connect first")
        return self._p2p

    async def start(self) -> P2P:
        """Attach to (or start) the daemon; idempotent. ``bind`` and ``connect`` call it.

        Raises:
            PeerUnavailable: the endpoint is closed, or the daemon cannot be reached/started.
        """
        self._check_open()
        if self._starting is None:
            self._starting = asyncio.get_running_loop().create_task(self._start_daemon())
        try:
            # shielded: a cancelled connect must not leave a half-started daemon behind
            await asyncio.shield(self._starting)
        except (P2PDaemonError, OSError, ControlFailure) as error:
            raise PeerUnavailable(f"libp2p daemon unavailable: {error}") from error
        self._check_open()
        return self._p2p  # type: ignore[return-value]

    async def _start_daemon(self) -> None:
        if self._daemon is not None:
            p2p = await P2P.replicate(self._daemon)
        else:
            p2p = await P2P.create(**self._daemon_options)
        self._p2p, self._peer_id = p2p, p2p.peer_id
        if self.swarm_key is not None:  # admission is bound to the identity the server sees
            self._token = admission_token(self.swarm_key, peer_key_of(p2p.peer_id))

    async def bind(self, address: str | None = None) -> str:
        """Serve the data protocol on the daemon; returns this peer's multiaddrs.

        Args:
            address: unused (the daemon listens where it was told); accepted for the
                ``Endpoint`` interface.
        Returns:
            comma-separated multiaddrs ending in ``/p2p/<peer id>`` (relay addresses
            among them once the daemon holds a relay reservation).
        """
        p2p = await self.start()
        if not self._serving:
            await p2p.add_binary_stream_handler(self.protocol, self._serve_stream)
            self._serving = True
        return await self.visible_address()

    async def visible_address(self) -> str:
        """This peer's current multiaddrs, comma-separated (they change as relays come and go)."""
        maddrs = await self.p2p.get_visible_maddrs(latest=True)
        return ",".join(str(maddr) for maddr in maddrs)

    async def _serve_stream(
        self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self._closed or len(self._inbound) >= self.limits.max_sessions:
            writer.close()
            return
        inbound = _InboundStream(writer, peer_key_of(info.peer_id))
        self._inbound.add(inbound)
        receive = self._dispatcher.receive
        try:
            while True:
                receive(
                    await read_frames(reader, self.limits, self.timeouts.request), inbound, inbound.peer_key
                )
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        except (MessageTooLarge, TimeoutError) as error:
            log.info("dropping the stream of %s: %s", info.peer_id, error)
        finally:
            self._inbound.discard(inbound)
            writer.close()

    def _send_to(self, route: object, frames: list) -> None:
        writer = route.writer  # type: ignore[attr-defined]
        if writer.is_closing():
            return
        if writer.transport.get_write_buffer_size() > _MAX_BUFFERED_MESSAGES * self.limits.max_message_bytes:
            log.debug("reply to %r dropped: the client does not read", route.peer_key)  # type: ignore[attr-defined]
            return
        write_frames(writer, frames)

    async def connect(self, address: str, server_public_key: bytes | None = None) -> Connection:
        """Open a stream to the peer ``server_public_key`` (its libp2p peer id) at ``address``.

        Waits for the stream and an admission ping, all within ``Timeouts.connect`` (after
        the daemon is up: the first ``bind`` or ``connect`` of an endpoint starts or
        attaches to it, bounded by the daemon's own startup timeout).

        Args:
            address: multiaddrs of the peer (see the module doc).
            server_public_key: the peer id the caller expects (from a signed record).
        Raises:
            HandshakeTimeout: the peer at ``address`` is not ``server_public_key`` (or not
                a libp2p peer id at all), or it did not answer in time.
            PeerUnavailable: it cannot be dialled, or this endpoint was closed meanwhile.
            NotAuthorized: the server is a private swarm we hold no (or a wrong) key for.
        """
        expected = _expected_peer(server_public_key)
        if expected is None:
            raise HandshakeTimeout(
                f"{server_public_key!r} is not a libp2p peer id, so not the peer at {address}"
            )
        named, dial = split_address(address)
        if named is not None and named != expected:
            raise HandshakeTimeout(f"{address} names peer {named}, expected {expected}")
        p2p = await self.start()  # once per endpoint, bounded by the daemon's startup timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeouts.connect
        try:
            async with asyncio.timeout(self.timeouts.connect):
                if dial:
                    await p2p._client.connect(expected, dial)  # hivemind has no public dial
                info, reader, writer = await p2p.call_binary_stream_handler(expected, self.protocol)
        except TimeoutError:
            self._check_open()
            raise HandshakeTimeout(f"no libp2p stream to {expected} within the connect deadline") from None
        except (ControlFailure, ConnectionError, OSError, P2PDaemonError) as error:
            self._check_open()
            if "mismatch" in str(error) or "peer id" in str(error):  # the security handshake failed
                raise HandshakeTimeout(f"the peer at {address} is not {expected}: {error}") from None
            raise PeerUnavailable(f"could not reach {expected} at {address}: {error}") from None
        if info.peer_id != expected:  # the daemon authenticated this remote
            writer.close()
            raise HandshakeTimeout(f"stream to {expected} was answered by {info.peer_id}")
        if self._closed:
            writer.close()
            raise PeerUnavailable("endpoint closed")
        connection = Libp2pConnection(
            reader,
            writer,
            str(info.addr),
            address=address,
            server_key=peer_key_of(expected),
            registry=self.registry,
            limits=self.limits,
            timeouts=self.timeouts,
            token=self._token,
        )
        self._connections.add(connection)
        connection._on_closed = self._connections.discard
        await connection.confirm_answering(address, deadline)
        return connection

    async def _close_transport(self) -> None:
        for inbound in list(self._inbound):
            inbound.writer.close()
            if inbound.task is not None:
                inbound.task.cancel()
        self._inbound.clear()
        if self._starting is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._starting  # bounded by the daemon's own startup timeout
        p2p, self._p2p = self._p2p, None
        if p2p is not None:
            if self._serving and self._daemon is not None:  # a shared daemon keeps running
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        p2p.remove_binary_stream_handler(self.protocol), self.timeouts.connect
                    )
            await p2p.shutdown()  # an owned daemon stops; a replica only lets go of it
