"""A peer's data plane as others reach it: ZeroMQ when it is reachable, libp2p when not.

At start-up a server or trainer runs the reachability check (``swarm.reachability``)
against direct peers already in the swarm. A *direct* peer keeps its one ZeroMQ
endpoint. A *relayed* peer also serves the same handlers over a ``Libp2pEndpoint``
attached to its DHT's p2p daemon (hole-punched or circuit-relayed by libp2p), and
announces its libp2p peer id and addresses in its signed record; callers dial those
(``RelayedDialer``) and check the peer id on every stream.

The libp2p peer id is the DHT daemon's own key, not the swarm identity, so a record
could name another relayed peer's libp2p id (issue #14). A caller therefore also asks
the peer it reached to sign a fresh nonce, bound to that libp2p id, with the identity
key the record names (``ProveIdentity``), and drops the connection if it cannot.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable

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
    """A client's way to relayed servers: one libp2p endpoint on its DHT's daemon, made on first use.

    Args:
        dht: the client's started ``SwarmDHT`` (its daemon carries the streams).
        swarm_key: a private swarm's key.
        timeouts: the client's deadlines.
    """

    def __init__(self, dht, swarm_key: bytes | None, timeouts: Timeouts):
        self._dht = dht
        self._swarm_key = swarm_key
        self._timeouts = timeouts
        self._endpoint: BaseEndpoint | None = None

    async def connect(self, server: ServerRecord) -> Connection:
        """A new connection to ``server`` over libp2p, authenticated as ``server.libp2p_peer``,
        whose peer proved it holds the identity key ``server``'s record names.

        Raises:
            PeerUnavailable: the peer at that libp2p id cannot sign for the record's
                identity (the record names someone else's libp2p id), or the dial failed.
            HandshakeTimeout, NotAuthorized: see ``Libp2pEndpoint.connect``.
        """
        if self._endpoint is None:
            from transport import Libp2pEndpoint

            daemon = await self._dht.daemon_listen_maddr()
            self._endpoint = Libp2pEndpoint(daemon=daemon, swarm_key=self._swarm_key, timeouts=self._timeouts)
        address = ",".join(a for a in server.addresses if a.startswith("/"))
        connection = await self._endpoint.connect(
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

    async def close(self) -> None:
        if self._endpoint is not None:
            await self._endpoint.close()
