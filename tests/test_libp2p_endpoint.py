"""What the libp2p endpoint adds to the conformance suite: identity, big messages, shared daemons.

Every endpoint here is a real libp2p peer (its own p2p daemon on 127.0.0.1) unless it
attaches to another's daemon.
"""

from __future__ import annotations

import asyncio
import struct

import pytest
import torch

from tests.netns_roles import Echo, echo  # the same echo service the NAT tests run
from transport import (
    HandshakeTimeout,
    Libp2pEndpoint,
    Limits,
    PeerUnavailable,
)

pytestmark = pytest.mark.timeout(90)


def run(coroutine, timeout: float = 60.0):
    async def bounded():
        return await asyncio.wait_for(coroutine, timeout)

    return asyncio.run(bounded())


def test_server_sees_the_callers_authenticated_peer_id_and_big_tensors_pass():
    async def body():
        async with Libp2pEndpoint() as server, Libp2pEndpoint() as client:
            server.add_handler(Echo, echo)
            address = await server.bind()
            assert address.endswith(f"/p2p/{server.public_key.decode()}")
            connection = await client.connect(address, server.public_key)
            big = torch.randn(4 * 2**20)  # 16 MiB: four times hivemind's protobuf limit
            reply = await connection.call(Echo("big", big))
            assert torch.equal(reply.tensor, big)
            assert reply.caller == client.public_key

    run(body())


def test_a_different_peer_at_the_address_fails_the_handshake():
    async def body():
        async with Libp2pEndpoint() as impostor, Libp2pEndpoint() as real, Libp2pEndpoint() as client:
            impostor.add_handler(Echo, echo)
            impostor_address = await impostor.bind()
            await real.bind()
            transport_part = impostor_address.split("/p2p/")[0]
            # the caller expects `real` (from its signed record); whoever answers at that
            # address must prove that identity in libp2p's security handshake
            with pytest.raises(HandshakeTimeout, match="mismatch"):
                await client.connect(transport_part, real.public_key)
            with pytest.raises(HandshakeTimeout, match="names peer"):
                await client.connect(impostor_address, real.public_key)
            connection = await client.connect(transport_part, impostor.public_key)
            assert (await connection.call(Echo("ok"))).text == "ok"

    run(body())


def test_an_endpoint_attached_to_a_shared_daemon_leaves_it_running():
    async def body():
        async with Libp2pEndpoint() as owner, Libp2pEndpoint() as client:
            await owner.start()  # plays the DHT's daemon
            attached = Libp2pEndpoint(daemon=owner.p2p.daemon_listen_maddr)
            attached.add_handler(Echo, echo)
            address = await attached.bind()
            assert attached.public_key == owner.public_key  # one peer, one identity
            connection = await client.connect(address, attached.public_key)
            assert (await connection.call(Echo("via the shared daemon"))).caller == client.public_key
            await attached.close()
            with pytest.raises(PeerUnavailable):
                await connection.call(Echo("gone"), timeout=10)
            assert owner.p2p.is_alive
            await owner.p2p.get_visible_maddrs(latest=True)  # the daemon still answers

    run(body())


def test_an_oversized_header_drops_that_stream_only():
    async def body():
        limits = Limits(max_message_bytes=2**20)
        async with Libp2pEndpoint(limits=limits) as server, Libp2pEndpoint() as client:
            server.add_handler(Echo, echo)
            address = await server.bind()
            p2p = await client.start()
            await client.connect(address, server.public_key)  # dials and checks the peer
            _, reader, writer = await p2p.call_binary_stream_handler(server.p2p.peer_id, server.protocol)
            writer.write(struct.pack("<IQ", 1, 2**40))  # announces a 1 TiB message
            assert await asyncio.wait_for(reader.read(1), 10) == b""  # dropped, nothing buffered
            connection = await client.connect(address, server.public_key)
            assert (await connection.call(Echo("still serving"))).text == "still serving"

    run(body())
