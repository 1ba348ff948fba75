"""A relayed server's libp2p peer id is bound to its identity (issue #14), with real p2p daemons.

The libp2p id is the daemon's key, not the swarm identity, so a record signed by A could
name relayed server B's libp2p id. A client's ``RelayedDialer`` reaches whoever holds that
id and asks it to sign a fresh nonce with the identity key the record names: B's record
connects and carries calls; A's record (B's libp2p id, A's identity key) is refused with a
retryable ``PeerUnavailable``, and so is a peer that cannot answer the proof at all.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from swarm.data_plane import RelayedDialer, serve_identity_proof
from swarm.dht import DHTConfig, SwarmDHT
from swarm.identity import Identity
from swarm.reachability import Reachability
from tests.harness import make_bound_server
from transport import Libp2pEndpoint, Timeouts
from transport.errors import PeerUnavailable

pytestmark = pytest.mark.timeout(120)


def test_a_relayed_record_must_name_the_identity_of_the_peer_behind_its_libp2p_id():
    owner, attacker = Identity.generate(), Identity.generate()

    async def body():
        config = DHTConfig(
            swarm_name="relayedtrust", host_maddrs=("/ip4/127.0.0.1/tcp/0",), client_mode=False
        )
        async with (
            SwarmDHT(Identity.generate(), config) as client_dht,
            Libp2pEndpoint() as server,
            Libp2pEndpoint() as mute,
        ):
            serve_identity_proof(server, owner)
            addresses = tuple(a for a in (await server.bind()).split(",") if a)
            mute_addresses = tuple(a for a in (await mute.bind()).split(",") if a)
            relayed = {"reachability": Reachability(direct=False, reason="test"), "addresses": addresses}
            honest = make_bound_server(owner, 0, 1, libp2p_peer=server.public_key.decode(), **relayed)
            forged = make_bound_server(attacker, 0, 1, libp2p_peer=server.public_key.decode(), **relayed)
            silent = dataclasses.replace(
                honest, libp2p_peer=mute.public_key.decode(), addresses=mute_addresses
            )
            assert honest.relayed and forged.relayed
            dialer = RelayedDialer(client_dht, None, Timeouts(connect=20.0, request=10.0))
            try:
                connection = await dialer.connect(honest)
                await connection.ping(timeout=10)
                refusals = []
                for record in (forged, silent):
                    with pytest.raises(PeerUnavailable) as refused:
                        await dialer.connect(record)
                    refusals.append(str(refused.value))
                return refusals
            finally:
                await dialer.close()

    forged, silent = asyncio.run(asyncio.wait_for(body(), 100))
    assert "is not" in forged and attacker.peer_id in forged
    assert "did not prove its identity" in silent
