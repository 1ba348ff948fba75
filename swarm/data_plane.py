"""A peer's data plane as others reach it: ZeroMQ when it is reachable, libp2p when not.

At start-up a server or trainer runs the reachability check (``swarm.reachability``)
against direct peers already in the swarm. A *direct* peer keeps its one ZeroMQ
endpoint. A *relayed* peer also serves the same handlers over a ``Libp2pEndpoint``
attached to its DHT's p2p daemon (hole-punched or circuit-relayed by libp2p), and
announces its libp2p peer id and addresses in its signed record; callers dial those
(``RelayedDialer``) and check the peer id on every stream. A training member's
protocols see both planes as one endpoint (``PeerPlane``), which also presents libp2p
callers by the CURVE key of their records.

The libp2p peer id is the DHT daemon's own key, not the swarm identity, so a record
could name another relayed peer's libp2p id (issue #14). A caller therefore also asks
the peer it reached to sign a fresh nonce, bound to that libp2p id, with the identity
key the record names (``ProveIdentity``), and drops the connection if it cannot.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Awaitable, Callable, Iterable

from swarm.identity import Identity, verify_signature
from swarm.reachability import Reachability, ReachabilityConfig, check_reachability, serve_dial_back
from swarm.records import ServerRecord, ServerState
from transport import BaseEndpoint, Connection, Message, RequestContext, Timeouts, message
from transport.errors import PeerUnavailable, SwarmError

logger = logging.getLogger(__name__)

_PROOF_LABEL = b"swarm/libp2p-identity/v1"
_NONCE_BYTES = 16


@message("swarm.prove_identity")
class ProveIdentity(Message):
    """Asks a relayed peer to sign ``nonce`` (with its libp2p id) with its identity key."""

    nonce: bytes


@message("swarm.identity_proof")
class IdentityProof(Message):
    signature: bytes  # Ed25519 over label + nonce + the answering endpoint's libp2p peer id


def _proof_bytes(nonce: bytes, libp2p_peer: bytes) -> bytes:
    return _PROOF_LABEL + nonce + libp2p_peer


def serve_identity_proof(endpoint: BaseEndpoint, identity: Identity) -> None:
    """Answers ``ProveIdentity`` on a relayed peer's libp2p endpoint with ``identity``'s key."""

    async def prove(request: ProveIdentity, context: RequestContext) -> IdentityProof:
        nonce = bytes(request.nonce)[:64]
        return IdentityProof(signature=identity.sign(_proof_bytes(nonce, endpoint.public_key)))

    endpoint.add_handler(ProveIdentity, prove)


@dataclasses.dataclass
class RelayedPlane:
    """The libp2p side of a relayed peer's data plane.

    Attributes:
        endpoint: serves the same handlers as the peer's ZeroMQ endpoint.
        peer: its libp2p peer id (base58), announced in the signed record.
        addresses: multiaddrs to announce: ``/p2p/<peer>``, the daemon's visible ones
            (relay addresses once it shows its reservations), and a circuit through each
            initial peer (the daemon's trusted relays): callers dial them all at once and
            the circuit through a relay holding our reservation wins.
    """

    endpoint: BaseEndpoint
    peer: str
    addresses: tuple[str, ...]


def direct_checkers(records: Iterable[ServerRecord], exclude: str) -> list[tuple[str, bytes]]:
    """(address, CURVE key) of ONLINE direct servers other than ``exclude``: who can check us."""
    found = []
    for record in records:
        if record.peer_id == exclude or record.state != ServerState.ONLINE or record.relayed:
            continue
        direct = [address for address in record.addresses if address.startswith("tcp://")]
        if direct:
            found.append((direct[0], record.curve_public_key))
    return found


def direct_member_checkers(members: dict, exclude: str) -> list[tuple[str, bytes]]:
    """(address, CURVE key) of training members (``TrainingPeerRecord``) that are not relayed."""
    found = []
    for peer, record in members.items():
        relayed = record.reachability is not None and not record.reachability.direct
        direct = [address for address in record.addresses if address.startswith("tcp://")]
        if peer != exclude and not relayed and direct:
            found.append((direct[0], record.curve_public_key))
    return found


async def open_relayed_plane(dht, *, swarm_key: bytes | None, timeouts: Timeouts) -> RelayedPlane:
    """Serve the data plane over the DHT's p2p daemon (bind; add handlers to ``.endpoint``)."""
    from transport import Libp2pEndpoint

    endpoint = Libp2pEndpoint(daemon=await dht.daemon_listen_maddr(), swarm_key=swarm_key, timeouts=timeouts)
    try:
        serve_identity_proof(endpoint, dht.identity)
        visible = await endpoint.bind()
    except BaseException:
        await endpoint.close()
        raise
    peer = endpoint.public_key.decode()
    visible_addresses = [a for a in visible.split(",") if a and "/127.0.0.1/" not in a]
    circuits = [
        f"{relay}/p2p-circuit/p2p/{peer}"
        for relay in dht.config.initial_peers
        if "/p2p/" in relay and "p2p-circuit" not in relay
    ]
    return RelayedPlane(endpoint, peer, (f"/p2p/{peer}", *visible_addresses, *circuits))


async def establish_reachability(
    dht,
    endpoint: BaseEndpoint,
    address: str,
    checkers: list[tuple[str, bytes]],
    config: ReachabilityConfig,
    *,
    swarm_key: bytes | None,
    open_relayed: bool = True,
) -> tuple[Reachability, RelayedPlane | None]:
    """Answer others' checks, run ours, and open the libp2p plane if we are relayed.

    Args:
        dht: this peer's started ``SwarmDHT``.
        endpoint: its bound ZeroMQ endpoint; ``address`` is what it announces.
        checkers: direct peers to ask (``direct_checkers``).
        config: ``--reachability`` and the check's deadlines.
        swarm_key: a private swarm's key (the libp2p plane admits the same peers).
        open_relayed: open the libp2p plane when relayed (False: only learn the verdict).
    Returns:
        the verdict, and the relayed plane when the verdict is relayed.
    """
    serve_dial_back(endpoint, dial_timeout=config.dial_timeout)
    verdict = await check_reachability(
        endpoint,
        checkers,
        dht_maddrs=dht.visible_maddrs(),
        data_address=address,
        public_key=endpoint.public_key,
        config=config,
    )
    if verdict.direct or not open_relayed:
        return verdict, None
    plane = await open_relayed_plane(dht, swarm_key=swarm_key, timeouts=endpoint.timeouts)
    return verdict, plane


class RelayedDialer:
    """A peer's way to relayed peers: one libp2p endpoint on its DHT's daemon, made on first use.

    Args:
        dht: this peer's started ``SwarmDHT`` (its daemon carries the streams; the endpoint
            is its replica, so callees authenticate this peer as its DHT peer id).
        swarm_key: a private swarm's key.
        timeouts: this peer's deadlines.
        endpoint: a libp2p endpoint to dial from instead (a relayed peer's own plane; not
            closed here).
    """

    def __init__(
        self, dht, swarm_key: bytes | None, timeouts: Timeouts, endpoint: BaseEndpoint | None = None
    ):
        self._dht = dht
        self._swarm_key = swarm_key
        self._timeouts = timeouts
        self._endpoint = endpoint
        self._owned: BaseEndpoint | None = None
        self._making = asyncio.Lock()

    async def _dialling_endpoint(self) -> BaseEndpoint:
        if self._endpoint is None:
            async with self._making:  # two first calls at once make one endpoint
                if self._endpoint is None:
                    from transport import Libp2pEndpoint

                    daemon = await self._dht.daemon_listen_maddr()
                    self._owned = Libp2pEndpoint(
                        daemon=daemon, swarm_key=self._swarm_key, timeouts=self._timeouts
                    )
                    self._endpoint = self._owned
        return self._endpoint

    async def connect(self, server: ServerRecord) -> Connection:
        """A new connection to ``server`` over libp2p, authenticated as ``server.libp2p_peer``,
        whose peer proved it holds the identity key ``server``'s record names.

        Raises:
            PeerUnavailable: the peer at that libp2p id cannot sign for the record's
                identity (the record names someone else's libp2p id), or the dial failed.
            HandshakeTimeout, NotAuthorized: see ``Libp2pEndpoint.connect``.
        """
        address = ",".join(a for a in server.addresses if a.startswith("/"))
        connection = await self.connect_address(
            address or f"/p2p/{server.libp2p_peer}", server.libp2p_peer.encode()
        )
        nonce = os.urandom(_NONCE_BYTES)
        try:
            proof = await connection.call(ProveIdentity(nonce=nonce), timeout=self._timeouts.request)
            proven = isinstance(proof, IdentityProof) and verify_signature(
                server.identity_key, _proof_bytes(nonce, server.libp2p_peer.encode()), bytes(proof.signature)
            )
        except SwarmError as error:
            await connection.close()
            raise PeerUnavailable(
                f"relayed server {server.peer_id} did not prove its identity: {error}"
            ) from error
        if not proven:
            await connection.close()
            raise PeerUnavailable(
                f"the libp2p peer {server.libp2p_peer} is not {server.peer_id}: its record names another peer's id"
            )
        return connection

    async def connect_address(self, address: str, peer: bytes) -> Connection:
        """A new connection to libp2p peer ``peer`` (base58, as bytes) at ``address`` (multiaddrs)."""
        endpoint = await self._dialling_endpoint()
        return await endpoint.connect(address, peer)

    async def close(self) -> None:
        if self._owned is not None:
            await self._owned.close()


def is_libp2p_address(address: str) -> bool:
    """Whether ``address`` is libp2p multiaddrs (a relayed peer's) rather than a ZeroMQ ``tcp://`` one."""
    return address.startswith("/")


class PeerPlane:
    """A training member's data plane, seen by its protocols as one endpoint.

    Handlers go on the ZeroMQ endpoint and, when this member is relayed, on its libp2p
    plane too. ``connect`` dials a ``tcp://`` address over ZeroMQ (checking the CURVE
    key) and a member's libp2p multiaddrs (a relayed member's announced address) over
    libp2p, authenticating the peer id the address names: that address comes from the
    member's signed record, checked by matchmaking against the group. A relayed member
    dials from its own plane, a direct one from a replica of its DHT's daemon, so either
    way the callee sees the caller's DHT peer id as ``RequestContext.peer_key``.

    Handlers authenticate callers by CURVE key (they compare it with the member a request
    claims to come from). Over libp2p the transport authenticates a libp2p peer id
    instead; ``identify`` turns it into the CURVE key that the caller's own signed record
    pairs it with, so the same checks hold on both planes.

    Args:
        direct: this member's bound ZeroMQ endpoint.
        dht: its started ``SwarmDHT``.
        relayed: its libp2p plane when relayed (``open_relayed_plane``), else None.
        identify: ``await identify(libp2p peer id) -> CURVE key or None`` (e.g.
            ``RunMembership.curve_key_of``); may be set after construction.
    """

    def __init__(
        self,
        direct: BaseEndpoint,
        dht,
        relayed: RelayedPlane | None = None,
        identify: Callable[[bytes], Awaitable[bytes | None]] | None = None,
    ):
        self.direct = direct
        self.relayed = relayed
        self.identify = identify
        self._dialer = RelayedDialer(
            dht, direct.swarm_key, direct.timeouts, relayed.endpoint if relayed is not None else None
        )

    @property
    def public_key(self) -> bytes:
        """The ZeroMQ endpoint's CURVE key (what the member's record announces)."""
        return self.direct.public_key

    @property
    def timeouts(self) -> Timeouts:
        return self.direct.timeouts

    @property
    def swarm_key(self) -> bytes | None:
        return self.direct.swarm_key

    def add_handler(self, kind, handler) -> None:
        """Serve ``kind`` on both planes; over libp2p the handler sees the caller's CURVE key."""
        self.direct.add_handler(kind, handler)
        if self.relayed is not None:
            self.relayed.endpoint.add_handler(kind, self._identified(handler))

    def _identified(self, handler):
        async def identified(request, context: RequestContext):
            key = None
            if self.identify is not None and context.peer_key is not None:
                key = await self.identify(bytes(context.peer_key))
            # unknown callers keep their libp2p peer id, which matches no member's CURVE key
            return await handler(
                request, context if key is None else dataclasses.replace(context, peer_key=key)
            )

        return identified

    async def connect(self, address: str, server_public_key: bytes) -> Connection:
        """Connect to a member at ``address`` (``tcp://``: ZeroMQ with ``server_public_key``;
        multiaddrs: libp2p, authenticated as the peer they name).

        Raises:
            HandshakeTimeout: multiaddrs that name no peer, or the wrong peer answered.
            PeerUnavailable / DeadlineExceeded: it cannot be reached in time.
        """
        if not is_libp2p_address(address):
            return await self.direct.connect(address, server_public_key)
        from transport.errors import HandshakeTimeout
        from transport.libp2p_addresses import split_address

        named, _ = split_address(address)
        if named is None:
            raise HandshakeTimeout(f"{address[:80]} names no libp2p peer to authenticate")
        return await self._dialer.connect_address(address, named.to_base58().encode())

    async def close(self) -> None:
        """Close the libp2p endpoint made for dialling (the caller owns the others)."""
        await self._dialer.close()
